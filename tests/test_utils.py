"""utils.py: seeding, flags, meters, logging, devices, tables, atomic files, safe checkpoint loading, LR."""
import argparse
import functools
import json
import logging
import os
import random
import zipfile

import numpy as np
import pytest
import torch

import utils
from utils import (FIXED_LR_SCHEDULES, CheckpointError, ConfigError, format_table,
                   load_torch_file, lr_factor, make_lr_scheduler, resolve_device, save_checkpoint_atomic,
                   save_json_atomic, set_seed, setup_logger, str2bool)


# ------------------------------------------------------------------------------------ seeds and flags

def draw_all():
    return torch.rand(3).tolist(), random.random(), np.random.rand()


def test_set_seed_reseeds_every_rng():
    set_seed(5)
    first = draw_all()
    set_seed(5)
    assert draw_all() == first
    set_seed(6)
    assert draw_all() != first
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


@pytest.mark.parametrize("text, value", [("True", True), ("true", True), ("1", True), ("yes", True),
                                         ("False", False), ("false", False), ("0", False), ("no", False),
                                         (True, True), (False, False)])
def test_str2bool(text, value):
    assert str2bool(text) is value


def test_str2bool_rejects_other_words_in_argparse():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tvsearch", type=str2bool)
    assert parser.parse_args(["--tvsearch", "True"]).tvsearch is True
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


# ------------------------------------------------------------------------------------ logging, device

def test_logger_writes_console_and_file_without_duplicate_handlers(tmp_path, capsys):
    log_file = tmp_path / "logs" / "run.txt"
    setup_logger("t_utils_dup", str(log_file))
    logger = setup_logger("t_utils_dup", str(log_file))
    logger.info("hello once")
    for handler in logger.handlers:
        handler.flush()
    assert capsys.readouterr().out.count("hello once") == 1
    assert log_file.read_text().count("hello once") == 1
    assert len(logger.handlers) == 2


def test_logger_on_other_ranks_only_warns(tmp_path, capsys):
    log_file = tmp_path / "run.txt"
    logger = setup_logger("t_utils_rank", str(log_file), rank=1)
    logger.info("quiet info")
    logger.warning("loud warning")
    out = capsys.readouterr().out
    assert "quiet info" not in out and "loud warning" in out
    assert not log_file.exists()


def test_resolve_device_cpu_requested():
    assert resolve_device("cpu", 0) == torch.device("cpu")


@pytest.mark.parametrize("device, gpu", [(None, None), ("cuda", 0), ("cuda", "1")])
def test_resolve_device_without_cuda_warns_one_line(monkeypatch, caplog, device, gpu):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_device(device, gpu) == torch.device("cpu")
    assert [r.getMessage() for r in caplog.records] == ["CUDA not available: running on the CPU"]


def test_resolve_device_gpu_index_selects_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(None, "1") == torch.device("cuda:1")
    assert resolve_device("cuda", 0) == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="only 2 CUDA"):
        resolve_device("cuda", 2)


def test_resolve_device_rejects_unknown_device():
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("tpu", None)


def test_format_table_is_fixed_width():
    rows = [{"feature": "bn", "Rank-1": 65.4321, "mAP": 60.0}, {"feature": "pool", "Rank-1": 5.0, "mAP": 7.25}]
    text = format_table(rows, ["feature", "Rank-1", "mAP"], title="SYSU all")
    lines = text.splitlines()
    assert lines[0] == "SYSU all"
    assert lines[1].split() == ["feature", "Rank-1", "mAP"]
    assert set(lines[2]) == {"-"}
    assert lines[3].split() == ["bn", "65.43", "60.00"]
    assert lines[4].split() == ["pool", "5.00", "7.25"]
    assert len({len(line) for line in lines[1:]}) == 1          # all rows equally wide
    assert lines[3].index("65.43") + 5 == lines[4].index("5.00") + 4   # numbers right-aligned


# ------------------------------------------------------------------------------------ atomic writes

