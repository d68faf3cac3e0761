"""pre_process_sysu.py: byte-identity with the official loop, one-line errors, nothing half-written left."""
import io
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import data_loader
import pre_process_sysu
from conftest import ROOT
from tools.make_synthetic import make_sysu

H, W = 128, 64
ARGS = ["--img-h", str(H), "--img-w", str(W)]
OUTPUTS = sorted(pre_process_sysu.OUTPUT_FILES.values())


@pytest.fixture(scope="module")
def pristine_sysu(tmp_path_factory):
    return make_sysu(str(tmp_path_factory.mktemp("sysu")), size="test", seed=0)


@pytest.fixture
def sysu(pristine_sysu, tmp_path):
    """A private copy that a test may damage."""
    return shutil.copytree(pristine_sysu, str(tmp_path / "SYSU-MM01"))


def official_npy_bytes(data_path, img_h, img_w):
    """Literal transcription of the official pre_process_sysu.py (oracle): {file name: bytes}."""
    rgb_cameras = ["cam1", "cam2", "cam4", "cam5"]
    ir_cameras = ["cam3", "cam6"]

    def read_ids(name):
        with open(os.path.join(data_path, "exp", name), "r") as file:
            ids = file.read().splitlines()
            ids = [int(y) for y in ids[0].split(",")]
            return ["%04d" % x for x in ids]

    id_train = read_ids("train_id.txt")
    id_train.extend(read_ids("val_id.txt"))
    files_rgb, files_ir = [], []
    for id in sorted(id_train):
        for cam in rgb_cameras:
            img_dir = os.path.join(data_path, cam, id)
            if os.path.isdir(img_dir):
                files_rgb.extend(sorted([img_dir + "/" + i for i in os.listdir(img_dir)]))
        for cam in ir_cameras:
            img_dir = os.path.join(data_path, cam, id)
            if os.path.isdir(img_dir):
                files_ir.extend(sorted([img_dir + "/" + i for i in os.listdir(img_dir)]))
    pid_container = set()
    for img_path in files_ir:
        pid_container.add(int(img_path[-13:-9]))
    pid2label = {pid: label for label, pid in enumerate(pid_container)}

    def read_imgs(train_image):
        train_img, train_label = [], []
        for img_path in train_image:
            img = Image.open(img_path)
            img = img.resize((img_w, img_h), Image.LANCZOS)
            train_img.append(np.array(img))
            train_label.append(pid2label[int(img_path[-13:-9])])
        return np.array(train_img), np.array(train_label)

    out = {}
    for modality, files in (("rgb", files_rgb), ("ir", files_ir)):
        images, labels = read_imgs(files)
        for kind, array in (("img", images), ("label", labels)):
            buffer = io.BytesIO()
            np.save(buffer, array)
            out[f"train_{modality}_resized_{kind}.npy"] = buffer.getvalue()
    return out


def produced_bytes(data_path):
    return {name: open(os.path.join(data_path, name), "rb").read() for name in OUTPUTS}


