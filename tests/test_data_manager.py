"""data_manager: listing orders, gallery sampling (golden), protocols and validation errors.

Most trees here are hand-made with empty files (data_manager never decodes images); the synthetic
generator's trees are covered in test_synthetic.py and used here for protocol sizes.
"""
import json
import os
import random

import numpy as np
import pytest

import data_manager as dm
from conftest import GOLDEN_DIR
from tools.make_synthetic import make_llcm, make_regdb, make_sysu


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------------------------------------
# Hand-made SYSU tree. The root contains "cam" on purpose.

SYSU_FOLDERS = {  # (cam, pid) -> file names (created in unsorted order)
    ("cam1", 3): ["0010.jpg", "0002.jpg", "0001.jpg"],
    ("cam2", 3): ["0005.jpg"],
    ("cam4", 3): ["0003.jpg", "0001.jpg"],
    ("cam3", 3): ["0002.jpg", "0001.jpg"],
    ("cam5", 12): ["0001.jpg", "0004.jpg", "0003.jpg", "0002.jpg"],
    ("cam6", 12): ["0007.jpg"],
    ("cam3", 12): ["0001.jpg"],
    ("cam1", 7): ["0001.jpg", "0002.jpg"],
    ("cam6", 7): ["0003.jpg", "0001.jpg"],
    # training ids
    ("cam1", 1): ["0001.jpg"], ("cam3", 1): ["0001.jpg", "0002.jpg"],
    ("cam5", 2): ["0002.jpg", "0001.jpg"], ("cam6", 2): ["0001.jpg"], ("cam2", 2): ["0001.jpg"],
    ("cam4", 20): ["0001.jpg"], ("cam3", 20): ["0001.jpg"],
}


def make_sysu_tree(root, folders=SYSU_FOLDERS, test_ids="12,3,7", train_ids="20,2", val_ids="1"):
    data = os.path.join(root, "my_camera_data", "SYSU-MM01")
    for cam in dm.SYSU_ALL_CAMS:
        os.makedirs(os.path.join(data, cam), exist_ok=True)
    for (cam, pid), names in folders.items():
        for name in names:
            touch(os.path.join(data, cam, "%04d" % pid, name))
    write(os.path.join(data, "exp", "test_id.txt"), test_ids + "\n")
    write(os.path.join(data, "exp", "train_id.txt"), train_ids + "\n")
    write(os.path.join(data, "exp", "val_id.txt"), val_ids + "\n")
    return data


def official_gallery_sysu(data_path, mode, trial):
    """Literal transcription of the AGW-family process_gallery_sysu (global random, string offsets)."""
    cams = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    with open(os.path.join(data_path, "exp/test_id.txt")) as f:
        ids = ["%04d" % int(y) for y in f.read().splitlines()[0].split(",")]
    random.seed(trial)
    files = []
    for pid in sorted(ids):
        for cam in cams:
            img_dir = os.path.join(data_path, cam, pid)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
                files.append(random.choice(new_files))
    return files, [int(p[-13:-9]) for p in files], [int(p[-15]) for p in files]


@pytest.fixture
def sysu_tree(tmp_path):
    return make_sysu_tree(str(tmp_path))


def rel(paths, root):
    return [os.path.relpath(p, root) for p in paths]


# ----------------------------------------------------------------------------------------------------------
# Gallery sampling


def test_sample_gallery_indices_reproduces_golden_and_leaves_global_random_alone():
    with open(os.path.join(GOLDEN_DIR, "golden_misc.json")) as f:
        golden = json.load(f)["gallery_choice"]
    sizes = golden["folder_sizes_in_visit_order"]
    offsets = np.cumsum([0] + sizes[:-1])
    random.seed(1234)
    state = random.getstate()
    for trial in (0, 1, 2):
        chosen = dm.sample_gallery_indices(sizes, trial) - offsets
        assert chosen.tolist() == golden["chosen_index_in_sorted_listing"][f"trial{trial}"]
    assert random.getstate() == state


