"""tools/make_synthetic.py: exact layouts of REFERENCE 1, determinism by seed, modality statistics."""
import hashlib
import os
import re

import numpy as np
import pytest
from PIL import Image

import data_manager as dm
from tools import make_synthetic as ms


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return {"sysu": ms.make_sysu(root), "regdb": ms.make_regdb(root), "llcm": ms.make_llcm(root)}


def image_files(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                  if n.endswith((".jpg", ".bmp")))


def load(path):
    return np.asarray(Image.open(path))


def tree_digest(root):
    digest = hashlib.sha256()
    for d, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(d, name)
            digest.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def one_line_ids(path):
    with open(path) as f:
        text = f.read()
    assert re.fullmatch(r"\d+(,\d+)*\n", text), text
    return [int(t) for t in text.split(",")]


# ----------------------------------------------------------------------------------------------------------
# Layouts


def test_sysu_layout(trees):
    data = trees["sysu"]
    assert os.path.basename(data) == "SYSU-MM01"
    ids = {name: one_line_ids(os.path.join(data, "exp", name)) for name in dm.SYSU_ID_FILES}
    assert [len(ids[n]) for n in dm.SYSU_ID_FILES] == [12, 3, 8]
    assert len(set().union(*ids.values())) == 23  # disjoint
    assert all(v == sorted(v) for v in ids.values())
    files = image_files(data)
    assert files and all(re.fullmatch(r"cam[1-6]/\d{4}/\d{4}\.jpg", f) for f in files)
    assert {int(f[5:9]) for f in files} == set().union(*ids.values())
    dm.validate_sysu_layout(data)
    rgb, ir = dm.sysu_training_files(data)  # every training id has RGB and IR images
    rgb_labels, ir_labels = dm.sysu_training_labels(rgb, ir)
    assert set(rgb_labels.tolist()) == set(ir_labels.tolist()) == set(range(15))
    for pid in ids["test_id.txt"]:
        assert any(os.listdir(os.path.join(data, c, "%04d" % pid)) for c in dm.SYSU_INDOOR_CAMS
                   if os.path.isdir(os.path.join(data, c, "%04d" % pid)))
    # some (id, camera) folders are missing on purpose
    present = {(f[:4], f[5:9]) for f in files}
    assert len(present) < 6 * 23


def test_regdb_layout(trees):
    data = trees["regdb"]
    names = sorted(os.listdir(os.path.join(data, "idx")))
    assert names == sorted(f"{s}_{m}_{t}.txt" for s in ("train", "test") for m in ("visible", "thermal")
                           for t in range(1, 11))
    for trial in range(1, 11):
        rgb, rgb_labels, ir, ir_labels = dm.regdb_training_lists(data, trial)  # Q-06 validated
        assert len(rgb) == len(ir) == 10 * 4 and rgb_labels.tolist() == ir_labels.tolist()
        test_vis, test_vis_labels = dm.process_test_regdb(data, trial, "visible")
        assert sorted(set(test_vis_labels.tolist())) == list(range(10))
        train_ids = {p.split(os.sep)[-2] for p in rgb}
        test_ids = {p.split(os.sep)[-2] for p in test_vis}
        assert len(train_ids) == len(test_ids) == 10 and not train_ids & test_ids
        with open(os.path.join(data, "idx", f"train_thermal_{trial}.txt")) as f:
            for line in f.read().splitlines():
                assert re.fullmatch(r"Thermal/(\d+)/(female|male)_(front|back)_t_\d{5}_\1\.bmp \d+", line), line
    splits = {tuple(sorted(dm.read_idx_file(os.path.join(data, "idx", f"train_visible_{t}.txt"))[0]))
              for t in range(1, 11)}
    assert len(splits) > 1  # trials are different random splits
    thermal = load(os.path.join(data, dm.read_idx_file(os.path.join(data, "idx", "test_thermal_1.txt"))[0][0]))
    assert thermal.ndim == 3 and thermal.shape[2] == 3  # 3-channel thermal (REFERENCE 1.3)


def test_llcm_layout(trees):
    data = trees["llcm"]
    test_ids = one_line_ids(os.path.join(data, "idx", "test_id.txt"))
    assert len(test_ids) == 8
    name_re = r"(train|test)_(vis|nir)/cam([1-9])/(\d{4})/\4_c0\3_s\d{6}_f\d{4}_\2\.jpg"
    files = image_files(data)
    assert files and all(re.fullmatch(name_re, f) for f in files)
    nir_cam3 = os.path.join(data, "test_nir", "cam3")
    assert os.path.isdir(nir_cam3) and not os.listdir(nir_cam3)
    assert not any(f.startswith(("test_nir/cam3", "train_nir/cam3")) for f in files)
    rgb, rgb_labels, ir, ir_labels = dm.llcm_training_lists(data)
    assert set(rgb_labels.tolist()) == set(ir_labels.tolist()) == set(range(12))
    train_pids = {dm.parse_cam_pid(p)[1] for p in rgb}
    assert not train_pids & set(test_ids)
    for mode in (1, 2):
        _, pids, _ = dm.process_query_llcm(data, mode)
        assert set(pids.tolist()) == set(test_ids)  # every test id in both modalities


def test_image_sizes_and_ir_channels(trees):
    for name in ("sysu", "llcm", "regdb"):
        files = image_files(trees[name])[::7]
        for rel in files:
            img = load(os.path.join(trees[name], rel))
            h, w, c = img.shape
            assert c == 3 and 128 <= h <= 256 and 64 <= w <= 128, (rel, img.shape)
            infrared = re.match(r"cam[36]/" if name == "sysu" else r".*(_nir\.jpg|^Thermal/)", rel)
            spread = int(np.abs(img.astype(int) - img[..., :1]).max())
            if infrared:
                assert spread <= 1, rel  # R = G = B
            elif name == "sysu":
                assert spread > 20, rel  # colour


