"""model.py: IRL/AGW shapes and gradients, official key layout, goldens through load_checkpoint, errors."""
import json
import os
import re
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import GOLDEN_DIR

import methods
import model as M
import resnet
from utils import CheckpointError, ConfigError

SMALL = dict(img_h=128, img_w=64)
OFFICIAL_SIZES = {"irl": (384, 192), "agw": (288, 144)}
# REFERENCE 6.2, written out independently of model.official_unused_keys.
IRL_UNUSED = re.compile(r"^((thermal|visible)_moduleA?\.(thermal|visible)\.layer[1-4]\."
                        r"|base_resnet\.base\.(conv1|bn1)\.|sin$|NAF3\.|local_conv\.|feat_bn2d\."
                        r"|layerATT[01]\.ATT_narrow2\.|layerATT2\.ATT_narrow1\.|layerATT3\.(ATT_narrow[12]|ln_1o)\.)")
AGW_UNUSED = re.compile(r"^((thermal|visible)_module\.(thermal|visible)\.layer[1-4]\."
                        r"|base_resnet\.base\.(conv1|bn1)\.)")
UNUSED = {"irl": IRL_UNUSED, "agw": AGW_UNUSED}


pytestmark = pytest.mark.usefixtures("single_thread")


def official_keys(method):
    with open(os.path.join(GOLDEN_DIR, f"{method}_official_state_dict.json")) as f:
        return json.load(f)


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def deterministic_value(key, shape):
    """REFERENCE 13.5: the value of every official state-dict entry in the golden runs."""
    r = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8"))))
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.long)
    if key.endswith("running_var"):
        return 1 + 0.1 * r.abs()
    if key.endswith("running_mean"):
        return 0.1 * r
    if key.endswith(".W.1.weight"):
        return 0.05 * r
    if len(shape) <= 1:
        return 1 + 0.1 * r if key.endswith(".weight") else 0.05 * r
    return r * (1.0 / float(np.prod(shape[1:]))) ** 0.5


def official_state(method):
    """Official-layout state dict. Unused entries (no influence on any output) are shape-correct
    broadcast zeros, so the file stays small; every used entry has its REFERENCE 13.5 value."""
    return {k: torch.zeros(()).expand(shape) if UNUSED[method].match(k) else deterministic_value(k, shape)
            for k, shape in official_keys(method).items()}


def save_official(state, path):
    """The official checkpoint format: numpy objects next to the state dict (Q-25)."""
    torch.save({"net": state, "epoch": np.int64(37), "cmc": np.linspace(0.5, 1.0, 20),
                "mAP": np.float64(0.61), "mINP": np.float64(0.42)}, path)
    return str(path)


@pytest.fixture(scope="module")
def official_models():
    """Full-size IRL (384x192) and AGW (288x144) resnet50 models, 395 classes."""
    return {m: methods.get(m).build_model(395, "resnet50", *OFFICIAL_SIZES[m]) for m in ("irl", "agw")}


def small(method="irl", arch="resnet18", num_classes=7, **kw):
    torch.manual_seed(0)
    return methods.get(method).build_model(num_classes, arch, **{**SMALL, **kw})


def views(model, batch=2, seed=0, size=(128, 64)):
    return [randn((batch, 3) + size, seed + i) for i in range(model.num_inputs)]


# ---------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("method", ["irl", "agw"])
def test_train_and_eval_shapes_gradients(method, arch):
    net = small(method, arch, num_classes=5)
    feat_dim = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}[arch]
    assert net.feat_dim == feat_dim and net.method == method
    net.train()
    xs = views(net)
    pool, logits = methods.get(net.method).forward_train(net, xs)
    n = 2 * net.num_inputs
    assert pool.shape == (n, feat_dim) and logits.shape == (n, 5)
    labels = torch.arange(n) % 5
    (F.cross_entropy(logits, labels) + pool.mean()).backward()
    trainable = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    no_grad = [k for k, p in trainable if p.grad is None]
    assert not no_grad, no_grad
    assert all(torch.isfinite(p.grad).all() for _, p in trainable)
    assert net.bottleneck.bias.grad is None and torch.all(net.bottleneck.bias == 0)
    net.eval()
    with torch.no_grad():
        for modal in (1, 2):
            pool, bn = net(*xs, modal=modal)
            assert pool.shape == bn.shape == (2, feat_dim)
            assert torch.isfinite(pool).all() and torch.isfinite(bn).all()
            torch.testing.assert_close(pool.norm(dim=1), torch.ones(2))
            torch.testing.assert_close(bn.norm(dim=1), torch.ones(2))