def test_single_shot_equals_global_random_choice_stream():
    sizes = [1, 4, 9, 2, 17, 1, 1, 30]
    for trial in range(10):
        random.seed(trial)
        expected, offset = [], 0
        for n in sizes:
            expected.append(offset + random.choice(list(range(n))))
            offset += n
        assert dm.sample_gallery_indices(sizes, trial).tolist() == expected


def test_multi_shot_is_deterministic_sorted_and_capped():
    sizes = [3, 25, 10, 1, 14]
    a = dm.sample_gallery_indices(sizes, 4, shots=10)
    assert a.tolist() == dm.sample_gallery_indices(sizes, 4, shots=10).tolist()
    assert a.tolist() != dm.sample_gallery_indices(sizes, 5, shots=10).tolist()
    offsets = np.cumsum([0] + sizes)
    for k, n in enumerate(sizes):
        inside = a[(a >= offsets[k]) & (a < offsets[k + 1])]
        assert len(inside) == min(10, n)
        assert np.all(np.diff(inside) > 0)  # distinct, in listing order
    assert len(a) == 3 + 10 + 10 + 1 + 10
    with pytest.raises(ValueError):
        dm.sample_gallery_indices(sizes, 0, shots=0)


# ----------------------------------------------------------------------------------------------------------
# Parsing and readers


def test_parse_cam_pid_uses_path_components():
    assert dm.parse_cam_pid("/data/camera/cams/SYSU-MM01/cam3/0012/0001.jpg") == (3, 12)
    assert dm.parse_cam_pid("/x/camcam/LLCM/test_nir/cam9/0533/0533_c09_s1_f2_nir.jpg") == (9, 533)
    assert dm.parse_cam_pid("relative/cam12/0007/a.jpg") == (12, 7)  # multi-digit camera (clean fix)
    for bad in ("/data/cam3/12/0001.jpg", "/data/camera3/0012/x.jpg", "0001.jpg"):
        with pytest.raises(dm.DatasetError, match="cannot parse.*" + bad.replace(".", r"\.")):
            dm.parse_cam_pid(bad)


def test_read_id_file_first_line_only(tmp_path):
    path = str(tmp_path / "ids.txt")
    write(path, "5,1, 17,\n99,100\n")
    assert dm.read_id_file(path) == [5, 1, 17]


@pytest.mark.parametrize("content, problem", [("", "empty id file"), ("1,x,3\n", "malformed id file"),
                                              ("1,2,1\n", "duplicate ids")])
def test_read_id_file_errors_name_the_file(tmp_path, content, problem):
    path = str(tmp_path / "exp" / "test_id.txt")
    write(path, content)
    with pytest.raises(dm.DatasetError, match=problem) as err:
        dm.read_id_file(path)
    assert path in str(err.value)


def test_read_idx_file(tmp_path):
    path = str(tmp_path / "idx.txt")
    write(path, "Visible/1/a.bmp 0\nVisible/1/b.bmp 0\n\nThermal/2/c d.bmp 1\n")
    paths, labels = dm.read_idx_file(path)
    assert paths == ["Visible/1/a.bmp", "Visible/1/b.bmp", "Thermal/2/c d.bmp"]
    assert labels.dtype == np.int64 and labels.tolist() == [0, 0, 1]


@pytest.mark.parametrize("line", ["Visible/1/a.bmp", "Visible/1/a.bmp zero", " 3"])
def test_read_idx_file_malformed_line(tmp_path, line):
    path = str(tmp_path / "idx" / "train_visible_1.txt")
    write(path, "Visible/1/ok.bmp 0\n" + line + "\n")
    with pytest.raises(dm.DatasetError, match="malformed idx line 2") as err:
        dm.read_idx_file(path)
    assert path in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# SYSU listings


