"""Every registered method through the uniform interface (timm-style), CAJ end to end, and a toy method that
a test registers without editing any file of the toolkit."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T

import data_loader
import method_agw
import methods
import model as M
import utils
from conftest import SPEC_GOLDEN_DIR
from test_model import official_state, save_official
from test_train import TINY, load_script, run_script, workspace

train_script = load_script("train")
test_script = load_script("test")
CAJ_GOLDENS = os.path.join(SPEC_GOLDEN_DIR, "caj_goldens.npz")
SIZE = (64, 32)      # a size every method accepts (IRL: multiples of 16)


def batch_of_views(method, batch=2, seed=0):
    """One synthetic training batch: each view transforms its own random uint8 images (real transforms)."""
    rng = np.random.default_rng(seed)
    images = {m: rng.integers(0, 256, (batch,) + SIZE + (3,), dtype=np.uint8) for m in data_loader.VIEW_MODALITIES}
    return [torch.stack([transform(image) for image in images[modality]])
            for modality, transform in method.train_views(*SIZE)]


def config_for(method):
    return {"loss_tri": method.defaults["loss_tri"], "margin": method.defaults["margin"]}


@pytest.fixture(params=methods.names())
def method(request, single_thread):
    return methods.get(request.param)


def test_every_method_trains_a_step_with_gradients_everywhere_and_evaluates(method):
    torch.manual_seed(0)
    net = method.build_model(5, "resnet18", *SIZE)
    assert net.method == method.name
    views = batch_of_views(method)
    labels = method.train_labels(torch.tensor([1, 3]), torch.tensor([1, 3]))
    assert labels.numel() == 2 * len(method.view_modalities)
    net.train()
    outputs = method.forward_train(net, views)
    terms = method.build_criterion(config_for(method))(outputs, labels)
    assert len(terms) >= 2 and all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    logits = method.classification_logits(outputs)
    assert logits.shape == (labels.numel(), 5)
    optimizer = torch.optim.SGD(M.param_groups(net, 0.01), lr=0.01, momentum=0.9)
    sum(terms.values()).backward()
    trainable = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    assert not [k for k, p in trainable if p.grad is None]
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    before = {k: p.detach().clone() for k, p in trainable}
    optimizer.step()
    assert any(not torch.equal(before[k], p) for k, p in trainable)
    net.eval()
    with torch.no_grad():
        for modal in (1, 2):
            pool, bn = net(*([views[0]] * net.num_inputs), modal=modal)
            assert torch.isfinite(pool).all() and torch.isfinite(bn).all()


def test_every_method_round_trips_through_a_checkpoint(method, tmp_path):
    torch.manual_seed(0)
    net = method.build_model(5, "resnet18", *SIZE)
    path = tmp_path / "ckpt.pth"
    utils.save_checkpoint_atomic({"format": M.CHECKPOINT_FORMAT, "model": net.state_dict(),
                                  "config": {"method": method.name, "arch": "resnet18"}}, path)
    torch.manual_seed(1)
    other = method.build_model(5, "resnet18", *SIZE)
    M.load_checkpoint(other, str(path))
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), other.state_dict().values()))
    foreign = [m for m in methods.names() if methods.get(m).network is not method.network][:1]
    for name in foreign:           # a checkpoint of another method's network is refused by name
        with pytest.raises(utils.CheckpointError, match="was saved from"):
            M.load_checkpoint(methods.get(name).build_model(5, "resnet18", *SIZE), str(path))


def test_every_method_has_a_complete_recipe(method):
    needed = {"img_h", "img_w", "batch_size", "num_pos", "lr", "epochs", "loss_tri", "margin", "lr_scheduler",
              "warmup_epochs", "milestones", "eval_every", "amp"}
    assert needed <= set(method.defaults)
    method.check_input_size(method.defaults["img_h"], method.defaults["img_w"])
    assert method.title and set(method.report_modes) == {"sysu", "regdb", "llcm"}


def test_unknown_method_names_the_choices():
    with pytest.raises(utils.ConfigError, match="unknown method 'bot'; choose from irl, agw, caj"):
        methods.get("bot")


# ------------------------------------------------------------------------------------------------ CAJ


def test_caj_recipe_is_agw_with_100_epochs_and_the_adp_triplet():
    caj, agw = methods.get("caj"), methods.get("agw")
    assert caj.network is agw.network is M.AGW
    assert caj.defaults == dict(agw.defaults, epochs=100, loss_tri="ADP")
    assert caj.view_modalities == ("rgb", "rgb", "ir")
    criterion = caj.build_criterion(config_for(caj))
    assert (criterion.metric.alpha, criterion.metric.gamma, criterion.metric.square) == (1, 1, 1)


def test_caj_chains_follow_the_official_data_loader():
    names = [[type(t).__name__ for t in transform.transforms] for _, transform in methods.get("caj").train_views(288, 144)]
    base = ["ToPILImage", "Pad", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize", "ChannelRandomErasing"]
    assert names == [base, base + ["ChannelExchange"], base + ["ChannelAdapGrayCAJ"]]


def test_caj_sends_both_visible_views_through_the_visible_stem_in_one_batch():
    caj = methods.get("caj")
    net = caj.build_model(5, "resnet18", *SIZE).train()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0]
        return hook

    for name in ("visible_module", "thermal_module"):
        getattr(net, name).register_forward_hook(record(name))
    views = batch_of_views(caj, batch=3)
    with torch.no_grad():
        pool, logits = caj.forward_train(net, views)
    assert torch.equal(seen["visible_module"], torch.cat(views[:2])) and torch.equal(seen["thermal_module"], views[2])
    assert pool.shape[0] == logits.shape[0] == 9


class StubNet(nn.Module):
    """Returns the golden features of testa.py's stub net call by call, checking each call's images; its test
    features are the AGW-family networks' (CrossModalNet.test_features)."""

    num_inputs, feat_dim = 2, 16
    test_features = M.CrossModalNet.test_features

    def __init__(self, golden):
        super().__init__()
        self.golden, self.calls = golden, 0
        images = torch.from_numpy(golden["tta__images"])
        flipped = torch.from_numpy(golden["tta__fliplr_of_images"])
        self.expected = [images[:3], flipped[:3], images[3:], flipped[3:]]

    def forward(self, x_rgb, x_ir, modal=0):
        assert torch.equal(x_rgb, self.expected[self.calls]) and torch.equal(x_ir, x_rgb)
        pool, fc = (torch.from_numpy(self.golden[f"tta__call{self.calls}_feat_{k}"]) for k in ("pool", "fc"))
        self.calls += 1
        return pool, fc


