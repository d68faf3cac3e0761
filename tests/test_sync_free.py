"""No host synchronisation in IRL's QCT loss nor in one training step of any method.

On a GPU, every read of a tensor's value by the host (`.item()`, `bool()`, `int()`, `.tolist()`, `.cpu()`) and
every operator whose output size depends on the values (`torch.unique`, `nonzero`, boolean-mask indexing)
waits for all queued kernels. Without a GPU, `SyncRecorder` sees them where they are asked for: a
TorchDispatchMode logs the operators that would synchronise, and the Python-level reads that bypass the
dispatcher are wrapped. Its limit: a copy between host and device cannot be seen, as every tensor of a CPU
run already lives on the host.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import loss
import methods
import model as models
from test_train import TINY, one_thread, train_script, workspace  # noqa: F401 (one_thread: a fixture)
from utils import ConfigError

# Operators that read a value on the host, or whose output size depends on the values.
SYNCING_OPS = {"_local_scalar_dense", "equal", "is_nonzero", "nonzero", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "unique_dim_consecutive", "masked_select", "bincount", "histc"}
# Tensor methods that copy to the host without a dispatched operator on a CPU tensor.
HOST_READ_METHODS = ("tolist", "numpy", "cpu")


def _is_mask(index):
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class SyncRecorder(TorchDispatchMode):
    """Records, while `active`, each operation that would make the host wait for a GPU."""

    def __init__(self, monkeypatch, active=True):
        super().__init__()
        self.active, self.seen = active, []
        for name in HOST_READ_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._recording(name, getattr(torch.Tensor, name)))

    def _recording(self, name, method):
        def recorded(tensor, *args, **kwargs):
            if self.active:
                self.seen.append(f"Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return recorded

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active:
            name = func.overloadpacket.__name__
            if name in SYNCING_OPS:
                self.seen.append(name)
            elif name in ("index", "index_put", "index_put_") and any(map(_is_mask, args[1])):
                self.seen.append(f"{name} with a boolean mask")
            elif name == "repeat_interleave" and kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor):
                self.seen.append("repeat_interleave without output_size")
        return func(*args, **kwargs)


SYNCS = {
    "item": lambda t: t.sum().item(),
    "bool": lambda t: bool((t > 0).all()),
    "int": lambda t: int(t.max()),
    "float": lambda t: float(t[0]),
    "tolist": lambda t: t.tolist(),
    "cpu": lambda t: t.cpu(),
    "numpy": lambda t: t.numpy(),
    "unique": lambda t: torch.unique(t, return_inverse=True),
    "one_hot without num_classes": lambda t: F.one_hot(t.long()),
    "boolean mask": lambda t: t[t > 1],
    "masked assignment": lambda t: t.clone().__setitem__(t > 1, 0),
    "nonzero": lambda t: torch.where(t > 1),
    "equal": lambda t: torch.equal(t, t),
    "repeat_interleave": lambda t: torch.repeat_interleave(t.long()),
}


@pytest.mark.parametrize("name", sorted(SYNCS))
def test_the_recorder_sees_each_kind_of_host_synchronisation(monkeypatch, name):
    with SyncRecorder(monkeypatch) as recorder:
        SYNCS[name](torch.arange(5.0))
    assert recorder.seen


def test_the_recorder_lets_device_side_work_pass(monkeypatch):
    t = torch.arange(6.0, requires_grad=True)
    with SyncRecorder(monkeypatch) as recorder:
        y = torch.where(t > 2, t, 0.0).reshape(2, 3).softmax(1)[:, torch.tensor([0, 2])].sum()
        y.backward()
        torch._assert_async((t > -1).all(), "never")
    assert recorder.seen == []


def irl_batch(dtype, seed=0):
    """An IRL-layout QCT batch: 6 identities x 4 images in each of the RGB and IR halves, 64-d features."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(400, generator=g)[:6]
    half = ids.repeat_interleave(4)
    labels = torch.cat([half, half])
    return torch.randn(len(labels), 64, generator=g, dtype=dtype) * 0.02, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qct_forward_and_backward_never_wait_for_the_device(monkeypatch, dtype):
    x, labels = irl_batch(dtype)
    x.requires_grad_()
    with SyncRecorder(monkeypatch) as recorder:
        value = loss.QuarCenterTripletLoss(margin=0.7)(x, labels)
        value.backward()
    assert recorder.seen == []
    assert x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_sync_free_class_indices_match_torch_unique():
    for seed in range(20):
        labels = torch.randint(0, 9, (24,), generator=torch.Generator().manual_seed(seed))
        onehot, inverse = loss._one_hot_labels(labels, torch.float64)
        _, want = torch.unique(labels, return_inverse=True)
        assert torch.equal(inverse, want)
        classes = int(want.max()) + 1
        assert torch.equal(onehot[:, :classes], F.one_hot(want, classes).double())
        assert onehot[:, classes:].abs().sum() == 0


