"""train.py end to end on the synthetic trees (tiny CPU configuration), plus its configuration rules.

The synthetic data and the trained runs are built once per session (`workspace`, `trained`) and shared
with tests/test_test_cli.py, which evaluates the checkpoints these runs write.
"""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
import data_manager
from tools import make_synthetic
import utils

# Smallest configuration every method accepts (IRL: multiples of 16); 1-2 epochs each. The LR is 100x
# below the official one: at 32x16 (a 2x1 layer-3 map) IRL's initial gradients are ~400x larger than at
# 128x64, so at lr 0.1 the weights inflate within a dozen steps, eval-mode features overflow to NaN and
# every ranking would be arbitrary.
TINY = ["--arch", "resnet18", "--img_h", "32", "--img_w", "16", "--no-pretrained", "--device", "cpu",
        "--workers", "0", "--batch-size", "4", "--num_pos", "2", "--lr", "0.001"]
DATASET_DIRS = {"sysu": "SYSU-MM01", "regdb": "RegDB", "llcm": "LLCM"}
# name -> (dataset, model folder, extra flags)
RUNS = {
    "sysu_irl": ("sysu", "sysu", ["--epochs", "1"]),
    "sysu_agw_val": ("sysu", "sysu", ["--method", "agw", "--val", "--epochs", "1"]),
    # AGW on RegDB: even at the low LR the 32x16 IRL model's eval-mode features overflow to NaN on
    # these 40-image RegDB splits, which would make the ranking checks meaningless.
    "regdb_t1": ("regdb", "regdb", ["--method", "agw", "--trial", "1", "--epochs", "2"]),
    "regdb_t2": ("regdb", "regdb", ["--method", "agw", "--trial", "2", "--epochs", "1"]),
    "llcm_irl": ("llcm", "llcm", ["--epochs", "1"]),
}


def load_script(name):
    """Import a top-level script (train.py / test.py) under a private module name (`test` is stdlib's)."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = load_script("train")


# One thread per process: the suite shares 2 cores, and OpenMP oversubscription slows CPU training ~10x.
SCRIPT_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


@pytest.fixture
def one_thread():
    """In-process training runs: one torch thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_script(script, args, cwd, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, env=SCRIPT_ENV)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n"
                             f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


class Workspace:
    def __init__(self, base):
        self.base = base
        self.data = {ds: os.path.join(base, "data", d) for ds, d in DATASET_DIRS.items()}

    def model_path(self, folder):
        return os.path.join(self.base, "runs", folder)

    def train_args(self, dataset, folder, extra):
        return ["--dataset", dataset, "--data-path", self.data[dataset], "--model_path", self.model_path(folder),
                "--log_path", os.path.join(self.base, "logs", folder), *TINY, *extra]


@functools.lru_cache(maxsize=None)
def _build_workspace(base):
    os.makedirs(base, exist_ok=True)
    data = os.path.join(base, "data")
    make_synthetic.make_sysu(data, size="test")
    make_synthetic.make_regdb(data, size="test")
    make_synthetic.make_llcm(data, size="test")
    run_script("pre_process_sysu.py", ["--data-path", os.path.join(data, "SYSU-MM01"), "--img-h", "32",
                                       "--img-w", "16", "--workers", "1"], cwd=base)
    return Workspace(base)


def workspace(tmp_path_factory):
    """Synthetic SYSU-MM01 (preprocessed at 32x16), RegDB and LLCM trees, built once per session."""
    return _build_workspace(str(tmp_path_factory.getbasetemp() / "vireid_e2e"))


@functools.lru_cache(maxsize=None)
def _train(ws, name):
    dataset, folder, extra = RUNS[name]
    start = time.time()
    proc = run_script("train.py", ws.train_args(dataset, folder, extra), cwd=ws.base)
    return proc, time.time() - start


def trained(tmp_path_factory, name):
    """(workspace, finished train.py process, seconds) of one RUNS entry, trained once per session."""
    ws = workspace(tmp_path_factory)
    proc, seconds = _train(ws, name)
    return ws, proc, seconds


def suffix_of(name):
    dataset, _, extra = RUNS[name]
    args = train_script.build_parser().parse_args(["--dataset", dataset, *TINY, *extra])
    config, _ = train_script.resolve_config(args)
    return train_script.run_suffix(config)


def checkpoint(tmp_path_factory, name, kind="best"):
    ws, _, _ = trained(tmp_path_factory, name)
    return os.path.join(ws.model_path(RUNS[name][1]), f"{suffix_of(name)}_{kind}.pth")