def tree_listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def run_cli(args, **kw):
    return subprocess.run([sys.executable, os.path.join(ROOT, "pre_process_sysu.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def assert_one_error_line(stderr, *needles):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- success -------------------------------------------------------------------------------------------

def test_in_process_run_is_byte_identical_to_official_loop(sysu, capsys):
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    assert produced_bytes(sysu) == official_npy_bytes(sysu, H, W)
    out = capsys.readouterr().out
    assert "RGB" in out and os.path.join(sysu, "train_rgb_resized_img.npy") in out


def test_cli_with_worker_processes_is_byte_identical_and_leaves_only_the_four_files(sysu):
    before = tree_listing(sysu)
    result = run_cli(["--data-path", sysu, "--workers", "2", "--img-h", "96", "--img-w", "48"])
    assert result.returncode == 0, result.stderr
    assert tree_listing(sysu) == sorted(before + OUTPUTS)
    assert produced_bytes(sysu) == official_npy_bytes(sysu, 96, 48)


def test_small_write_windows_give_identical_bytes(sysu, monkeypatch):
    # the output is re-mapped every WINDOW_BYTES; force many windows, including a ragged last one
    monkeypatch.setattr(pre_process_sysu, "WINDOW_BYTES", 5 * H * W * 3 + 7)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    assert produced_bytes(sysu) == official_npy_bytes(sysu, H, W)


def test_labels_are_ranks_of_sorted_ir_pids(sysu):
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    rgb = np.load(os.path.join(sysu, "train_rgb_resized_label.npy"))
    ir = np.load(os.path.join(sysu, "train_ir_resized_label.npy"))
    assert rgb.dtype == ir.dtype == np.int64
    assert set(ir.tolist()) == set(range(ir.max() + 1)) == set(rgb.tolist())
    assert np.all(np.diff(ir) >= 0) and np.all(np.diff(rgb) >= 0)    # ids are visited in ascending order


def test_output_names_match_the_training_loader():
    assert pre_process_sysu.OUTPUT_FILES == data_loader.SYSU_NPY_FILES


# --- errors: one line, exit 2, nothing written ------------------------------------------------------------

def first_training_id(sysu):
    with open(os.path.join(sysu, "exp", "train_id.txt")) as f:
        return "%04d" % int(f.readline().split(",")[0])


def first_training_image(sysu):
    folder = os.path.join(sysu, "cam1", first_training_id(sysu))
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def remove_exp_file(sysu, name):
    os.remove(os.path.join(sysu, "exp", name))
    return name


def remove_camera(sysu, cam):
    shutil.rmtree(os.path.join(sysu, cam))
    return cam


def remove_ir_of_first_id(sysu):
    pid = first_training_id(sysu)
    for cam in ("cam3", "cam6"):
        shutil.rmtree(os.path.join(sysu, cam, pid), ignore_errors=True)
    return pid


def corrupt_image(sysu):
    path = first_training_image(sysu)
    with open(path, "wb") as f:
        f.write(b"this is not a jpeg")
    return path


def truncate_image(sysu):
    path = first_training_image(sysu)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    return path


DAMAGE = {
    "missing train_id.txt": lambda s: remove_exp_file(s, "train_id.txt"),
    "missing val_id.txt": lambda s: remove_exp_file(s, "val_id.txt"),
    "missing IR camera": lambda s: remove_camera(s, "cam6"),
    "missing RGB camera": lambda s: remove_camera(s, "cam4"),
    "identity without IR images": remove_ir_of_first_id,
    "corrupt image": corrupt_image,
    "truncated image": truncate_image,
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_bad_input_gives_one_error_line_exit_2_and_no_files(sysu, case, capsys):
    needle = DAMAGE[case](sysu)
    before = tree_listing(sysu)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 2
    assert_one_error_line(capsys.readouterr().err, needle)
    assert tree_listing(sysu) == before


def test_write_failure_gives_one_error_line_and_no_files(sysu, monkeypatch, capsys):
    before = tree_listing(sysu)
    real_save = pre_process_sysu._save_npy

    def disk_full(path, array):
        real_save(path, array)       # the partial file exists when the failure hits
        raise OSError(28, "No space left on device", path)

    monkeypatch.setattr(pre_process_sysu, "_save_npy", disk_full)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 2
    assert_one_error_line(capsys.readouterr().err, "No space left on device", "train_rgb_resized_label.npy")
    assert tree_listing(sysu) == before


def test_cli_corrupt_image_in_worker_process_one_line_no_traceback(sysu):
    path = corrupt_image(sysu)
    before = tree_listing(sysu)
    result = run_cli(["--data-path", sysu, "--workers", "2", *ARGS])
    assert result.returncode == 2
    assert_one_error_line(result.stderr, path)
    assert tree_listing(sysu) == before


def test_cli_missing_dataset_root(tmp_path):
    missing = str(tmp_path / "nope")
    result = run_cli(["--data-path", missing, *ARGS])
    assert result.returncode == 2
    assert_one_error_line(result.stderr, missing)


# --- interruption -----------------------------------------------------------------------------------------

def test_interrupt_in_process_removes_partial_files_and_keeps_previous_outputs(sysu, monkeypatch, capsys):
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    previous = produced_bytes(sysu)
    before = tree_listing(sysu)
    real_decode, calls = pre_process_sysu._decode, []

    def decode_then_interrupt(task):
        calls.append(task)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_decode(task)

    monkeypatch.setattr(pre_process_sysu, "_decode", decode_then_interrupt)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", "--img-h", "96", "--img-w", "48"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert tree_listing(sysu) == before                 # no *.partial left behind
    assert produced_bytes(sysu) == previous             # old complete files untouched


SLOW_RUN = """
import sys, time
from PIL import Image
real_resize = Image.Image.resize
def slow_resize(self, *a, **k):
    time.sleep(0.05)
    return real_resize(self, *a, **k)
Image.Image.resize = slow_resize      # inherited by the forked decoding workers
sys.path.insert(0, {root!r})
import pre_process_sysu
sys.exit(pre_process_sysu.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_parallel_write_leaves_no_valid_looking_file(sysu, sig):
    before = tree_listing(sysu)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(root=ROOT), "--data-path", sysu,
                             "--workers", "2", *ARGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = os.path.join(sysu, "train_rgb_resized_img.npy" + pre_process_sysu.PARTIAL_SUFFIX)
    deadline = time.time() + 60
    while not os.path.exists(partial) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert os.path.exists(partial), "the run never started writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert tree_listing(sysu) == before
