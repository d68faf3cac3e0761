"""pre_process_sysu.py: byte-identity with the official loop, one-line errors, nothing half-written left."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

import data_manager
import pre_process_sysu
from conftest import ROOT
from tools.make_synthetic import make_sysu

H, W = 128, 64
ARGS = ["--img-h", str(H), "--img-w", str(W)]
OUTPUTS = data_manager.sysu_npy_files(H, W)   # the cache of size H x W


@pytest.fixture(scope="module")
def pristine_sysu(tmp_path_factory):
    return make_sysu(str(tmp_path_factory.mktemp("sysu")), size="test", seed=0)


@pytest.fixture
def sysu(pristine_sysu, tmp_path):
    """A private copy that a test may damage."""
    return shutil.copytree(pristine_sysu, str(tmp_path / "SYSU-MM01"))


def official_pre_process(data_path, out_prefix, fix_image_height, fix_image_width):
    """Line-by-line transcription of the official pre_process_sysu.py, its comments left out (the oracle;
    bench/bench_preprocess.py runs it as the speed and memory baseline, so its order of work and the
    lifetime of its arrays are kept). Only the hard-coded dataset root and image size became arguments,
    ANTIALIAS became LANCZOS (same filter, Q-03), and the files go to `out_prefix + name` (the official
    script writes to `data_path + name`)."""
    rgb_cameras = ['cam1', 'cam2', 'cam4', 'cam5']
    ir_cameras = ['cam3', 'cam6']

    file_path_train = os.path.join(data_path, 'exp/train_id.txt')
    file_path_val = os.path.join(data_path, 'exp/val_id.txt')
    with open(file_path_train, 'r') as file:
        ids = file.read().splitlines()
        ids = [int(y) for y in ids[0].split(',')]
        id_train = ["%04d" % x for x in ids]

    with open(file_path_val, 'r') as file:
        ids = file.read().splitlines()
        ids = [int(y) for y in ids[0].split(',')]
        id_val = ["%04d" % x for x in ids]

    id_train.extend(id_val)

    files_rgb = []
    files_ir = []
    for id in sorted(id_train):
        for cam in rgb_cameras:
            img_dir = os.path.join(data_path, cam, id)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + '/' + i for i in os.listdir(img_dir)])
                files_rgb.extend(new_files)

        for cam in ir_cameras:
            img_dir = os.path.join(data_path, cam, id)
            if os.path.isdir(img_dir):
                new_files = sorted([img_dir + '/' + i for i in os.listdir(img_dir)])
                files_ir.extend(new_files)

    pid_container = set()
    for img_path in files_ir:
        pid = int(img_path[-13:-9])
        pid_container.add(pid)
    pid2label = {pid: label for label, pid in enumerate(pid_container)}

    def read_imgs(train_image):
        train_img = []
        train_label = []
        for img_path in train_image:
            img = Image.open(img_path)
            img = img.resize((fix_image_width, fix_image_height), Image.LANCZOS)
            pix_array = np.array(img)

            train_img.append(pix_array)

            pid = int(img_path[-13:-9])
            pid = pid2label[pid]
            train_label.append(pid)
        return np.array(train_img), np.array(train_label)

    train_img, train_label = read_imgs(files_rgb)
    np.save(out_prefix + 'train_rgb_resized_img.npy', train_img)
    np.save(out_prefix + 'train_rgb_resized_label.npy', train_label)

    train_img, train_label = read_imgs(files_ir)
    np.save(out_prefix + 'train_ir_resized_img.npy', train_img)
    np.save(out_prefix + 'train_ir_resized_label.npy', train_label)


def official_npy_bytes(data_path, img_h, img_w):
    """{file key: bytes} of the official script's output (its unsized names)."""
    with tempfile.TemporaryDirectory() as out:
        official_pre_process(data_path, out + os.sep, img_h, img_w)
        return read_bytes(out, data_manager.SYSU_NPY_FILES)


def produced_bytes(data_path, img_h=H, img_w=W):
    """{file key: bytes} of our output of size img_h x img_w."""
    return read_bytes(data_path, data_manager.sysu_npy_files(img_h, img_w))


def read_bytes(data_path, names):
    return {key: open(os.path.join(data_path, name), "rb").read() for key, name in names.items()}


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
    assert "RGB" in out and os.path.join(sysu, OUTPUTS["rgb_img"]) in out


def test_cli_with_worker_processes_is_byte_identical_and_leaves_only_the_four_files(sysu):
    before = tree_listing(sysu)
    result = run_cli(["--data-path", sysu, "--workers", "2", "--img-h", "96", "--img-w", "48"])
    assert result.returncode == 0, result.stderr
    assert tree_listing(sysu) == sorted(before + list(data_manager.sysu_npy_files(96, 48).values()))
    assert produced_bytes(sysu, 96, 48) == official_npy_bytes(sysu, 96, 48)