def read_metrics(ws, name):
    path = os.path.join(ws.base, "logs", RUNS[name][1], f"{suffix_of(name)}_metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------------------------------
# Configuration (no training)
# --------------------------------------------------------------------------------------------------

def resolve(argv, saved=None):
    return train_script.resolve_config(train_script.build_parser().parse_args(argv), saved)


def test_unset_flags_take_the_methods_official_defaults():
    irl, sources = resolve([])
    assert (irl["method"], irl["img_h"], irl["img_w"], irl["batch_size"], irl["num_pos"]) == ("irl", 384, 192, 6, 4)
    assert (irl["epochs"], irl["loss_tri"], irl["lr_scheduler"], irl["milestones"]) == (150, "QCT", "step",
                                                                                        [25, 90, 120])
    assert irl["amp"] == "cuda" and irl["lr"] == 0.1 and irl["eval_every"] == 1
    assert irl["data_path"] == "./dataset/SYSU-MM01/"           # Q-17 fixed
    assert sources["img_h"] == "irl default" and sources["dataset"] == "default"
    agw, _ = resolve(["--method", "agw", "--dataset", "regdb", "--img_h", "256"])
    assert (agw["img_h"], agw["img_w"], agw["batch_size"], agw["epochs"]) == (256, 144, 8, 81)
    assert (agw["loss_tri"], agw["lr_scheduler"], agw["margin"], agw["amp"]) == ("WRT", "agw", 0.3, False)
    assert agw["data_path"] == "./dataset/RegDB/"


@pytest.mark.parametrize("amp, device, expected", [
    ("cuda", "cuda", torch.float16), ("cuda", "cpu", None),        # IRL default: fp16 AMP on CUDA only
    (True, "cuda", torch.float16), (True, "cpu", torch.bfloat16),  # --amp: bf16 autocast on the CPU
    (False, "cuda", None), (False, "cpu", None)])
def test_autocast_dtype_follows_the_amp_setting_and_device(amp, device, expected):
    assert train_script.autocast_dtype(amp, torch.device(device)) is expected


def test_run_suffix_follows_the_official_naming():
    config, _ = resolve(["--dataset", "regdb", "--trial", "3"])
    assert train_script.run_suffix(config) == "regdb_irl_p4_n6_lr_0.1_seed_0_trial_3"
    config, _ = resolve(["--dataset", "llcm", "--method", "agw", "--val"])
    assert train_script.run_suffix(config) == "llcm_agw_p4_n8_lr_0.1_seed_0_val"


def test_resume_config_keeps_the_checkpoint_values_and_rejects_clashes():
    saved, _ = resolve(["--dataset", "llcm", "--arch", "resnet18", "--epochs", "7"])
    config, sources = resolve(["--workers", "1"], saved)
    assert (config["dataset"], config["arch"], config["epochs"], config["workers"]) == ("llcm", "resnet18", 7, 1)
    assert sources["dataset"] == "checkpoint" and sources["workers"] == "flag"
    for flags in (["--dataset", "sysu"], ["--arch", "resnet50"], ["--method", "agw"], ["--epochs", "8"]):
        with pytest.raises(utils.ConfigError, match="different configuration"):
            resolve(flags, saved)


@pytest.mark.parametrize("flags, message", [(["--optim", "ADM"], "only SGD"), (["--batch-size", "0"], ">= 1"),
                                            (["--dataset", "regdb", "--trial", "11"], "1..10"),
                                            (["--method", "agw", "--milestones", "5"], "AGW schedule")])
def test_invalid_settings_are_config_errors(flags, message):
    with pytest.raises(utils.ConfigError, match=message):
        resolve(flags)


def test_val_holds_out_a_deterministic_spread_of_regdb_and_llcm_identities():
    held = data_manager.held_out_labels("regdb", "unused", np.repeat(np.arange(206), 10))
    assert held.tolist() == list(range(9, 206, 10))                # 20 of 206, every 10th
    assert data_manager.held_out_labels("llcm", "unused", np.arange(8)).tolist() == [1, 4, 7]


def test_without_a_gpu_one_line_says_so(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = ["--dataset", "regdb", "--data-path", str(tmp_path / "nowhere"), "--log_path", str(tmp_path)]
    assert train_script.main(args) == 2
    out, err = capsys.readouterr()
    assert out.count("CUDA not available: running on the CPU") == 1 and err.startswith("error: ")


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2)
    state = train_script.capture_rng_state()
    expected = (np.random.rand(3), torch.rand(3), __import__("random").random())
    utils.save_checkpoint_atomic({"rng": state}, str(tmp_path / "rng.pth"))
    train_script.restore_rng_state(utils.load_torch_file(str(tmp_path / "rng.pth"))["rng"])
    again = (np.random.rand(3), torch.rand(3), __import__("random").random())
    assert np.array_equal(expected[0], again[0]) and torch.equal(expected[1], again[1]) and expected[2] == again[2]


# --------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------

def test_sysu_irl_run_writes_checkpoints_logs_and_metrics(tmp_path_factory):
    ws, proc, seconds = trained(tmp_path_factory, "sysu_irl")
    print(f"sysu IRL 1 epoch: {seconds:.1f}s")
    assert "Effective configuration" in proc.stdout and "test-set selection (Q-22)" in proc.stdout
    ckpt = utils.load_torch_file(checkpoint(tmp_path_factory, "sysu_irl", "last"))   # weights_only load
    assert ckpt["format"] == "vireid-ckpt-v1" and ckpt["epoch"] == 0
    assert {"model", "optimizer", "scheduler", "scaler", "best_metric", "best_epoch", "metrics"} <= set(ckpt)
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    cfg = ckpt["config"]
    assert (cfg["dataset"], cfg["method"], cfg["arch"], cfg["img_h"], cfg["img_w"]) == ("sysu", "irl", "resnet18",
                                                                                         32, 16)
    assert cfg["num_classes"] == 15                     # train_id (12) + val_id (3), REFERENCE 1.2
    best = utils.load_torch_file(checkpoint(tmp_path_factory, "sysu_irl", "best"))
    assert best["best_epoch"] == 0 and 0 <= best["best_metric"] <= 1
    (record,) = read_metrics(ws, "sysu_irl")
    assert record["epoch"] == 0 and np.isfinite(record["loss"])
    assert record["eval"]["bn"]["cmc"][0] == pytest.approx(best["best_metric"])
    log = os.path.join(ws.base, "logs", "sysu", f"{suffix_of('sysu_irl')}.log")
    assert "Eval epoch 0 on sysu-all-single" in open(log).read()
    assert "not finite" not in proc.stdout


def test_agw_with_val_holds_out_val_ids_and_selects_on_them(tmp_path_factory):
    ws, proc, seconds = trained(tmp_path_factory, "sysu_agw_val")
    print(f"sysu AGW --val 1 epoch: {seconds:.1f}s")
    assert "validation selection (--val)" in proc.stdout and "Eval epoch 0 on sysu-val" in proc.stdout
    ckpt = utils.load_torch_file(checkpoint(tmp_path_factory, "sysu_agw_val", "best"))
    assert (ckpt["config"]["method"], ckpt["config"]["num_classes"]) == ("agw", 12)   # 3 val ids held out
    assert ckpt["metrics"]["selection"].startswith("validation selection")


def test_llcm_irl_run_evaluates_ir_to_visible(tmp_path_factory):
    ws, proc, seconds = trained(tmp_path_factory, "llcm_irl")
    print(f"llcm IRL 1 epoch: {seconds:.1f}s")
    assert "Eval epoch 0 on llcm-ir2vis-single" in proc.stdout
    assert os.path.isfile(checkpoint(tmp_path_factory, "llcm_irl", "best"))


def code_snapshot(dest):
    """A copy of the toolkit's modules: runs compared bitwise must run the same code, and the working tree
    may change between them (several people edit it while the suite runs)."""
    os.makedirs(dest)
    for name in os.listdir(ROOT):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(ROOT, name), dest)
    return os.path.join(dest, "train.py")