def test_sysu_query_order_and_labels(sysu_tree):
    paths, pids, cams = dm.process_query_sysu(sysu_tree, "all")
    assert rel(paths, sysu_tree) == [
        "cam3/0003/0001.jpg", "cam3/0003/0002.jpg",
        "cam6/0007/0001.jpg", "cam6/0007/0003.jpg",
        "cam3/0012/0001.jpg", "cam6/0012/0007.jpg"]
    assert pids.tolist() == [3, 3, 7, 7, 12, 12] and cams.tolist() == [3, 3, 6, 6, 3, 6]
    assert pids.dtype == np.int64 and cams.dtype == np.int64
    assert dm.process_query_sysu(sysu_tree, "indoor")[0] == paths


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_gallery_matches_official_transcription(sysu_tree, mode):
    for trial in range(10):
        paths, pids, cams = dm.process_gallery_sysu(sysu_tree, mode, trial)
        official = official_gallery_sysu(sysu_tree, mode, trial)
        assert [os.path.normpath(p) for p in paths] == [os.path.normpath(p) for p in official[0]]
        assert pids.tolist() == official[1] and cams.tolist() == official[2]
    expected_folders = 5 if mode == "all" else 3
    assert len(dm.process_gallery_sysu(sysu_tree, mode, 0)[0]) == expected_folders


def test_sysu_multi_shot_gallery(sysu_tree):
    paths, pids, cams = dm.process_gallery_sysu(sysu_tree, "all", 3, shots=10)
    # every RGB image of the test ids (no folder holds more than 10)
    assert len(paths) == 3 + 1 + 2 + 2 + 4
    assert paths == dm.process_gallery_sysu(sysu_tree, "all", 3, shots=10)[0]
    assert len(dm.process_gallery_sysu(sysu_tree, "all", 3, shots=2)[0]) == 2 + 1 + 2 + 2 + 2


def test_sysu_training_files_order_and_labels(sysu_tree):
    rgb, ir = dm.sysu_training_files(sysu_tree)
    assert rel(rgb, sysu_tree) == ["cam1/0001/0001.jpg", "cam2/0002/0001.jpg", "cam5/0002/0001.jpg",
                                   "cam5/0002/0002.jpg", "cam4/0020/0001.jpg"]
    assert rel(ir, sysu_tree) == ["cam3/0001/0001.jpg", "cam3/0001/0002.jpg", "cam6/0002/0001.jpg",
                                  "cam3/0020/0001.jpg"]
    rgb_labels, ir_labels = dm.sysu_training_labels(rgb, ir)
    assert rgb_labels.tolist() == [0, 1, 1, 1, 2] and ir_labels.tolist() == [0, 0, 1, 2]
    rgb_only_train, _ = dm.sysu_training_files(sysu_tree, use_val=False)
    assert len(rgb_only_train) == 4
    assert dm.sysu_val_ids(sysu_tree) == [1]


def test_sysu_protocol_indexes_candidates_like_process_gallery(sysu_tree):
    proto = dm.sysu_protocol(sysu_tree, "all", trials=range(4))
    assert proto.name == "sysu-all-single" and proto.metric == "sysu" and not proto.transpose
    assert (proto.query_modal, proto.gallery_modal) == (2, 1)
    assert len(proto.gallery_paths) == 12  # every RGB image of the test ids, once
    assert proto.query_paths == dm.process_query_sysu(sysu_tree)[0]
    assert proto.trials == [0, 1, 2, 3]
    for trial, idx in zip(proto.trials, proto.trial_indices):
        paths, pids, cams = dm.process_gallery_sysu(sysu_tree, "all", trial)
        assert [proto.gallery_paths[i] for i in idx] == paths
        assert proto.gallery_pids[idx].tolist() == pids.tolist()
        assert proto.gallery_cams[idx].tolist() == cams.tolist()
    indoor = dm.sysu_protocol(sysu_tree, "indoor", trials=[0], shots=10)
    assert indoor.name == "sysu-indoor-multi10"
    assert set(indoor.gallery_cams.tolist()) == {1, 2} and len(indoor.trial_indices[0]) == 6


# ----------------------------------------------------------------------------------------------------------
# SYSU validation errors: DatasetError naming the problem and the path


