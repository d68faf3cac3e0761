"""Training datasets (SYSU memory-mapped .npy, RegDB / LLCM idx lists), lazy TestData and the test loader.

TestData is used as `data_loader.TestData` so that pytest does not try to collect it as a test class.
"""
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import data_manager
import methods
import pre_process_sysu
import utils
from data_loader import (LLCMData, RegDBData, SYSUData, build_test_transform,
                         load_resized_rgb, make_test_loader)
from data_manager import DatasetError
from tools.make_synthetic import make_llcm, make_regdb, make_sysu
from utils import ConfigError, GenIdx, IdentitySampler

H, W = 128, 64


@pytest.fixture(scope="module")
def sysu_npy(tmp_path_factory):
    root = make_sysu(str(tmp_path_factory.mktemp("sysu")), size="test", seed=0)
    args = ["--data-path", root, "--workers", "0", "--img-h", str(H), "--img-w", str(W)]
    assert pre_process_sysu.main(args) == 0
    return root


@pytest.fixture(scope="module")
def regdb_root(tmp_path_factory):
    return make_regdb(str(tmp_path_factory.mktemp("regdb")), size="test", seed=0)


@pytest.fixture(scope="module")
def llcm_root(tmp_path_factory):
    return make_llcm(str(tmp_path_factory.mktemp("llcm")), size="test", seed=0)


def naive_resize(path, w=W, h=H):
    return np.array(Image.open(path).resize((w, h), Image.LANCZOS))


def plan(dataset, n=6):
    """A short epoch plan: item k pairs RGB k mod N_rgb with IR k mod N_ir."""
    dataset.cIndex = np.arange(n) % len(dataset.train_color_label)
    dataset.tIndex = (np.arange(n) * 7) % len(dataset.train_thermal_label)
    return dataset


def assert_irl_item(item, dataset, k):
    assert len(item) == 6
    for view in item[:4]:
        assert isinstance(view, torch.Tensor) and view.shape == (3, H, W)
    assert isinstance(item[4], np.int64) and isinstance(item[5], np.int64)
    assert item[4] == dataset.train_color_label[dataset.cIndex[k]]
    assert item[5] == dataset.train_thermal_label[dataset.tIndex[k]]


# --- SYSU -------------------------------------------------------------------------------------------------

def test_sysu_images_are_memory_mapped_and_labels_in_memory(sysu_npy):
    ds = SYSUData(sysu_npy, methods.get("irl").train_views(H, W), img_h=H, img_w=W)
    assert isinstance(ds.train_color_image, np.memmap) and ds.train_color_image.mode == "r"
    assert isinstance(ds.train_thermal_image, np.memmap)
    assert not isinstance(ds.train_color_label, np.memmap) and ds.train_color_label.dtype == np.int64
    assert ds.train_color_image.shape[1:] == (H, W, 3)
    assert len(ds) == len(ds.train_color_label) == ds.train_color_image.shape[0]


def test_sysu_irl_items_are_four_views_and_two_labels(sysu_npy):
    ds = plan(SYSUData(sysu_npy, methods.get("irl").train_views(H, W)))
    for k in range(3):
        assert_irl_item(ds[k], ds, k)


def test_sysu_agw_items_are_two_views_and_two_labels(sysu_npy):
    ds = plan(SYSUData(sysu_npy, methods.get("agw").train_views(H, W)))
    v_rgb, v_ir, l_rgb, l_ir = ds[2]
    assert v_rgb.shape == v_ir.shape == (3, H, W)
    assert l_rgb == ds.train_color_label[ds.cIndex[2]] and l_ir == ds.train_thermal_label[ds.tIndex[2]]


def test_sysu_views_come_from_the_indexed_images(sysu_npy):
    identity = build_test_transform(H, W)     # deterministic: the item must equal the indexed stored image
    ds = plan(SYSUData(sysu_npy, [("rgb", identity), ("ir", identity)]))
    rgb, ir, _, _ = ds[4]
    assert torch.equal(rgb, identity(np.asarray(ds.train_color_image[ds.cIndex[4]])))
    assert torch.equal(ir, identity(np.asarray(ds.train_thermal_image[ds.tIndex[4]])))


def test_planned_pairs_read_the_sampled_pair_without_changing_the_dataset(sysu_npy):
    identity = build_test_transform(H, W)
    ds = SYSUData(sysu_npy, [("rgb", identity), ("ir", identity)])
    rgb, ir, rgb_label, ir_label = utils.PlannedPairs(ds)[(3, 5, 0)]
    assert torch.equal(rgb, identity(np.asarray(ds.train_color_image[3])))
    assert torch.equal(ir, identity(np.asarray(ds.train_thermal_image[5])))
    assert (rgb_label, ir_label) == (ds.train_color_label[3], ds.train_thermal_label[5])
    assert ds.cIndex is None and ds.tIndex is None       # workers' copies stay as built