def test_qct_still_refuses_an_identity_missing_from_one_half_without_reading_the_device(monkeypatch):
    # The check is a device-side assertion on a GPU; on the CPU it raises at once, as a ConfigError.
    with SyncRecorder(monkeypatch) as recorder, pytest.raises(ConfigError, match="both the RGB half"):
        loss.QuarCenterTripletLoss()(torch.rand(8, 3), torch.tensor([0, 0, 1, 1, 0, 0, 0, 0]))
    assert recorder.seen == []


class FirstStepRecorded:
    """Stands in for the run's loader: two batches of it, with `recorder` active from the moment the first is
    handed out until the second is asked for, i.e. over exactly one whole training step (step 0; step 1 is
    the epoch's last, where the meters are read once, as designed)."""

    def __init__(self, loader, recorder):
        self.loader, self.sampler, self.recorder = loader, loader.sampler, recorder

    def __len__(self):
        return 2

    def __iter__(self):
        batches = iter(self.loader)
        for step in range(2):
            self.recorder.active = False
            batch = next(batches)
            self.recorder.active = step == 0
            yield batch
        self.recorder.active = False


def tiny_run(tmp_path_factory, tmp_path, method):
    ws = workspace(tmp_path_factory)
    args = train_script.build_parser().parse_args(
        # 64x32: a size every method accepts (MMN's four stripes need 4 layer-4 rows; TINY's 32x16 gives 2).
        ["--dataset", "regdb", "--data-path", ws.data["regdb"], *TINY, "--img_h", "64", "--img_w", "32",
         "--method", method, "--model_path", str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs")])
    return train_script.setup_run(args)[0]


def assert_first_step_never_waits(run, monkeypatch):
    recorder = SyncRecorder(monkeypatch, active=False)
    run.loader = FirstStepRecorded(run.loader, recorder)
    before = [p.detach().clone() for p in run.bare_net.parameters()]
    with recorder:
        stats = train_script.train_one_epoch(run, 0)
    assert recorder.seen == []
    assert stats["batches"] == 2 and torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, run.bare_net.parameters()))     # it did train


@pytest.mark.parametrize("method", methods.names())
def test_one_training_step_of_every_method_never_waits_for_the_device(tmp_path_factory, tmp_path, monkeypatch,
                                                                      one_thread, method):
    assert_first_step_never_waits(tiny_run(tmp_path_factory, tmp_path, method), monkeypatch)


def test_an_fp16_amp_step_with_its_grad_scaler_never_waits_for_the_device(tmp_path_factory, tmp_path, monkeypatch,
                                                                         one_thread):
    # The run set up as for CUDA's fp16 AMP (an enabled GradScaler, and whatever optimizer setup_run pairs with
    # it), then stepping in fp32: the host reads come from the scaler and the optimizer, not from autocast, and
    # fp16 convolutions on a CPU are slow.
    monkeypatch.setattr(train_script, "autocast_dtype", lambda amp, device, log=None: torch.float16)
    run = tiny_run(tmp_path_factory, tmp_path, "irl")
    assert run.scaler.is_enabled()
    run.amp_dtype = None
    assert_first_step_never_waits(run, monkeypatch)


def test_an_fp16_run_resumed_from_an_unfused_optimizer_state_steps_fused_without_waiting(tmp_path_factory, tmp_path,
                                                                                        monkeypatch, one_thread):
    """Checkpoints written before SGD was fused under fp16 hold fused=None in their groups; resuming must keep
    the fused optimizer (loading the old groups as they are fails inside scaler.step)."""
    monkeypatch.setattr(train_script, "autocast_dtype", lambda amp, device, log=None: torch.float16)
    run = tiny_run(tmp_path_factory, tmp_path, "irl")
    old = torch.optim.SGD(models.param_groups(run.bare_net, 0.1), lr=0.1, momentum=0.9, nesterov=True)
    assert all(group["fused"] is None for group in old.param_groups)
    checkpoint = {"model": run.bare_net.state_dict(), "optimizer": old.state_dict(),
                  "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "epoch": 0,
                  "best_metric": -1.0, "best_epoch": -1}
    train_script.restore_training_state(run, checkpoint, "old.pth")
    assert all(group["fused"] is True for group in run.optimizer.param_groups)
    run.amp_dtype = None
    assert_first_step_never_waits(run, monkeypatch)