def test_irl_trunk_sees_the_four_views_as_one_batch():
    net = small().train()
    batches = []
    net.base_resnet.base.layer1[0].register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    with torch.no_grad():
        net(*views(net, batch=3))
    assert batches == [12]


def test_irl_eval_averages_the_two_stems_of_the_modality():
    net = small().eval()
    x1, x2, x3, x4 = views(net)
    with torch.no_grad():
        visible = net(x1, x2, x3, x4, modal=1)
        assert all(torch.equal(a, b) for a, b in zip(visible, net(x1, x2, -x3, x4 * 2, modal=1)))
        swapped = net(x2, x1, x3, x4, modal=1)      # different stems see different images
        assert not torch.allclose(visible[0], swapped[0])
        thermal = net(x1, x2, x3, x4, modal=2)
        assert all(torch.equal(a, b) for a, b in zip(thermal, net(-x1, x2 * 2, x3, x4, modal=2)))


def test_agw_modalities_use_their_own_stem():
    net = small("agw").eval()
    x1, x2 = views(net)
    with torch.no_grad():
        assert torch.equal(net(x1, x2, modal=1)[1], net(x1, -x2, modal=1)[1])
        assert torch.equal(net(x1, x2, modal=2)[1], net(-x1, x2, modal=2)[1])
        assert not torch.allclose(net(x1, x1, modal=1)[1], net(x1, x1, modal=2)[1])