def test_killed_run_resumed_ends_with_the_same_weights(tmp_path_factory, tmp_path):
    ws = workspace(tmp_path_factory)
    train = code_snapshot(str(tmp_path / "code"))
    extra = RUNS["regdb_t1"][2]                                      # 2 epochs

    def args(folder):
        argv = ws.train_args("regdb", folder, extra)
        argv[argv.index("--model_path") + 1] = str(tmp_path / "runs" / folder)
        argv[argv.index("--log_path") + 1] = str(tmp_path / "logs" / folder)
        return argv

    start = time.time()
    run_script(train, args("straight"), cwd=ws.base)
    print(f"regdb AGW 2 epochs: {time.time() - start:.1f}s")
    last = str(tmp_path / "runs" / "resumed" / f"{suffix_of('regdb_t1')}_last.pth")
    proc = subprocess.Popen([sys.executable, train, *args("resumed")], cwd=ws.base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=SCRIPT_ENV)
    try:
        while not os.path.exists(last) and proc.poll() is None:     # kill once epoch 0 is saved
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    assert utils.load_torch_file(last)["epoch"] in (0, 1)
    resumed = run_script(train, ["--resume", last, "--workers", "0", "--device", "cpu"], cwd=ws.base)
    assert "Resuming" in resumed.stdout
    straight = utils.load_torch_file(str(tmp_path / "runs" / "straight" / f"{suffix_of('regdb_t1')}_last.pth"))
    final = utils.load_torch_file(last)
    assert final["epoch"] == straight["epoch"] == 1
    assert straight["model"].keys() == final["model"].keys()
    different = [k for k in straight["model"] if not torch.equal(straight["model"][k], final["model"][k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    assert final["best_epoch"] == straight["best_epoch"]
    with open(tmp_path / "logs" / "resumed" / f"{suffix_of('regdb_t1')}_metrics.jsonl") as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1]


def test_resume_with_another_dataset_arch_or_class_count_fails(tmp_path_factory, capsys, tmp_path, one_thread):
    last = checkpoint(tmp_path_factory, "regdb_t1", "last")
    for flags in (["--dataset", "llcm"], ["--arch", "resnet34"], ["--method", "irl"]):
        assert train_script.main(["--resume", last, *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot resume") and err.count("\n") == 1
    other = make_synthetic.make_regdb(str(tmp_path), size="test", ids=24)      # 12 training ids, not 10
    assert train_script.main(["--resume", last, "--data-path", other]) == 2
    err = capsys.readouterr().err
    assert "has 10 classes" in err and "has 12" in err and err.count("\n") == 1


def test_nan_loss_stops_with_one_message_and_keeps_the_last_checkpoint(tmp_path_factory, tmp_path, capsys,
                                                                       monkeypatch, one_thread):
    ws = workspace(tmp_path_factory)
    finished = []
    end_of_epoch = train_script.end_of_epoch
    training_loss = train_script.training_loss

    def record_epoch(run, epoch, stats):
        end_of_epoch(run, epoch, stats)
        finished.append(epoch)

    def nan_after_first_epoch(*args):
        terms = training_loss(*args)
        return {name: value * float("nan") for name, value in terms.items()} if finished else terms

    monkeypatch.setattr(train_script, "end_of_epoch", record_epoch)
    monkeypatch.setattr(train_script, "training_loss", nan_after_first_epoch)
    args = ws.train_args("regdb", "unused", RUNS["regdb_t1"][2])
    args[args.index("--model_path") + 1] = str(tmp_path / "runs")
    args[args.index("--log_path") + 1] = str(tmp_path / "logs")
    assert train_script.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: training loss is nan at epoch 1, batch 0") and err.count("\n") == 1
    last = tmp_path / "runs" / f"{suffix_of('regdb_t1')}_last.pth"
    assert str(last) in err and utils.load_torch_file(str(last))["epoch"] == 0
    assert not [f for f in os.listdir(tmp_path / "runs") if f.endswith(".tmp")]


def test_missing_dataset_is_a_one_line_error(tmp_path, capsys):
    outputs = ["--model_path", str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs")]
    for dataset in ("sysu", "regdb", "llcm"):
        assert train_script.main(["--dataset", dataset, "--data-path", str(tmp_path / "nowhere"), *TINY,
                                  *outputs]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "nowhere" in err
    assert not os.path.exists(tmp_path / "runs")         # no checkpoint folder, no checkpoint


def test_missing_pretrained_file_is_a_one_line_error(tmp_path_factory, tmp_path, capsys):
    ws = workspace(tmp_path_factory)
    args = ws.train_args("regdb", "unused", ["--pretrained", str(tmp_path / "weights.pth")])
    args[args.index("--model_path") + 1] = str(tmp_path / "runs")
    args[args.index("--log_path") + 1] = str(tmp_path / "logs")
    assert train_script.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "weights.pth" in err


def test_missing_resume_checkpoint_is_an_error(tmp_path, capsys):
    assert train_script.main(["--resume", str(tmp_path / "nope.pth"), "--log_path", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint not found")