def test_sysu_missing_root(tmp_path):
    missing = str(tmp_path / "nowhere" / "SYSU-MM01")
    for call in (lambda: dm.process_query_sysu(missing), lambda: dm.sysu_training_files(missing)):
        with pytest.raises(dm.DatasetError, match="missing SYSU-MM01 dataset root") as err:
            call()
        assert missing in str(err.value)


@pytest.mark.parametrize("name", ["train_id.txt", "val_id.txt"])
def test_sysu_missing_training_id_file(sysu_tree, name):
    path = os.path.join(sysu_tree, "exp", name)
    os.remove(path)
    with pytest.raises(dm.DatasetError, match="missing id file") as err:
        dm.sysu_training_files(sysu_tree)
    assert path in str(err.value)
    dm.process_query_sysu(sysu_tree)  # the test side does not need it


def test_sysu_missing_test_id_file(sysu_tree):
    path = os.path.join(sysu_tree, "exp", "test_id.txt")
    os.remove(path)
    with pytest.raises(dm.DatasetError, match="missing id file") as err:
        dm.process_gallery_sysu(sysu_tree, "all", 0)
    assert path in str(err.value)


def test_sysu_missing_camera_folder(tmp_path):
    folders = {k: v for k, v in SYSU_FOLDERS.items() if k[0] != "cam5"}
    data = make_sysu_tree(str(tmp_path), folders)
    os.rmdir(os.path.join(data, "cam5"))
    with pytest.raises(dm.DatasetError, match="missing camera folder") as err:
        dm.sysu_training_files(data)
    assert os.path.join(data, "cam5") in str(err.value)


def test_sysu_identity_without_ir_images(tmp_path):
    folders = dict(SYSU_FOLDERS)
    del folders[("cam6", 2)]
    data = make_sysu_tree(str(tmp_path), folders)
    with pytest.raises(dm.DatasetError, match="identity 0002 has no IR images") as err:
        dm.sysu_training_files(data)
    assert data in str(err.value)


def test_sysu_identity_without_rgb_images(tmp_path):
    folders = dict(SYSU_FOLDERS)
    del folders[("cam4", 20)]
    data = make_sysu_tree(str(tmp_path), folders)
    with pytest.raises(dm.DatasetError, match="identity 0020 has no RGB images"):
        dm.sysu_training_files(data)


def test_sysu_train_val_overlap(tmp_path):
    data = make_sysu_tree(str(tmp_path), val_ids="1,2")
    with pytest.raises(dm.DatasetError, match="both train_id.txt and val_id.txt"):
        dm.sysu_training_files(data)


def test_sysu_empty_identity_folder(sysu_tree):
    empty = os.path.join(sysu_tree, "cam2", "0012")
    os.makedirs(empty)
    with pytest.raises(dm.DatasetError, match="empty identity folder") as err:
        dm.process_gallery_sysu(sysu_tree, "all", 0)
    assert empty in str(err.value)


def test_sysu_no_query_images(tmp_path):
    data = make_sysu_tree(str(tmp_path), test_ids="300,301")
    with pytest.raises(dm.DatasetError, match="no SYSU query") as err:
        dm.process_query_sysu(data)
    assert data in str(err.value)
    with pytest.raises(dm.DatasetError, match="no SYSU all-search gallery"):
        dm.process_gallery_sysu(data, "all", 0)


def test_bad_arguments_are_value_errors(sysu_tree):
    with pytest.raises(ValueError, match="'all' or 'indoor'"):
        dm.process_gallery_sysu(sysu_tree, "outdoor", 0)
    with pytest.raises(ValueError, match="1 .visible. or 2"):
        dm.process_query_llcm(sysu_tree, 3)
    with pytest.raises(ValueError, match="'visible' or 'thermal'"):
        dm.process_test_regdb(sysu_tree, 1, "infrared")


# ----------------------------------------------------------------------------------------------------------
# RegDB