def test_flip_reproduces_the_caj_test_time_augmentation_golden():
    golden = np.load(CAJ_GOLDENS)
    images = torch.from_numpy(golden["tta__images"])
    loader = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))]
    net = StubNet(golden)
    features = M.extract_features(net, loader, modal=1, device="cpu", flip=True, progress=False)
    pool, bn = features["pool"], features["bn"]
    assert net.calls == 4
    np.testing.assert_allclose(pool, golden["tta__extract_gall_feat__pool"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(bn, golden["tta__extract_gall_feat__fc"], rtol=0, atol=1e-7)


def literal_flip_average(a, b):
    """testa.py, one row at a time: mean of the two normalised features, divided by its norm."""
    out = np.zeros_like(a)
    for i in range(len(a)):
        mean = [(a[i, j] + b[i, j]) / 2 for j in range(a.shape[1])]
        norm = sum(v * v for v in mean) ** 0.5
        out[i] = [v / norm for v in mean]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_flip_average_matches_a_literal_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    a, b = (M.l2_normalize(torch.randn(6, 9, generator=gen, dtype=dtype)) for _ in range(2))
    expected = literal_flip_average(a.numpy(), b.numpy())
    np.testing.assert_allclose(M.flip_average(a, b).numpy(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12)


def train_tiny(ws, tmp_path, dataset, method):
    """(train.py stdout, model folder, log folder, best checkpoint name) of one tiny epoch of `method`."""
    model_path, log_path = str(tmp_path / "runs"), str(tmp_path / "logs")
    out = run_script("train.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--method", method,
                                  "--model_path", model_path, "--log_path", log_path, *TINY, "--epochs", "1"],
                     cwd=ws.base).stdout
    (best,) = [f for f in os.listdir(model_path) if f.endswith("_best.pth")]
    assert best.startswith(f"{dataset}_{method}_p2_n4_")
    return out, model_path, log_path, best


@pytest.mark.parametrize("dataset", ["sysu", "regdb", "llcm"])
def test_caj_trains_and_tests_with_flip_on_every_dataset(tmp_path_factory, tmp_path, dataset):
    ws = workspace(tmp_path_factory)
    out, model_path, log_path, best = train_tiny(ws, tmp_path, dataset, "caj")
    assert ", ADP " in out and "(id " in out        # the loss terms by name, in the step and epoch lines
    with open(os.path.join(log_path, best.replace("_best.pth", "_metrics.jsonl"))) as f:
        (record,) = [json.loads(line) for line in f]
    assert set(record["loss_terms"]) == {"id", "ADP"}
    results = tmp_path / "flip.json"
    test_out = run_script("test.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--resume",
                                      os.path.join(model_path, best), "--device", "cpu", "--workers", "0",
                                      "--num-trials", "2", "--flip", "--output", str(results)], cwd=ws.base).stdout
    summary = json.loads(results.read_text())
    assert (summary["model"]["method"], summary["protocol"]["flip"]) == ("caj", True)
    assert summary["protocol"]["name"].endswith("-flip") and "+ flip" in test_out


def test_an_official_caj_checkpoint_loads_as_agw_weights_and_evaluates(tmp_path_factory, tmp_path):
    ws = workspace(tmp_path_factory)
    path = save_official(official_state("agw"), tmp_path / "sysu_caj_official_best.t")
    common = ["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", path, "--device", "cpu",
              "--workers", "0", "--num-trials", "1"]
    summaries = {}
    for method, flags in (("caj", ["--flip"]), ("caj", []), ("agw", [])):
        out = tmp_path / f"{method}{''.join(flags)}.json"
        run_script("test.py", [*common, "--method", method, *flags, "--output", str(out)], cwd=ws.base)
        summaries[(method, bool(flags))] = json.loads(out.read_text())
    caj = summaries[("caj", False)]
    assert caj["model"] == {"method": "caj", "arch": "resnet50", "img_h": 288, "img_w": 144, "num_classes": 395,
                            "source": "official checkpoint"}
    assert caj["per_trial"] == summaries[("agw", False)]["per_trial"]       # the same network and weights
    assert summaries[("caj", True)]["protocol"]["name"] == "sysu-all-single-flip"


# ------------------------------------------------------------------------------------------ a toy method


class ToyMethod(method_agw.AGWMethod):
    """The AGW network trained with cross-entropy alone, on plain resized views: a method written in a test."""

    name = "toy"
    title = "toy (test only)"
    defaults = dict(method_agw.AGWMethod.defaults, loss_tri="OriTriplet")

    def view_transforms(self, img_h, img_w, dataset=None):
        transform = T.Compose([T.ToPILImage(), T.Resize((img_h, img_w)), *data_loader.to_normalized_tensor()])
        return transform, transform

    def build_criterion(self, config):
        cross_entropy = nn.CrossEntropyLoss()
        return lambda outputs, labels: {"ce": cross_entropy(outputs[1].float(), labels)}


@pytest.fixture
def toy_method():
    method = methods.register(ToyMethod())
    yield method
    methods.unregister(method.name)


def test_a_method_registered_in_a_test_trains_and_evaluates_through_the_scripts(toy_method, tmp_path_factory,
                                                                               tmp_path, capsys):
    ws = workspace(tmp_path_factory)
    argv = ["--dataset", "regdb", "--data-path", ws.data["regdb"], "--method", "toy", "--model_path",
            str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs"), *TINY, "--epochs", "1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_script.main(argv) == 0
        out = capsys.readouterr().out
        assert "(ce " in out and "Finished 1 epoch" in out
        (best,) = [f for f in os.listdir(tmp_path / "runs") if f.endswith("_best.pth")]
        results = tmp_path / "toy.json"
        assert test_script.main(["--dataset", "regdb", "--data-path", ws.data["regdb"], "--resume",
                                 str(tmp_path / "runs" / best), "--device", "cpu", "--workers", "0",
                                 "--output", str(results)]) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(results.read_text())
    assert summary["model"]["method"] == "toy" and summary["protocol"]["modes"] == ["bn", "pool"]
    assert 0 <= summary["mean"]["bn"]["mAP"] <= 1


def test_grad_checkpoint_flag_reaches_the_network_and_deen_refuses_it(tmp_path_factory, tmp_path, monkeypatch, capsys):
    ws = workspace(tmp_path_factory)
    calls = []
    monkeypatch.setattr(M.CrossModalNet, "set_grad_checkpointing", lambda net, enabled=True: calls.append(enabled))
    common = ["--dataset", "regdb", "--data-path", ws.data["regdb"], "--model_path", str(tmp_path / "runs"),
              "--log_path", str(tmp_path / "logs"), *TINY]
    for flags, expected in (([], False), (["--grad-checkpoint"], True)):
        run, _ = train_script.setup_run(train_script.build_parser().parse_args([*common, "--method", "agw", *flags]))
        assert calls[-1] is expected and run.config["grad_checkpoint"] is expected
    assert train_script.main([*common, "--method", "deen", "--grad-checkpoint"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grad-checkpoint is not available for DEEN") and err.count("\n") == 1
