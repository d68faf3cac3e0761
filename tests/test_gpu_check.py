"""bench/gpu_check.py in its tiny CPU mode (every step runs and lands in the JSON, in about 20 s on 2 cores),
and the CUDA switches of the evaluation loader that a CPU can check."""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import torch

import data_loader
from conftest import ROOT
from tools import make_synthetic

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402


def test_tiny_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--tiny", "--workers", "0",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True
    assert {(r["method"], r["variant"]) for r in report["speed"]} == {
        (m, v) for m in ("irl", "agw") for v in ("contiguous", "channels-last")}
    assert all(r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["steps"] == 2 for r in report["speed"])
    ddp = report["ddp"]
    assert (ddp["backend"], ddp["ok"]) == ("gloo", True)
    assert [job["world_size"] for job in ddp["jobs"]] == [1, 2]
    assert ddp["jobs"][0]["relative_difference_to_single"] < 1e-4
    assert all(job["ranks_differing_tensors"] == 0 for job in ddp["jobs"])
    assert report["resume"]["ok"] and report["resume"]["tensors_differing"] == 0
    assert report["resume"]["killed_after_epoch"] == 0
    assert "Killed after epoch 0" in proc.stdout and "DDP (gloo, fork, 2 processes)" in proc.stdout


def test_the_evaluation_loader_pins_memory_only_when_asked(tmp_path):
    root = make_synthetic.make_regdb(str(tmp_path / "data"), size="test")
    with open(os.path.join(root, "idx", "test_visible_1.txt")) as f:
        lines = [line.split() for line in f][:6]
    paths = [os.path.join(root, rel) for rel, _ in lines]
    labels = np.array([int(label) for _, label in lines])
    plain = data_loader.make_test_loader(paths, labels, 32, 16, batch_size=4, workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # without an accelerator torch warns that it cannot pin
        pinned = data_loader.make_test_loader(paths, labels, 32, 16, batch_size=4, workers=0, pin_memory=True)
        pinned_batches = list(pinned)
    assert (plain.pin_memory, pinned.pin_memory) == (False, True)
    for (a, la), (b, lb) in zip(plain, pinned_batches, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def compile_failure():
    raise RuntimeError("compile failed\nmore detail")


def test_a_check_that_raises_is_reported_as_failed_and_the_report_still_prints(tmp_path, capsys):
    assert gpu_check.attempt(lambda steps: {"steps": steps}, 3) == {"steps": 3}
    failed = gpu_check.attempt(compile_failure)
    assert failed == {"ok": False, "error": "RuntimeError: compile failed\nmore detail"}
    report = {"device": "cpu", "tiny": True, "seconds": 1.0,
              "speed": [{"method": "irl", "variant": "channels-last + compile", **failed},
                        {"method": "agw", "variant": "contiguous", "ok": True, "steps": 2, "train_img_s": 10.0,
                         "eval_img_s": 20.0, "peak_gpu_mib": None, "compiled": False}],
              "ddp": {"ok": False, "error": "RuntimeError: NCCL error"}, "resume": dict(failed)}
    gpu_check.print_report(report, str(tmp_path / "check.json"))
    out = capsys.readouterr().out
    assert "irl channels-last + compile: FAILED (RuntimeError: compile failed)" in out
    assert "DDP: FAILED (RuntimeError: NCCL error)" in out and "Kill and resume: FAILED" in out
    assert any(line.startswith("agw ") for line in out.splitlines())