def make_regdb_tree(root, train_labels=(0, 0, 1, 1, 2), ir_labels=None):
    data = os.path.join(root, "cam_regdb", "RegDB")
    ir_labels = train_labels if ir_labels is None else ir_labels
    for split, labels_by_modal in (("train", (train_labels, ir_labels)), ("test", ((0, 1, 1), (1, 0, 1)))):
        for modal, folder, labels in (("visible", "Visible", labels_by_modal[0]),
                                      ("thermal", "Thermal", labels_by_modal[1])):
            lines = []
            for k, label in enumerate(labels):
                relpath = f"{folder}/{split}{label}/img_{k}.bmp"
                touch(os.path.join(data, relpath))
                lines.append(f"{relpath} {label}\n")
            write(os.path.join(data, "idx", f"{split}_{modal}_4.txt"), "".join(lines))
    return data


def test_regdb_test_lists_keep_file_order(tmp_path):
    data = make_regdb_tree(str(tmp_path))
    paths, labels = dm.process_test_regdb(data, 4, "thermal")
    assert rel(paths, data) == ["Thermal/test1/img_0.bmp", "Thermal/test0/img_1.bmp", "Thermal/test1/img_2.bmp"]
    assert labels.tolist() == [1, 0, 1]
    vis_paths, vis_labels = dm.process_test_regdb(data, trial=4, modal="visible")
    assert vis_labels.tolist() == [0, 1, 1] and all(os.path.isfile(p) for p in vis_paths)


def test_regdb_training_lists(tmp_path):
    data = make_regdb_tree(str(tmp_path))
    rgb, rgb_labels, ir, ir_labels = dm.regdb_training_lists(data, 4)
    assert len(rgb) == len(ir) == 5 and rgb_labels.tolist() == [0, 0, 1, 1, 2]
    assert rel(rgb, data)[0] == "Visible/train0/img_0.bmp"


def test_regdb_protocol_both_directions(tmp_path):
    data = make_regdb_tree(str(tmp_path))
    v2t = dm.regdb_protocol(data, 4)
    assert v2t.name == "regdb-trial4-v2t" and v2t.metric == "regdb" and not v2t.transpose
    assert (v2t.query_modal, v2t.gallery_modal) == (1, 2)
    assert v2t.query_pids.tolist() == [0, 1, 1] and v2t.gallery_pids.tolist() == [1, 0, 1]
    assert v2t.trials == [4] and v2t.trial_indices[0].tolist() == [0, 1, 2]
    t2v = dm.regdb_protocol(data, 4, tvsearch=True)
    assert t2v.name == "regdb-trial4-t2v" and t2v.transpose
    assert t2v.query_paths == v2t.query_paths and t2v.gallery_paths == v2t.gallery_paths


@pytest.mark.parametrize("rgb_labels, ir_labels, problem", [
    ((0, 0, 2, 2), (0, 0, 2, 2), "not contiguous"),
    ((1, 1, 2), (1, 1, 2), "not contiguous"),
    ((0, 1, 2), (0, 1, 1), "differ between modalities"),
])
def test_regdb_label_validation_q06(tmp_path, rgb_labels, ir_labels, problem):
    data = make_regdb_tree(str(tmp_path), rgb_labels, ir_labels)
    with pytest.raises(dm.DatasetError, match=problem) as err:
        dm.regdb_training_lists(data, 4)
    assert os.path.join(data, "idx", "train_visible_4.txt") in str(err.value)


def test_regdb_missing_idx_and_images(tmp_path):
    data = make_regdb_tree(str(tmp_path))
    with pytest.raises(dm.DatasetError, match="missing idx file") as err:
        dm.process_test_regdb(data, 7, "visible")
    assert os.path.join(data, "idx", "test_visible_7.txt") in str(err.value)
    os.remove(os.path.join(data, "Thermal", "train1", "img_3.bmp"))
    with pytest.raises(dm.DatasetError, match="do not exist") as err:
        dm.regdb_training_lists(data, 4)
    assert "img_3.bmp" in str(err.value)
    with pytest.raises(dm.DatasetError, match="missing RegDB dataset root"):
        dm.regdb_training_lists(str(tmp_path / "none"), 1)