# ----------------------------------------------------------------------------------------------------------
# Modality statistics


def mean_brightness(folder_glob_root, cams, pattern="*.jpg"):
    values = []
    for cam in cams:
        cam_dir = os.path.join(folder_glob_root, cam)
        for pid in sorted(os.listdir(cam_dir)):
            for name in sorted(os.listdir(os.path.join(cam_dir, pid))):
                values.append(load(os.path.join(cam_dir, pid, name)).mean())
    return float(np.mean(values))


def test_low_light_cameras_are_dark(trees):
    sysu = trees["sysu"]
    assert mean_brightness(sysu, ["cam2"]) < 0.45 * mean_brightness(sysu, ["cam1", "cam4"])
    llcm = os.path.join(trees["llcm"], "test_vis")
    dark = [f"cam{k}" for k in ms.LLCM_DARK_VIS_CAMS]
    assert mean_brightness(llcm, dark) < 0.6 * mean_brightness(llcm, ["cam1", "cam4", "cam6"])


def test_infrared_is_not_the_visible_luminance():
    """Same person, same pose: the NIR rendering is far from a function of the visible luminance.

    Per identity, fit IR ~ a + b * luminance over the person pixels; the luminance explains little of the
    IR variance on average (R^2 well below 1), while the identity structure is shared: both renderings use
    one material map, and the NIR values of the two top colours differ whenever they differ in colour."""
    r2 = []
    for pid in range(40):
        ident = ms.make_identity(np.random.default_rng([7, pid]))
        labels, _ = ms.render_labels(ident, 200, 96, np.random.default_rng([8, pid]))
        person = labels[labels > 0]
        luminance = (ident["rgb"] @ np.array([0.299, 0.587, 0.114]))[person]
        for palette in (ident["nir"], ident["thermal"]):
            ir = palette[person]
            r2.append(np.corrcoef(luminance, ir)[0, 1] ** 2 if ir.std() > 0 and luminance.std() > 0 else 0.0)
    assert np.mean(r2) < 0.35, np.mean(r2)
    # across identities: the IR value of a garment is not predicted by its luminance either
    colours = np.random.default_rng(0).uniform(0, 1, size=(2000, 3))
    nir = ms._nir_response(colours, 0.0)
    lum = colours @ np.array([0.299, 0.587, 0.114])
    assert abs(np.corrcoef(lum, nir)[0, 1]) < 0.3 and nir.std() > 0.2


def test_same_pose_renders_share_geometry():
    ident = ms.make_identity(np.random.default_rng(3))
    a, _ = ms.render_labels(ident, 180, 90, np.random.default_rng(5), view="front")
    b, _ = ms.render_labels(ident, 180, 90, np.random.default_rng(5), view="front")
    back, _ = ms.render_labels(ident, 180, 90, np.random.default_rng(5), view="back")
    assert np.array_equal(a, b) and not np.array_equal(a, back)
    assert (a > 0).mean() > 0.1  # a person fills a good part of the frame


# ----------------------------------------------------------------------------------------------------------
# Determinism, presets, overwrite policy, CLI


@pytest.mark.parametrize("maker, small", [
    (ms.make_sysu, dict(train_ids=3, val_ids=1, test_ids=2)),
    (ms.make_regdb, dict(ids=6, images=2)),
    (ms.make_llcm, dict(train_ids=3, test_ids=2)),
])
def test_same_seed_same_bytes(tmp_path, maker, small):
    first = maker(str(tmp_path / "a"), seed=3, **small)
    second = maker(str(tmp_path / "b"), seed=3, **small)
    other = maker(str(tmp_path / "c"), seed=4, **small)
    assert tree_digest(first) == tree_digest(second)
    assert tree_digest(first) != tree_digest(other)


def test_overrides_and_errors(tmp_path):
    data = ms.make_sysu(str(tmp_path), train_ids=2, val_ids=1, test_ids=2, images=(1, 1))
    assert len(one_line_ids(os.path.join(data, "exp", "train_id.txt"))) == 2
    assert all(len(os.listdir(os.path.join(data, c, p))) == 1
               for c in dm.SYSU_ALL_CAMS for p in os.listdir(os.path.join(data, c)))
    again = ms.make_sysu(str(tmp_path), train_ids=3, val_ids=1, test_ids=2)  # replaces its own tree
    assert len(one_line_ids(os.path.join(again, "exp", "train_id.txt"))) == 3
    with pytest.raises(ValueError, match="unknown sysu override"):
        ms.make_sysu(str(tmp_path), num_ids=3)
    with pytest.raises(ValueError, match="size must be one of"):
        ms.make_llcm(str(tmp_path), size="huge")
    os.makedirs(tmp_path / "user" / "RegDB")
    with pytest.raises(FileExistsError, match="not written by make_synthetic"):
        ms.make_regdb(str(tmp_path / "user"))


def test_cli_writes_requested_datasets(tmp_path, capsys):
    assert ms.main(["--out", str(tmp_path), "--datasets", "regdb", "--size", "test", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "RegDB: 160 images" in out
    assert sorted(os.listdir(tmp_path)) == ["RegDB"]
    os.makedirs(tmp_path / "other" / "LLCM")
    assert ms.main(["--out", str(tmp_path / "other"), "--datasets", "llcm", "--size", "test"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