def test_save_checkpoint_atomic_roundtrip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint_atomic({"model": {"w": torch.arange(3.0)}, "epoch": 2}, str(path))
    save_checkpoint_atomic({"model": {"w": torch.arange(4.0)}, "epoch": 3}, str(path))
    assert os.listdir(path.parent) == ["ckpt.pth"]
    loaded = load_torch_file(path)
    assert loaded["epoch"] == 3 and loaded["model"]["w"].tolist() == [0, 1, 2, 3]


def test_failed_atomic_save_keeps_previous_file_and_cleans_up(tmp_path):
    path = tmp_path / "ckpt.pth"
    save_checkpoint_atomic({"epoch": 1}, str(path))
    with pytest.raises(Exception):
        save_checkpoint_atomic({"epoch": 2, "bad": lambda: 0}, str(path))   # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    assert load_torch_file(path)["epoch"] == 1


def test_save_json_atomic(tmp_path):
    path = tmp_path / "out" / "metrics.json"
    save_json_atomic({"mAP": 0.5, "cmc": [1, 2]}, str(path))
    assert json.loads(path.read_text()) == {"mAP": 0.5, "cmc": [1, 2]}
    assert os.listdir(path.parent) == ["metrics.json"]


# ------------------------------------------------------------------------------ checkpoint security

def official_checkpoint():
    """What the official train.py saves (REFERENCE 8.4): numpy array/scalars next to the state dict."""
    return {"net": {"base.weight": torch.randn(2, 3), "bn.num_batches_tracked": torch.tensor(5)},
            "epoch": 3, "cmc": np.linspace(0.5, 1.0, 20).astype(np.float32),
            "mAP": np.float64(0.5), "mINP": np.float64(0.4)}


def check_official(loaded, original):
    torch.testing.assert_close(loaded["net"]["base.weight"], original["net"]["base.weight"])
    assert loaded["epoch"] == 3
    assert loaded["cmc"].dtype == np.float32
    np.testing.assert_array_equal(loaded["cmc"], original["cmc"])
    assert isinstance(loaded["mAP"], np.float64) and loaded["mAP"] == 0.5
    assert loaded["mINP"] == np.float64(0.4)


def test_official_checkpoint_with_numpy_objects_loads(tmp_path):
    ckpt = official_checkpoint()
    torch.save(ckpt, tmp_path / "best.t")
    check_official(load_torch_file(tmp_path / "best.t"), ckpt)