def test_regdb_empty_idx_file(tmp_path):
    data = make_regdb_tree(str(tmp_path))
    path = os.path.join(data, "idx", "test_thermal_4.txt")
    write(path, "\n")
    with pytest.raises(dm.DatasetError, match="empty idx file") as err:
        dm.process_test_regdb(data, 4, "thermal")
    assert path in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# LLCM


def make_llcm_tree(root):
    data = os.path.join(root, "camera", "LLCM")
    for modal_dir in ("test_vis", "test_nir"):
        for k in range(1, 10):
            os.makedirs(os.path.join(data, modal_dir, f"cam{k}"), exist_ok=True)
    files = [("test_vis", 1, 5, "b"), ("test_vis", 1, 5, "a"), ("test_vis", 9, 5, "a"), ("test_vis", 3, 5, "a"),
             ("test_vis", 2, 8, "a"), ("test_nir", 4, 5, "a"), ("test_nir", 4, 5, "c"), ("test_nir", 1, 8, "a"),
             ("test_nir", 3, 8, "ignored"), ("test_vis", 1, 77, "not_a_test_id")]
    for modal_dir, cam, pid, stem in files:
        name = f"{pid:04d}_c{cam:02d}_s1_f1_{stem}.jpg"
        touch(os.path.join(data, modal_dir, f"cam{cam}", "%04d" % pid, name))
    write(os.path.join(data, "idx", "test_id.txt"), "8,5\n")
    for modal in ("vis", "nir"):
        lines = []
        for label, pid in enumerate((2, 6)):
            relpath = f"train_{modal}/cam1/{pid:04d}/x.jpg"
            touch(os.path.join(data, relpath))
            lines.append(f"{relpath} {label}\n")
        write(os.path.join(data, "idx", f"train_{modal}.txt"), "".join(lines))
    return data


def test_llcm_query_orders_and_nir_cam3_is_skipped(tmp_path):
    data = make_llcm_tree(str(tmp_path))
    paths, pids, cams = dm.process_query_llcm(data, 1)
    assert [os.path.basename(p) for p in paths] == [
        "0005_c01_s1_f1_a.jpg", "0005_c01_s1_f1_b.jpg", "0005_c03_s1_f1_a.jpg", "0005_c09_s1_f1_a.jpg",
        "0008_c02_s1_f1_a.jpg"]
    assert pids.tolist() == [5, 5, 5, 5, 8] and cams.tolist() == [1, 1, 3, 9, 2]
    nir_paths, nir_pids, nir_cams = dm.process_query_llcm(data, mode=2)
    assert nir_cams.tolist() == [4, 4, 1] and nir_pids.tolist() == [5, 5, 8]


def test_llcm_gallery_sampling_and_protocols(tmp_path):
    data = make_llcm_tree(str(tmp_path))
    paths, pids, cams = dm.process_gallery_llcm(data, 1, 0)
    assert pids.tolist() == [5, 5, 5, 8] and cams.tolist() == [1, 3, 9, 2]
    random.seed(0)
    first = random.choice(["0005_c01_s1_f1_a.jpg", "0005_c01_s1_f1_b.jpg"])
    assert os.path.basename(paths[0]) == first

    ir2vis = dm.llcm_protocol(data, "ir2vis", trials=range(3))
    assert ir2vis.name == "llcm-ir2vis-single" and ir2vis.metric == "llcm" and not ir2vis.transpose
    assert (ir2vis.query_modal, ir2vis.gallery_modal) == (2, 1)
    assert len(ir2vis.query_paths) == 3 and len(ir2vis.gallery_paths) == 5
    for trial, idx in zip(ir2vis.trials, ir2vis.trial_indices):
        assert [ir2vis.gallery_paths[i] for i in idx] == dm.process_gallery_llcm(data, 1, trial)[0]

    vis2ir = dm.llcm_protocol(data, "vis2ir", trials=[0])
    assert (vis2ir.query_modal, vis2ir.gallery_modal) == (1, 2) and not vis2ir.transpose
    assert len(vis2ir.query_paths) == 5 and len(vis2ir.trial_indices[0]) == 2
    deen = dm.llcm_protocol(data, "vis2ir", trials=[0], deen_transposed=True)
    assert deen.transpose and deen.name == "llcm-vis2ir-single-deen"
    with pytest.raises(ValueError, match="vis2ir"):
        dm.llcm_protocol(data, "ir2vis", deen_transposed=True)
    with pytest.raises(ValueError, match="direction"):
        dm.llcm_protocol(data, "v2t")