def test_training_set_of_an_unknown_dataset_is_a_config_error(sysu_npy):
    with pytest.raises(ConfigError, match="no training set for dataset 'market'"):
        data_loader.training_set("market", sysu_npy, methods.get("agw").train_views(H, W), H, W)


def test_sysu_index_plan_is_settable_per_epoch(sysu_npy):
    ds = SYSUData(sysu_npy, methods.get("agw").train_views(H, W))
    with pytest.raises(RuntimeError, match="cIndex"):
        ds[0]
    color_pos, thermal_pos = GenIdx(ds.train_color_label, ds.train_thermal_label)
    sampler = IdentitySampler(ds.train_color_label, ds.train_thermal_label, color_pos, thermal_pos, 2, 2)
    ds.cIndex, ds.tIndex = sampler.index1, sampler.index2
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True)
    v_rgb, v_ir, l_rgb, l_ir = next(iter(loader))
    assert v_rgb.shape == (4, 3, H, W) and torch.equal(l_rgb, l_ir)   # sampler pairs identities


def test_sysu_size_mismatch_is_a_clear_error(sysu_npy):
    with pytest.raises(DatasetError, match="384x192"):
        SYSUData(sysu_npy, methods.get("irl").train_views(384, 192), img_h=384, img_w=192)


def test_sysu_missing_npy_points_to_preprocessing(tmp_path):
    with pytest.raises(DatasetError, match="pre_process_sysu.py"):
        SYSUData(str(tmp_path), methods.get("irl").train_views(H, W))


def test_sysu_label_count_mismatch_is_a_clear_error(sysu_npy, tmp_path):
    names = data_manager.sysu_npy_files(H, W)
    for name in names.values():
        os.symlink(os.path.join(sysu_npy, name), tmp_path / name)
    os.remove(tmp_path / names["ir_label"])
    np.save(tmp_path / names["ir_label"], np.zeros(3, dtype=np.int64))
    with pytest.raises(DatasetError, match=names["ir_img"]):
        SYSUData(str(tmp_path), methods.get("irl").train_views(H, W))


def test_sysu_reads_the_cache_of_its_size_beside_others_and_the_official_names(sysu_npy, tmp_path):
    names = data_manager.sysu_npy_files(H, W)
    for key, name in names.items():          # the official script's unsized names hold the H x W images
        os.symlink(os.path.join(sysu_npy, name), tmp_path / data_manager.SYSU_NPY_FILES[key])
    views = methods.get("irl").train_views(H, W)
    assert SYSUData(str(tmp_path), views, img_h=H, img_w=W).train_color_image.shape[1:3] == (H, W)
    with pytest.raises(DatasetError, match=f"images are {H}x{W}.*make that size with: python pre_process_sysu.py "
                                           f"--data-path {tmp_path} --img-h 384 --img-w 144$"):
        SYSUData(str(tmp_path), views, img_h=384, img_w=144)
    for name in data_manager.SYSU_NPY_FILES.values():
        os.remove(tmp_path / name)
    small = {key: name.replace(f"_{H}x{W}", "_16x8") for key, name in names.items()}
    for key in names:                        # a second, smaller cache beside the H x W one
        array = np.load(os.path.join(sysu_npy, names[key]))
        np.save(tmp_path / small[key], array[:, :16, :8] if key.endswith("img") else array)
        os.symlink(os.path.join(sysu_npy, names[key]), tmp_path / names[key])
    assert SYSUData(str(tmp_path), views, img_h=16, img_w=8).train_color_image.shape[1:3] == (16, 8)
    assert SYSUData(str(tmp_path), views, img_h=H, img_w=W).train_color_image.shape[1:3] == (H, W)
    with pytest.raises(DatasetError, match=f"no 384x144 SYSU training cache in {tmp_path} \\(found 16x8, {H}x{W}\\); "
                                           f"make it with: python pre_process_sysu.py --data-path {tmp_path} "
                                           f"--img-h 384 --img-w 144$"):
        SYSUData(str(tmp_path), views, img_h=384, img_w=144)


def test_sysu_pickles_without_copying_the_images(sysu_npy):
    ds = plan(SYSUData(sysu_npy, methods.get("agw").train_views(H, W)))
    blob = pickle.dumps(ds)
    assert len(blob) < ds.train_color_image.nbytes / 4
    clone = pickle.loads(blob)
    assert isinstance(clone.train_color_image, np.memmap)
    assert np.array_equal(clone.train_thermal_label, ds.train_thermal_label)
    assert np.array_equal(clone.cIndex, ds.cIndex)


def test_views_must_be_modality_transform_pairs(sysu_npy):
    transform = build_test_transform(H, W)
    for views in ([transform], [("rgb", transform), ("nir", transform)], [("ir", None)], []):
        with pytest.raises(ConfigError, match="modality, transform"):
            SYSUData(sysu_npy, views)


# --- RegDB / LLCM ------------------------------------------------------------------------------------------