def test_official_checkpoint_from_numpy1_loads(tmp_path):
    """numpy 1.x (which wrote the released checkpoints) names its reconstructors numpy.core.*."""
    ckpt = official_checkpoint()
    path = tmp_path / "best.t"
    torch.save(ckpt, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert raw.count(b"numpy._core.multiarray") == 2 and b"numpy.core" not in raw   # _reconstruct, scalar
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    check_official(load_torch_file(path), ckpt)


def test_checkpoint_tensors_are_mapped_to_cpu(tmp_path):
    torch.save({"net": {"w": torch.ones(2)}}, tmp_path / "c.t")
    assert load_torch_file(tmp_path / "c.t")["net"]["w"].device.type == "cpu"


class RunsShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class RunsPython:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("payload", [RunsShellCommand, RunsPython])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.t"
    torch.save({"net": {"w": torch.ones(1)}, "epoch": payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load .*evil.t"):
        load_torch_file(path)
    assert not marker.exists()


def test_checkpoint_loading_uses_weights_only(monkeypatch, tmp_path):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    torch.save({"epoch": 1}, tmp_path / "c.t")
    load_torch_file(tmp_path / "c.t")
    assert calls == [{"map_location": "cpu", "weights_only": True}]


def write_truncated(path):
    torch.save(official_checkpoint(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "directory"),
    (write_truncated, "corrupt"),
    (lambda p: p.write_bytes(b""), r"not a PyTorch checkpoint \(empty file\)"),
    (lambda p: p.write_bytes(b"definitely not a checkpoint" * 10), "not a PyTorch checkpoint"),
    (lambda p: p.write_text("epoch,rank1\n1,0.5\n"), "^[^\n]*not a PyTorch checkpoint[^\n]*$"),
    (lambda p: zipfile.ZipFile(p, "w").writestr("x.txt", "hi"), "corrupt"),
    (lambda p: torch.save([torch.ones(1)], p), "not a checkpoint"),
])
def test_bad_checkpoint_files_raise_checkpoint_error_naming_path(tmp_path, make, message):
    path = tmp_path / "model_best.t"
    make(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_torch_file(path)
    assert str(path) in str(info.value)


def test_checkpoint_error_is_value_error():
    assert issubclass(CheckpointError, ValueError) and issubclass(ConfigError, ValueError)


# --------------------------------------------------------------------------------------- LR schedules

def test_lr_schedule_table_of_reference_8_3():
    """Group-0 LR = 0.01 x factor; groups 1-2 = 0.1 x factor (REFERENCE 8.3 table)."""
    expected_group0 = {0: 0.001, 5: 0.0055, 9: 0.0091, 10: 0.01, 24: 0.01, 25: 0.001, 89: 0.001,
                       90: 1e-4, 119: 1e-4, 120: 1e-5, 149: 1e-5}
    for epoch, lr in expected_group0.items():
        assert 0.01 * lr_factor(epoch) == pytest.approx(lr, rel=1e-9), epoch
        assert 0.1 * lr_factor(epoch) == pytest.approx(10 * lr, rel=1e-9), epoch


def test_lr_warmup_is_linear_from_warmup_factor():
    factors = [lr_factor(e, mode) for e in range(10) for mode in ("step",)]
    assert factors == pytest.approx([0.10, 0.19, 0.28, 0.37, 0.46, 0.55, 0.64, 0.73, 0.82, 0.91])
    for mode in utils.LR_MODES:
        assert lr_factor(4, mode) == pytest.approx(0.46)


@pytest.mark.parametrize("mode, at_start, at_middle, at_end", [
    ("exp", 1.0, 0.9 ** 0.5, 0.9),
    ("linear", 1.0, 0.5, 0.0),
    ("poly", 0.9, 0.9 ** 0.5, 1.0),
    ("cosine", 1.0, 0.5, 0.0),
])
def test_lr_other_modes_closed_form(mode, at_start, at_middle, at_end):
    assert lr_factor(10, mode) == pytest.approx(at_start)
    assert lr_factor(80, mode) == pytest.approx(at_middle)
    assert lr_factor(150, mode) == pytest.approx(at_end, abs=1e-12)


def test_lr_factor_custom_milestones_and_unknown_mode():
    assert lr_factor(7, milestones=(3, 6), warmup_epochs=0, gamma=0.5) == 0.25
    with pytest.raises(ConfigError, match="unknown LR schedule"):
        lr_factor(3, "triangle")


def test_agw_schedule():
    assert [FIXED_LR_SCHEDULES["agw"](e) for e in (0, 4, 9, 10, 19, 20, 49, 50, 99)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def sgd_three_groups():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    return torch.optim.SGD([{"params": [params[0]], "lr": 0.01}, {"params": [params[1]], "lr": 0.1},
                            {"params": [params[2]], "lr": 0.1}], lr=0.1, momentum=0.9)


def test_scheduler_applies_epoch_zero_then_steps_per_epoch():
    optimizer = sgd_three_groups()
    scheduler = make_lr_scheduler(optimizer, lr_factor)
    seen = []
    for _ in range(27):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([0.001, 0.01, 0.01])
    assert seen[5] == pytest.approx([0.0055, 0.055, 0.055])
    assert seen[24] == pytest.approx([0.01, 0.1, 0.1])
    assert seen[26] == pytest.approx([0.001, 0.01, 0.01])


def test_scheduler_state_restores_position():
    factor = functools.partial(lr_factor, mode="cosine")
    optimizer = sgd_three_groups()
    scheduler = make_lr_scheduler(optimizer, factor)
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    resumed_optimizer = sgd_three_groups()
    resumed = make_lr_scheduler(resumed_optimizer, factor)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    for sched, opt in ((scheduler, optimizer), (resumed, resumed_optimizer)):
        opt.step()
        sched.step()
    assert [g["lr"] for g in resumed_optimizer.param_groups] == pytest.approx(
        [g["lr"] for g in optimizer.param_groups])
    assert resumed.last_epoch == 14
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * lr_factor(14, "cosine"))