@pytest.mark.parametrize("workers", [0, 2])
def test_small_ragged_chunks_written_out_of_order_give_identical_bytes(sysu, monkeypatch, workers):
    # images go out in chunks of CHUNK_IMAGES, finished in any order by the workers; force many chunks,
    # with a ragged last one in each modality (97 RGB and 51 IR images are not multiples of 5)
    monkeypatch.setattr(pre_process_sysu, "CHUNK_IMAGES", 5)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", str(workers), *ARGS]) == 0
    assert produced_bytes(sysu) == official_npy_bytes(sysu, H, W)


def test_labels_are_ranks_of_sorted_ir_pids(sysu):
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    rgb = np.load(os.path.join(sysu, OUTPUTS["rgb_label"]))
    ir = np.load(os.path.join(sysu, OUTPUTS["ir_label"]))
    assert rgb.dtype == ir.dtype == np.int64
    assert set(ir.tolist()) == set(range(ir.max() + 1)) == set(rgb.tolist())
    assert np.all(np.diff(ir) >= 0) and np.all(np.diff(rgb) >= 0)    # ids are visited in ascending order


def test_output_names_are_the_official_ones_named_by_size(sysu):
    assert OUTPUTS == {"rgb_img": "train_rgb_resized_img_128x64.npy", "rgb_label": "train_rgb_resized_label_128x64.npy",
                       "ir_img": "train_ir_resized_img_128x64.npy", "ir_label": "train_ir_resized_label_128x64.npy"}
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", "--img-h", "64", "--img-w", "32"]) == 0
    assert data_manager.sysu_cache_sizes(sysu) == [(64, 32), (128, 64)]     # two methods' caches side by side


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


def last_training_image(sysu):
    """The last IR image: every other image is decoded and written before it is reached."""
    return data_manager.sysu_training_files(sysu)[1][-1]


def corrupt_image(sysu, path=None):
    path = path or first_training_image(sysu)
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
    "corrupt last image": lambda s: corrupt_image(s, last_training_image(s)),
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
    assert_one_error_line(capsys.readouterr().err, "No space left on device", OUTPUTS["rgb_label"])
    assert tree_listing(sysu) == before


@pytest.mark.parametrize("which", [first_training_image, last_training_image])
def test_cli_corrupt_image_in_worker_process_one_line_no_traceback(sysu, which):
    path = corrupt_image(sysu, which(sysu))
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

    def decode_then_interrupt(path, img_w, img_h):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_decode(path, img_w, img_h)

    monkeypatch.setattr(pre_process_sysu, "_decode", decode_then_interrupt)
    assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", "--img-h", "96", "--img-w", "48"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert tree_listing(sysu) == before                 # no *.partial left behind
    assert produced_bytes(sysu) == previous             # old complete files untouched


SLOW_RUN = """
import os, signal, sys, time
# An ignored signal stays ignored across fork and exec, so a test runner started with SIGINT ignored (e.g.
# as `cmd &` in a script) would pass that on and this run would never see the signal sent below. Give both
# signals the disposition of a run started from a terminal.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
from PIL import Image
real_resize = Image.Image.resize
def slow_resize(self, *a, **k):
    open({marker!r}, "a").close()     # tells the test that a worker is decoding
    time.sleep(0.05)
    return real_resize(self, *a, **k)
Image.Image.resize = slow_resize      # inherited by the forked decoding workers
sys.path.insert(0, {root!r})
import pre_process_sysu
sys.exit(pre_process_sysu.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_parallel_write_leaves_no_valid_looking_file(sysu, tmp_path, sig):
    before = tree_listing(sysu)
    marker = str(tmp_path / "decoding")       # outside the dataset tree, which must come out unchanged
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(root=ROOT, marker=marker),
                             "--data-path", sysu, "--workers", "2", *ARGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = os.path.join(sysu, OUTPUTS["rgb_img"] + pre_process_sysu.PARTIAL_SUFFIX)
    deadline = time.time() + 60
    while not os.path.exists(marker) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert os.path.exists(marker) and os.path.exists(partial), "the run never started writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert tree_listing(sysu) == before


def test_sigterm_ignored_by_the_caller_stays_ignored(sysu, monkeypatch):
    # like an inherited ignored SIGINT, which Python itself leaves ignored: the caller asked for it
    real_decode, calls = pre_process_sysu._decode, []

    def decode_and_sigterm(path, img_w, img_h):
        calls.append(path)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_decode(path, img_w, img_h)

    monkeypatch.setattr(pre_process_sysu, "_decode", decode_and_sigterm)
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert pre_process_sysu.main(["--data-path", sysu, "--workers", "0", *ARGS]) == 0
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(calls) > 5 and produced_bytes(sysu) == official_npy_bytes(sysu, H, W)
