"""Two-process DistributedDataParallel training on the CPU (gloo), launched like torchrun."""
import os
import subprocess
import sys

import torch

from conftest import ROOT
from test_train import SCRIPT_ENV, TINY, train_script
from tools import make_synthetic
import utils


def test_two_process_gloo_training_only_rank0_writes(tmp_path):
    data = make_synthetic.make_regdb(str(tmp_path / "data"), size="test")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), "--dataset", "regdb", "--data-path", data, *TINY, "--epochs", "1",
           "--model_path", str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=SCRIPT_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "processes: 2" in proc.stdout
    suffix = "regdb_irl_p2_n4_lr_0.001_seed_0_trial_1"
    assert sorted(os.listdir(tmp_path / "runs")) == [f"{suffix}_best.pth", f"{suffix}_last.pth"]
    assert sorted(os.listdir(tmp_path / "logs")) == [f"{suffix}.log", f"{suffix}_metrics.jsonl"]
    ckpt = utils.load_torch_file(str(tmp_path / "runs" / f"{suffix}_last.pth"))
    assert ckpt["epoch"] == 0 and not any(k.startswith("module.") for k in ckpt["model"])
    # 40 images, 4 ids x 2 per batch -> 6 planned batches, 3 per rank (one log line per epoch, rank 0 only).
    with open(tmp_path / "logs" / f"{suffix}.log") as f:
        log = f.read()
    assert log.count("Epoch 0:") == 1 and "[3 batches" in log


def test_a_cuda_rank_binds_its_gpu_before_nccl_starts(monkeypatch):
    """A test double for CUDA: the rank's GPU is made current first and named to NCCL (device_id), so the
    communicator is bound to it; CPU ranks start gloo without a device."""
    calls = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(utils, "resolve_device", lambda device, gpu, logger=None: torch.device(device, int(gpu)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(train_script.dist, "init_process_group",
                        lambda backend, **kwargs: calls.append(("init", backend, kwargs)))
    assert train_script.init_distributed({"device": "cuda", "gpu": "0"}, None) == (2, 1, torch.device("cuda", 1))
    assert calls == [("set_device", torch.device("cuda", 1)), ("init", "nccl", {"device_id": torch.device("cuda", 1)})]
    calls.clear()
    monkeypatch.setattr(utils, "resolve_device", lambda device, gpu, logger=None: torch.device("cpu"))
    assert train_script.init_distributed({"device": "cpu", "gpu": "0"}, None) == (2, 1, torch.device("cpu"))
    assert calls == [("init", "gloo", {})]