def test_channels_last_gives_the_same_outputs():
    reference = small().eval()
    converted = small().eval().to(memory_format=torch.channels_last)
    xs = views(reference)
    with torch.no_grad():
        for modal in (1, 2):
            for a, b in zip(reference(*xs, modal=modal),
                            converted(*[x.contiguous(memory_format=torch.channels_last) for x in xs], modal=modal)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        reference.train()
        converted.train()
        for a, b in zip(reference(*xs), converted(*[x.contiguous(memory_format=torch.channels_last) for x in xs])):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- building blocks


def lpa_oracle(lpa, x):
    """REFERENCE 6.4 literally: chunk into quadrants, process each, reassemble, add the global branch."""
    def cbam(t):
        t = lpa.ca(t) * t
        return lpa.sa(t) * t
    top, bottom = x.chunk(2, dim=2)
    rows = [torch.cat([cbam(q) for q in half.chunk(2, dim=3)], dim=3) for half in (top, bottom)]
    return torch.cat(rows, dim=2) + cbam(x)


def test_lpa_matches_literal_quadrant_loop():
    torch.manual_seed(0)
    lpa = M.LPA(16)
    x = randn((3, 16, 8, 6), 5).relu()
    torch.testing.assert_close(lpa(x), lpa_oracle(lpa, x))


def test_channel_and_spatial_attention_definitions():
    torch.manual_seed(0)
    lpa = M.LPA(16)
    x = randn((2, 16, 4, 4), 6)
    mlp = lambda v: lpa.ca.fc2(torch.relu(lpa.ca.fc1(v)))  # noqa: E731
    expected = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    torch.testing.assert_close(lpa.ca(x), expected)
    pooled = torch.cat([x.mean(1, keepdim=True), x.max(1, keepdim=True).values], 1)
    torch.testing.assert_close(lpa.sa(x), torch.sigmoid(F.conv2d(pooled, lpa.sa.conv1.weight, padding=1)))


@pytest.mark.parametrize("inter", [1, 4])
def test_non_local_matches_literal_formula(inter):
    torch.manual_seed(0)
    block = M.Non_local(8, inter).eval()
    torch.nn.init.normal_(block.W[1].weight)     # non-zero so the attention branch shows
    x = randn((2, 8, 5, 3), 7)
    n, _, h, w = x.shape
    g = block.g(x).reshape(n, inter, -1).permute(0, 2, 1)
    theta = block.theta(x).reshape(n, inter, -1).permute(0, 2, 1)
    phi = block.phi(x).reshape(n, inter, -1)
    y = ((theta @ phi) / (h * w)) @ g
    expected = block.W(y.permute(0, 2, 1).reshape(n, inter, h, w)) + x
    torch.testing.assert_close(block(x), expected)


def test_naf_block_identity_at_init_and_layer_norm_2d():
    torch.manual_seed(0)
    naf = M.NAFBlock(8)
    x = randn((2, 8, 3, 3), 8)
    torch.testing.assert_close(naf(x), x)
    norm = M.LayerNorm2d(8)
    mu, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(norm(x), (x - mu) / (var + 1e-6).sqrt())


def test_gem_and_l2_normalize():
    x = randn((2, 4, 3, 5), 9).abs()
    torch.testing.assert_close(M.gem_pool(x), ((x ** 3).mean((2, 3)) + 1e-12) ** (1 / 3))
    torch.testing.assert_close(M.l2_normalize(x[:, :, 0, 0]).norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("edim, heads", [(288, 32), (32, 2), (1, 1), (128, 8), (70, 7)])
def test_attention_heads_rule(edim, heads):
    assert M.attention_heads(edim) == heads


def test_generalised_layer_att_sizes():
    net = small()
    assert net.layerATT0.attn.embed_dim == 8 * 4 and net.layerATT0.attn.num_heads == 2
    assert net.layerATT0.ATT_narrow.out_channels == 256 // 4      # channel tokens: layer3 width / 4
    assert [len(net.NL_2), len(net.NL_3)] == [2, 2]                 # capped by resnet18's 2 blocks per stage
    assert net.NL_2[0].inter_channels == 64 and net.delta.shape == (1, 256, 1, 1)
    assert [len(small("agw", "resnet34").NL_3)] == [3]


def test_initialisation_follows_reference():
    net = small(num_classes=50)
    assert net.bottleneck.weight.mean().item() == pytest.approx(1.0, abs=0.003)
    assert net.bottleneck.weight.std().item() == pytest.approx(0.01, rel=0.15)
    assert torch.all(net.bottleneck.bias == 0) and not net.bottleneck.bias.requires_grad
    assert net.classifier.bias is None
    assert net.classifier.weight.std().item() == pytest.approx(0.001, rel=0.1)
    for block in list(net.NL_2) + list(net.NL_3):
        assert torch.all(block.W[1].weight == 0) and torch.all(block.W[1].bias == 0)
    for naf in (net.NAF1, net.NAF2):
        assert torch.all(naf.beta == 0) and torch.all(naf.gamma == 0)
    assert torch.all(net.delta == 0) and net.delta.requires_grad
    assert torch.all(net.layerATT0.attn.in_proj_bias == 0) and torch.all(net.layerATT1.ln_1o.weight == 1)


def test_pretrained_file_initialises_every_stem_and_the_trunk(tmp_path, monkeypatch):
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(state, path)
    net = methods.get("irl").build_model(3, "resnet18", 128, 64, pretrained=str(path))
    for name, attr in net.STEMS:
        assert torch.equal(getattr(getattr(net, name), attr).conv1.weight, state["conv1.weight"])
    assert torch.equal(net.base_resnet.base.layer3[1].bn2.running_mean, state["layer3.1.bn2.running_mean"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    with pytest.raises(resnet.PretrainedWeightsError, match="--no-pretrained"):
        methods.get("agw").build_model(3, "resnet18", 128, 64, pretrained=True)


# ------------------------------------------------------------------------------------ API helpers


def test_param_groups_follow_reference_8_2():
    net = small()
    groups = M.param_groups(net, 0.1)
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1, 0.1])
    assert groups[1]["params"] == [net.bottleneck.weight] and groups[2]["params"] == [net.classifier.weight]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}
    torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scratch = M.param_groups(net, 0.1, backbone_lr_mult=1.0)
    assert [g["lr"] for g in scratch] == pytest.approx([0.1, 0.1, 0.1])


def test_forward_views_checks_the_view_count():
    net = small("agw").train()
    xs = views(net)
    torch.manual_seed(0)
    pool, logits = methods.get(net.method).forward_train(net, xs)
    assert pool.shape == (4, 512)
    with pytest.raises(ConfigError, match="2 views"):
        methods.get(net.method).forward_train(net, xs + xs)


def test_extract_features_is_float64_eval_and_restores_mode():
    net = small().train()
    batches = [(randn((3, 3, 128, 64), 20), torch.zeros(3)), (randn((2, 3, 128, 64), 21), torch.zeros(2))]
    features = M.extract_features(net, batches, modal=2, device="cpu", progress=False)
    assert list(features) == ["pool", "bn"]
    pool, bn = features["pool"], features["bn"]
    assert net.training
    assert pool.dtype == bn.dtype == np.float64 and pool.shape == bn.shape == (5, 512)
    net.eval()
    with torch.no_grad():
        x = batches[1][0]
        expected_pool, expected_bn = net(x, x, x, x, modal=2)
    np.testing.assert_allclose(pool[3:], expected_pool.numpy(), atol=1e-6)
    np.testing.assert_allclose(bn[3:], expected_bn.numpy(), atol=1e-6)
    channels_last = M.extract_features(net, batches, modal=2, device="cpu", channels_last=True, progress=False)
    np.testing.assert_allclose(channels_last["pool"], pool, atol=1e-5)
    np.testing.assert_allclose(channels_last["bn"], bn, atol=1e-5)
    empty = M.extract_features(net, [], modal=2, device="cpu", progress=False)
    assert {name: value.shape for name, value in empty.items()} == {"pool": (0, 512), "bn": (0, 512)}
    with pytest.raises(ConfigError, match="modal"):
        M.extract_features(net, batches, modal=0, device="cpu", progress=False)


# ---------------------------------------------------------------------------------- size checks


@pytest.mark.parametrize("size", [(100, 50), (384, 190), (0, 64)])
def test_irl_rejects_sizes_it_cannot_run(size):
    with pytest.raises(ConfigError, match="multiples of 16|positive"):
        methods.get("irl").build_model(3, "resnet18", *size)


def test_irl_rejects_inputs_of_another_size():
    net = small().eval()
    with pytest.raises(ConfigError, match="built for 128x64 inputs got 256x128"):
        net(*views(net, size=(256, 128)), modal=1)


def test_agw_runs_at_any_size():
    net = small("agw", img_h=100, img_w=50).eval()
    with torch.no_grad():
        assert net(*views(net, size=(96, 40)), modal=1)[0].shape == (2, 512)


@pytest.mark.parametrize("kwargs, pattern", [(dict(method="bot"), "unknown method"),
                                             (dict(arch="resnet101"), "unknown arch"),
                                             (dict(num_classes=0), "num_classes")])
def test_build_model_rejects_bad_configuration(kwargs, pattern):
    args = {"method": "irl", "num_classes": 3, "arch": "resnet18", **SMALL, **kwargs}
    with pytest.raises(ConfigError, match=pattern):
        methods.get(args.pop("method")).build_model(**args)


def test_bad_modal():
    net = small("agw")
    with pytest.raises(ConfigError, match="modal"):
        net(*views(net), modal=3)


# -------------------------------------------------------------------- official layout and goldens


@pytest.mark.parametrize("method", ["irl", "agw"])
def test_our_keys_are_the_official_ones_minus_the_unused(official_models, method):
    net = official_models[method]
    official = official_keys(method)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert set(ours) <= set(official)
    assert all(official[k] == shape for k, shape in ours.items())
    leftovers = set(official) - set(ours)
    assert leftovers == {k for k in official if UNUSED[method].match(k)}
    assert leftovers == net.official_unused_keys()


def test_official_irl_parameter_totals(official_models):
    net = official_models["irl"]
    official = official_keys("irl")
    unused_numel = sum(int(np.prod(s)) for k, s in official.items() if IRL_UNUSED.match(k))
    ours_numel = sum(v.numel() for v in net.state_dict().values())
    assert ours_numel == sum(int(np.prod(s)) for s in official.values()) - unused_numel
    assert net.layerATT0.attn.num_heads == 32


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("official")
    return {m: save_official(official_state(m), folder / f"{m}_official.t") for m in ("irl", "agw")}


@pytest.mark.parametrize("method", ["irl", "agw"])
def test_goldens_through_official_checkpoint(official_models, official_files, method):
    net = official_models[method]
    meta = M.load_checkpoint(net, official_files[method])
    assert meta["format"] == "official" and meta["epoch"] == 37 and meta["mAP"] == pytest.approx(0.61)
    assert isinstance(meta["cmc"], list) and len(meta["cmc"]) == 20
    golden = np.load(os.path.join(GOLDEN_DIR, f"{method}_model_golden.npz"))
    h, w = OFFICIAL_SIZES[method]
    x1, x2, x3, x4 = (randn((2, 3, h, w), s) for s in (1, 2, 3, 4))
    args = {4: (x1, x2, x3, x4), 2: (x1, x3)}[net.num_inputs]       # visible x1 (x2), infrared x3 (x4)
    net.eval()
    with torch.no_grad():
        for modal in (1, 2):
            pool, bn = net(*args, modal=modal)
            np.testing.assert_allclose(pool.numpy(), golden[f"eval_modal{modal}_pool"], rtol=0, atol=1e-5)
            np.testing.assert_allclose(bn.numpy(), golden[f"eval_modal{modal}_bn"], rtol=0, atol=1e-5)
        net.train()
        pool, logits = net(*args)
    np.testing.assert_allclose(pool.numpy(), golden["train_pool"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(logits.numpy(), golden["train_logits"], rtol=0, atol=2e-3)


def assert_rejected(net, state, *patterns, source=None):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError) as excinfo:
        M.load_checkpoint(net, state, source=source)
    message = str(excinfo.value)
    for pattern in patterns:
        assert re.search(pattern, message), message
    assert "\n" not in message
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items()), "loaded despite the error"


@pytest.fixture(scope="module")
def irl_official_state():
    return official_state("irl")


def test_official_class_count_mismatch(official_models, irl_official_state):
    state = dict(irl_official_state, **{"classifier.weight": torch.zeros(206, 2048)})
    assert_rejected(official_models["irl"], {"net": state}, "checkpoint has 206 classes, model has 395",
                    r"classifier\.weight checkpoint \[206, 2048\] vs model \[395, 2048\]")


def test_official_leftovers_must_be_exactly_the_unused_set(official_models, irl_official_state):
    net = official_models["irl"]
    assert_rejected(net, {"net": dict(irl_official_state, bogus=torch.zeros(1))}, "unexpected 1 keys: bogus")
    assert_rejected(net, {"net": dict(irl_official_state, bogus=torch.zeros(1))}, "^runs/x_best.t ",
                    source="runs/x_best.t")      # an already-loaded checkpoint is named by `source`
    no_sin = {k: v for k, v in irl_official_state.items() if k != "sin"}
    assert_rejected(net, {"net": no_sin}, "missing 1 keys: sin")
    no_used = {k: v for k, v in irl_official_state.items() if not k.startswith("NAF1.")}
    assert_rejected(net, {"net": no_used}, r"missing 18 keys: NAF1\.beta")


def test_agw_checkpoint_into_irl_model(official_models):
    assert_rejected(official_models["irl"], {"net": official_state("agw")}, r"missing \d+ keys",
                    r"NL_2\.0\.g\.0\.weight checkpoint \[1, 512, 1, 1\]")


def test_our_format_round_trip_with_module_prefix(tmp_path):
    source = small()
    with torch.no_grad():
        source.delta.fill_(0.5)
    ckpt = {"format": M.CHECKPOINT_FORMAT, "model": {"module." + k: v for k, v in source.state_dict().items()},
            "epoch": 4, "config": {"method": "irl", "arch": "resnet18", "num_classes": 7, "img_h": 128, "img_w": 64}}
    path = tmp_path / "ours.pth"
    torch.save(ckpt, path)
    target = small()
    meta = M.load_checkpoint(target, str(path))
    assert meta["format"] == M.CHECKPOINT_FORMAT and meta["epoch"] == 4 and meta["config"]["arch"] == "resnet18"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    assert M.load_checkpoint(small(), source.state_dict())["format"] == "state_dict"


def test_our_format_mismatches():
    source = small(num_classes=7).state_dict()
    ours = {"format": M.CHECKPOINT_FORMAT, "model": source, "config": {"method": "irl", "arch": "resnet18"}}
    assert_rejected(small(num_classes=9), ours, "checkpoint has 7 classes, model has 9")
    assert_rejected(small("agw"), ours, "saved from a irl/resnet18 model; this model is agw/resnet18")
    assert_rejected(small(img_h=256, img_w=128), ours, "layerATT shapes follow the input size")
    assert_rejected(small(), dict(ours, model=dict(source, extra=torch.zeros(1))), "unexpected 1 keys: extra")


@pytest.mark.parametrize("ckpt, pattern", [({"format": "other", "model": {}}, "unknown checkpoint format"),
                                           ({"weights": 1}, "not a model checkpoint"),
                                           ([1, 2], "expected a dict")])
def test_not_a_checkpoint(ckpt, pattern):
    assert_rejected(small("agw"), ckpt, pattern)


def test_corrupt_checkpoint_file(tmp_path):
    path = tmp_path / "broken.t"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="broken.t"):
        M.load_checkpoint(small("agw"), str(path))
