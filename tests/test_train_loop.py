"""train.py's step loop: no host synchronisation per step, collectives on the run's device, device meters
against a plain per-step average, and the run-long DataLoader against the per-epoch loaders it replaced."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from test_train import TINY, one_thread, train_script, workspace  # noqa: F401 (one_thread: a fixture)
import utils


def setup_regdb_run(tmp_path_factory, tmp_path, *flags):
    ws = workspace(tmp_path_factory)
    args = train_script.build_parser().parse_args(
        ["--dataset", "regdb", "--data-path", ws.data["regdb"], *TINY, "--method", "agw",
         "--model_path", str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs"), *flags])
    run, _ = train_script.setup_run(args)
    return run


class CollectiveSeen(Exception):
    """Raised by the test double once it has checked a collective's tensor."""


class DeviceCheckingDist:
    """Stands in for torch.distributed: every collective's tensor must live on `device`."""

    ReduceOp = torch.distributed.ReduceOp

    def __init__(self, device, stop=False):
        self.device, self.stop, self.calls = torch.device(device), stop, []

    def all_reduce(self, tensor, op=None):
        assert tensor.device == self.device, f"collective on {tensor.device}, the run is on {self.device}"
        self.calls.append(op)
        if self.stop:
            raise CollectiveSeen


def test_the_non_finite_check_reduces_a_tensor_on_the_runs_device(monkeypatch):
    # A meta tensor stands for a CUDA one: a collective on a CPU tensor (which NCCL rejects) fails here.
    double = DeviceCheckingDist("meta", stop=True)
    monkeypatch.setattr(train_script, "dist", double)
    meters = train_script.EpochMeters(torch.device("meta"))
    logits, labels = torch.zeros(4, 3, device="meta"), torch.zeros(4, dtype=torch.int64, device="meta")
    meters.update(0, torch.zeros((), device="meta"), {"id": torch.zeros((), device="meta")}, logits, labels)
    with pytest.raises(CollectiveSeen):
        meters.read(distributed=True)
    assert double.calls == [torch.distributed.ReduceOp.MAX]


def test_the_step_loop_never_reads_the_device_and_reduces_only_at_log_steps(tmp_path_factory, tmp_path, monkeypatch,
                                                                            one_thread):
    # On the meta device every read of a value (.item(), .tolist(), bool(), a data-dependent shape) raises:
    # the epoch below runs 6 steps of forward, backward and SGD there, so no step waits for the device.
    run = setup_regdb_run(tmp_path_factory, tmp_path, "--log-every", "4")
    run.device = torch.device("meta")
    run.net.to(run.device)          # in place: the optimizer keeps these parameters
    # loss.py opens autocast contexts, which the meta device does not have: a plain loss of two terms.
    monkeypatch.setattr(train_script, "training_loss", lambda run, outputs, labels: {
        "id": F.cross_entropy(outputs[1].float(), labels), "pool": outputs[0].float().pow(2).mean()})
    reads = []

    def read(meters, distributed):
        reads.append(meters.images)
        return {"loss": 0.0, "acc": 0.0, "id": 0.0, "pool": 0.0}, -1, 0.0, False

    monkeypatch.setattr(train_script.EpochMeters, "read", read)
    stats = train_script.train_one_epoch(run, 0)
    assert stats["batches"] == 6
    assert reads == [4 * 16, 6 * 16]           # after steps 4 and 6 (16 labels a step: 2 views x 4 ids x 2)


def test_log_step_collectives_use_the_runs_device_in_a_cpu_run(tmp_path_factory, tmp_path, monkeypatch, one_thread):
    run = setup_regdb_run(tmp_path_factory, tmp_path, "--log-every", "4")
    run.distributed = True
    double = DeviceCheckingDist(run.device)
    monkeypatch.setattr(train_script, "dist", double)
    stats = train_script.train_one_epoch(run, 0)
    assert len(double.calls) == 2 and math.isfinite(stats["loss"])     # at steps 4 and 6, never per step