def test_regdb_loads_resized_uint8_images_in_list_order(regdb_root):
    rgb_paths, rgb_labels, ir_paths, ir_labels = data_manager.regdb_training_lists(regdb_root, 1)
    ds = RegDBData(regdb_root, 1, methods.get("irl").train_views(H, W), img_h=H, img_w=W)
    assert ds.train_color_image.shape == (len(rgb_paths), H, W, 3) and ds.train_color_image.dtype == np.uint8
    assert ds.train_thermal_image.shape == (len(ir_paths), H, W, 3)
    assert np.array_equal(ds.train_color_label, rgb_labels) and np.array_equal(ds.train_thermal_label, ir_labels)
    for k in (0, len(rgb_paths) - 1):
        assert np.array_equal(ds.train_color_image[k], naive_resize(rgb_paths[k]))
    assert np.array_equal(ds.train_thermal_image[-1], np.array(
        Image.open(ir_paths[-1]).convert("RGB").resize((W, H), Image.LANCZOS)))
    plan(ds)
    assert_irl_item(ds[1], ds, 1)


def test_llcm_loads_and_yields_irl_items(llcm_root):
    rgb_paths, rgb_labels, ir_paths, _ = data_manager.llcm_training_lists(llcm_root)
    ds = plan(LLCMData(llcm_root, methods.get("irl").train_views(H, W), img_h=H, img_w=W))
    assert ds.train_color_image.shape == (len(rgb_paths), H, W, 3)
    assert ds.train_thermal_image.shape == (len(ir_paths), H, W, 3)
    assert np.array_equal(ds.train_color_image[0], naive_resize(rgb_paths[0]))
    assert np.array_equal(ds.train_color_label, rgb_labels)
    assert_irl_item(ds[3], ds, 3)


def test_llcm_agw_items(llcm_root):
    ds = plan(LLCMData(llcm_root, methods.get("agw").train_views(H, W), img_h=H, img_w=W))
    assert len(ds[0]) == 4


# --- image loading: RGB conversion (Q-02 clean fix) -------------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_load_resized_rgb_converts_to_three_channels(tmp_path, mode):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, (40, 20, channels), dtype=np.uint8).squeeze()
    path = str(tmp_path / "img.png")
    Image.fromarray(pixels, mode).save(path)
    out = load_resized_rgb(path, W, H)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    expected = np.array(Image.open(path).convert("RGB").resize((W, H), Image.LANCZOS))
    assert np.array_equal(out, expected)
    if mode == "RGB":                       # identical to the official (unconverted) loading
        assert np.array_equal(out, naive_resize(path))
    if mode == "L":
        assert np.array_equal(out[..., 0], out[..., 2])


# --- TestData -----------------------------------------------------------------------------------------------

def test_testdata_is_lazy_and_fails_at_getitem_naming_the_file(tmp_path):
    missing = [str(tmp_path / f"missing_{k}.jpg") for k in range(3)]
    ds = data_loader.TestData(missing, np.arange(3), build_test_transform(H, W), img_size=(W, H))  # no I/O yet
    assert len(ds) == 3
    with pytest.raises(DatasetError, match="missing_1.jpg"):
        ds[1]


def test_testdata_does_not_open_images_at_construction(monkeypatch, regdb_root):
    paths, labels = data_manager.process_test_regdb(regdb_root, 1, "visible")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    ds = data_loader.TestData(paths, labels, build_test_transform(H, W), img_size=(W, H))
    assert opened == []
    ds[0]
    assert len(opened) == 1


def test_testdata_corrupt_image_is_a_dataset_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not an image")
    with pytest.raises(DatasetError, match="bad.jpg"):
        data_loader.TestData([str(bad)], [0], build_test_transform(H, W), img_size=(W, H))[0]


def test_testdata_label_count_must_match():
    with pytest.raises(DatasetError):
        data_loader.TestData(["a.jpg", "b.jpg"], [0], build_test_transform(H, W))


def test_testdata_item_is_lanczos_resize_then_test_transform(regdb_root):
    paths, labels = data_manager.process_test_regdb(regdb_root, 1, "thermal")
    transform = build_test_transform(H, W)
    img, label = data_loader.TestData(paths, labels, transform, img_size=(W, H))[2]
    expected = transform(np.array(Image.open(paths[2]).convert("RGB").resize((W, H), Image.LANCZOS)))
    assert torch.equal(img, expected) and label == labels[2]


def test_make_test_loader_keeps_order_with_workers(regdb_root):
    paths, labels = data_manager.process_test_regdb(regdb_root, 1, "visible")
    paths, labels = paths[:6], labels[:6]
    loader = make_test_loader(paths, labels, H, W, batch_size=4, workers=2)
    batches = list(loader)
    assert [b[0].shape[0] for b in batches] == [4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), torch.as_tensor(labels))
    transform = build_test_transform(H, W)
    assert torch.equal(batches[1][0][1], transform(np.array(Image.open(paths[5]).convert("RGB").resize(
        (W, H), Image.LANCZOS))))