def test_llcm_training_lists_and_errors(tmp_path):
    data = make_llcm_tree(str(tmp_path))
    rgb, rgb_labels, ir, ir_labels = dm.llcm_training_lists(data)
    assert rgb_labels.tolist() == ir_labels.tolist() == [0, 1]
    assert rel(ir, data) == ["train_nir/cam1/0002/x.jpg", "train_nir/cam1/0006/x.jpg"]
    os.remove(os.path.join(data, "idx", "train_nir.txt"))
    with pytest.raises(dm.DatasetError, match="missing idx file") as err:
        dm.llcm_training_lists(data)
    assert os.path.join(data, "idx", "train_nir.txt") in str(err.value)
    os.rmdir(os.path.join(data, "test_nir", "cam7"))
    with pytest.raises(dm.DatasetError, match="missing camera folder") as err:
        dm.process_query_llcm(data, 2)
    assert os.path.join(data, "test_nir", "cam7") in str(err.value)
    os.remove(os.path.join(data, "idx", "test_id.txt"))
    with pytest.raises(dm.DatasetError, match="missing id file"):
        dm.process_query_llcm(data, 1)


# ----------------------------------------------------------------------------------------------------------
# Protocol sizes on the synthetic trees


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cam_synthetic"))  # "cam" in the root on purpose
    return {"sysu": make_sysu(root), "regdb": make_regdb(root), "llcm": make_llcm(root)}


def count_files(folder):
    return len(os.listdir(folder)) if os.path.isdir(folder) else 0


def test_protocol_sizes_on_synthetic_sysu(synthetic_root):
    data = synthetic_root["sysu"]
    test_ids = dm.read_id_file(os.path.join(data, "exp", "test_id.txt"))
    folders = {(cam, pid): count_files(os.path.join(data, cam, "%04d" % pid))
               for cam in dm.SYSU_ALL_CAMS for pid in test_ids}
    for mode, cams in (("all", dm.SYSU_RGB_CAMS), ("indoor", dm.SYSU_INDOOR_CAMS)):
        proto = dm.sysu_protocol(data, mode)
        assert len(proto.query_paths) == sum(n for (c, _), n in folders.items() if c in dm.SYSU_IR_CAMS)
        assert len(proto.gallery_paths) == sum(n for (c, _), n in folders.items() if c in cams)
        existing = sum(1 for (c, _), n in folders.items() if c in cams and n > 0)
        assert len(proto.trial_indices) == 10 and all(len(i) == existing for i in proto.trial_indices)
        assert set(proto.gallery_pids.tolist()) == set(test_ids)  # every test id is in both galleries
        assert set(proto.query_pids.tolist()) == set(test_ids)


def test_protocol_sizes_on_synthetic_regdb_and_llcm(synthetic_root):
    for trial in (1, 10):
        proto = dm.regdb_protocol(synthetic_root["regdb"], trial)
        assert len(proto.query_paths) == len(proto.gallery_paths) == 10 * 4
    data = synthetic_root["llcm"]
    test_ids = dm.read_id_file(os.path.join(data, "idx", "test_id.txt"))
    vis_folders = sum(count_files(os.path.join(data, "test_vis", c, "%04d" % p)) > 0
                      for c in dm.LLCM_VIS_CAMS for p in test_ids)
    proto = dm.llcm_protocol(data, "ir2vis", trials=range(2))
    assert all(len(idx) == vis_folders for idx in proto.trial_indices)
    assert len(proto.query_paths) == sum(count_files(os.path.join(data, "test_nir", c, "%04d" % p))
                                         for c in dm.LLCM_NIR_CAMS for p in test_ids)