def test_device_meters_match_a_plain_per_step_average_and_find_the_first_non_finite_step():
    gen = torch.Generator().manual_seed(0)
    meters = train_script.EpochMeters(torch.device("cpu"))
    sums, images, correct = {"loss": 0.0, "id": 0.0, "tri": 0.0}, 0, 0
    for step in range(7):
        n = 4 + step
        terms = {"id": torch.rand((), generator=gen), "tri": torch.rand((), generator=gen)}
        if step in (3, 5):
            terms["tri"] = torch.tensor(float("nan") if step == 3 else float("inf"))
        total = terms["id"] + terms["tri"]
        logits, labels = torch.randn(n, 5, generator=gen), torch.randint(0, 5, (n,), generator=gen)
        meters.update(step, total, terms, logits, labels)
        for name, value in (("loss", total), *terms.items()):
            sums[name] += float(value) * n
        correct += sum(int(logits[i].argmax()) == int(labels[i]) for i in range(n))
        images += n
        averages, bad_step, bad_loss, any_bad = meters.read(distributed=False)
        if step < 3:
            assert {k: averages[k] for k in sums} == {k: v / images for k, v in sums.items()} and not any_bad
        else:
            assert (bad_step, math.isnan(bad_loss), any_bad) == (3, True, True)
        assert averages["acc"] == correct / images and bad_step == (3 if step >= 3 else -1)


def old_per_epoch_batches(dataset, data, num_pos, batch_size, epoch, workers):
    """The loop this replaces, literally: a sampler, the dataset's plan and a DataLoader built per epoch."""
    sampler = utils.IdentitySampler(data.rgb_labels, data.ir_labels, data.color_pos, data.thermal_pos, num_pos,
                                    batch_size, epoch)
    dataset.cIndex, dataset.tIndex = sampler.index1, sampler.index2
    loader = DataLoader(dataset, batch_size=batch_size * num_pos, sampler=sampler, num_workers=workers,
                        drop_last=True)
    return list(loader)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_run_long_loader_yields_the_batches_of_per_epoch_loaders_bitwise(tmp_path_factory, tmp_path, workers,
                                                                            one_thread):
    run = setup_regdb_run(tmp_path_factory, tmp_path, "--workers", str(workers))
    cfg = run.config
    utils.set_seed(5)
    old = [old_per_epoch_batches(run.data.dataset, run.data, cfg["num_pos"], cfg["batch_size"], epoch, workers)
           for epoch in range(2)]
    old_state = np.random.get_state()[1].copy(), torch.get_rng_state()
    utils.set_seed(5)
    loader = train_script.build_train_loader(run)
    new = []
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        new.append(list(loader))
    assert np.array_equal(np.random.get_state()[1], old_state[0]) and torch.equal(torch.get_rng_state(), old_state[1])
    assert [len(epoch) for epoch in new] == [len(epoch) for epoch in old] == [6, 6]
    for old_epoch, new_epoch in zip(old, new):
        for old_batch, new_batch in zip(old_epoch, new_epoch):
            assert all(torch.equal(a, b) for a, b in zip(old_batch, new_batch))
    assert not all(torch.equal(a, b) for a, b in zip(new[0][0], new[1][0]))     # epochs differ


def test_the_run_sampler_needs_an_epoch_first():
    labels = np.repeat(np.arange(3), 2)
    color_pos, thermal_pos = utils.GenIdx(labels, labels)
    sampler = utils.RunSampler(labels, labels, color_pos, thermal_pos, 2, 2)
    with pytest.raises(RuntimeError, match="set_epoch"):
        iter(sampler).__next__()


def test_checkpoints_keep_channels_last_as_asked_so_another_device_resolves_it_anew(tmp_path_factory, tmp_path):
    run = setup_regdb_run(tmp_path_factory, tmp_path)
    assert run.config["channels_last"] is False                      # resolved for the CPU ...
    saved = train_script.checkpoint_state(run, 0, {})["config"]
    assert saved["channels_last"] is None and saved["method"] == run.method.name    # ... but stored as the default
    resumed, sources = train_script.resolve_config(train_script.build_parser().parse_args([]), saved)
    assert resumed["channels_last"] is None and sources["channels_last"] == "default"
    asked = setup_regdb_run(tmp_path_factory, tmp_path / "asked", "--channels-last")
    assert train_script.checkpoint_state(asked, 0, {})["config"]["channels_last"] is True


def test_channels_last_is_off_by_default_on_the_cpu_and_applies_to_weights_and_inputs(tmp_path_factory, tmp_path):
    assert setup_regdb_run(tmp_path_factory, tmp_path).config["channels_last"] is False
    run = setup_regdb_run(tmp_path_factory, tmp_path, "--channels-last")
    assert run.memory_format is torch.channels_last
    conv = run.bare_net.state_dict()["base_resnet.base.layer1.0.conv1.weight"]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_compile_where_unavailable_warns_once_and_trains_uncompiled(tmp_path_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_script, "compile_unavailable_reason", lambda device: "no C++ compiler found")
    run = setup_regdb_run(tmp_path_factory, tmp_path, "--compile")
    out = capsys.readouterr().out
    assert out.count("--compile unavailable here (no C++ compiler found)") == 1
    assert run.net is run.bare_net
