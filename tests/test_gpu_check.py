"""bench/gpu_check.py in its tiny CPU mode: every step runs and lands in the JSON (about 70 CPU-seconds,
hence `slow`)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--tiny", "--workers", "0",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tiny"] is True
    assert {(r["method"], r["variant"]) for r in report["speed"]} == {
        (m, v) for m in ("irl", "agw") for v in ("contiguous", "channels-last")}
    assert all(r["train_img_s"] > 0 and r["eval_img_s"] > 0 and r["steps"] > 0 for r in report["speed"])
    assert report["ddp"]["ok"] and report["ddp"]["relative_difference"] < 1e-4
    assert report["resume"]["ok"] and report["resume"]["tensors_differing"] == 0
    assert "Killed after epoch" in proc.stdout and "DDP (gloo" in proc.stdout
