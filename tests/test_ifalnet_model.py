"""IFALNet network (model_ifalnet.py): the official key layout of METHODS.md 2.2 (no goldens exist: no official
checkpoint was released), official-format checkpoints with key-seeded weights, deterministic outputs, the
degenerate SE and its channel selection, the block routing of the trunk, the MIA and MFA blocks against
literal transcriptions of the official code.

`python tests/test_ifalnet_model.py` rewrites tests/golden/ifalnet_keys.json from `spec_key_layout`.
"""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
import model_ifalnet as I
from conftest import GOLDEN_DIR
from test_deen_model import fill_tensor
from utils import CheckpointError

KEYS = os.path.join(GOLDEN_DIR, "ifalnet_keys.json")
OFFICIAL_CLASSES = 395          # the official SYSU training set
SIZE = (64, 32)


# ------------------------------------------------------------------------------------- the spec's key layout


def spec_key_layout(num_classes=OFFICIAL_CLASSES):
    """[(key, shape)] of the official IFALNet state dict, written out from METHODS.md 2.2's listing in the
    official registration order; the five ResNet-50 copies take the official ResNet-50 keys of the AGW
    checkpoint's visible stem (318 each, tests/golden/agw_official_state_dict.json)."""
    with open(os.path.join(GOLDEN_DIR, "agw_official_state_dict.json")) as f:
        agw = json.load(f)
    resnet50 = [(k[len("visible_module.visible."):], s) for k, s in agw.items() if k.startswith("visible_module.visible.")]

    def conv(name, out, inp, kernel, bias):
        return [(f"{name}.weight", [out, inp, kernel, kernel])] + ([(f"{name}.bias", [out])] if bias else [])

    def batch_norm(name, c):
        return [(f"{name}.{p}", [c]) for p in ("weight", "bias", "running_mean", "running_var")] + \
            [(f"{name}.num_batches_tracked", [])]

    keys = [(f"{prefix}.{k}", s) for prefix in ("thermal_module.thermal", "visible_module.visible",
                                                 "thermal_moduleA.thermal", "visible_moduleA.visible",
                                                 "base_resnet.base") for k, s in resnet50]
    keys += batch_norm("bottleneck", 2048) + [("classifier.weight", [num_classes, 2048])]
    for m in (1, 2):
        keys += conv(f"encode{m}", 1, 3, 1, True) + conv(f"fc{m}", 1, 1, 1, True) + batch_norm(f"bn{m}", 1)
    keys += conv("encode3", 6, 1, 1, True) + [("SEnet.fc.0.weight", [0, 6]), ("SEnet.fc.2.weight", [6, 0])]
    keys += conv("decode", 3, 3, 1, True)
    for k, c in ((1, 256), (2, 512), (3, 1024)):
        keys += [(f"MIA{k}.CBAM_ori.ca.fc1.weight", [c // 16, c, 1, 1]),
                 (f"MIA{k}.CBAM_ori.ca.fc2.weight", [c, c // 16, 1, 1]),
                 (f"MIA{k}.CBAM_ori.sa.conv1.weight", [1, 2, 7, 7])]
        keys += conv(f"MIA{k}.conv_narrow1", 2 * c, c, 2, True) + conv(f"MIA{k}.conv_narrow2", 2 * c, c, 2, True)
    keys += [(f"MFA.FC{branch}{i}.weight", [256, 1024, 3, 3]) for branch in (1, 2) for i in (1, 2, 3, 4)]
    keys += conv("MFA.FC1", 512, 256, 1, True) + conv("MFA.FC2", 512, 1024, 1, True)
    keys += conv("MFA.conv_o.0", 1024, 512, 1, False) + batch_norm("MFA.conv_o.1", 1024)
    return keys


def write_keys(path=KEYS):
    keys = spec_key_layout()
    lines = ",\n".join(json.dumps([k, s]) for k, s in keys)
    with open(path, "w") as f:
        f.write(f'{{"source": "METHODS.md 2.2 (tests/test_ifalnet_model.py spec_key_layout)", '
                f'"num_classes": {OFFICIAL_CLASSES}, "count": {len(keys)}, "keys": [\n{lines}\n]}}\n')


@pytest.fixture(scope="module")
def official_keys():
    with open(KEYS) as f:
        return json.load(f)


def test_the_checked_in_key_list_is_the_spec_layout_of_1659_entries(official_keys):
    assert [(k, s) for k, s in official_keys["keys"]] == spec_key_layout()
    assert official_keys["count"] == len(official_keys["keys"]) == 1659      # METHODS.md 2.2's count holds


@pytest.fixture(scope="module")
def resnet50_net():
    torch.manual_seed(0)
    return I.IFALNet(OFFICIAL_CLASSES, "resnet50", *SIZE)


def test_keys_are_the_official_ones_in_official_order(official_keys, resnet50_net):
    official = dict((k, s) for k, s in official_keys["keys"])
    ours = resnet50_net.state_dict()
    unused = resnet50_net.official_unused_keys()
    assert unused <= set(official) and not unused & set(ours)
    assert list(ours) == [k for k, _ in official_keys["keys"] if k not in unused]
    assert all(list(ours[k].shape) == official[k] for k in ours)
    # 4 stems x 312 (layer1..4), the trunk's conv1/bn1 (6) and MIA3's two residual convolutions (4).
    assert len(unused) == 4 * 312 + 6 + 4


def official_state(official_keys, zeros=frozenset()):
    """An official IFALNet state dict, each entry filled by the goldens' key-seeded rule
    (goldens_deen_caj_mmn/README.md section 4) except the zero-size SE weights, which stay empty (the rule has no
    fan-in for them), and the keys in `zeros`, broadcast zeros that take no memory (entries the network drops)."""
    state = {}
    for key, shape in official_keys["keys"]:
        if 0 in shape:
            state[key] = torch.zeros(shape)
        elif key in zeros:
            state[key] = torch.zeros((), dtype=torch.int64 if key.endswith("num_batches_tracked") else None).expand(shape)
        else:
            state[key] = fill_tensor(key, tuple(shape), "int64" if key.endswith("num_batches_tracked") else "float32")
    return state


def eval_features(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, *SIZE, generator=gen)
    net.eval()
    with torch.no_grad():
        return {modal: net.test_features(images, modal) for modal in (1, 2)}


def test_an_official_state_loads_strictly_and_evaluates_deterministically(official_keys, resnet50_net):
    state = official_state(official_keys, zeros=resnet50_net.official_unused_keys())
    outputs = []
    for seed in (1, 2):        # two networks of other random initialisations, the same checkpoint
        torch.manual_seed(seed)
        net = I.IFALNet(OFFICIAL_CLASSES, "resnet50", *SIZE)
        meta = M.load_checkpoint(net, {"net": state, "epoch": np.int64(3)}, source="official.t")
        assert meta["format"] == "official" and meta["epoch"] == 3
        assert torch.equal(net.MFA.FC1.weight, state["MFA.FC1.weight"])
        assert net.SEnet.fc[0].weight.shape == (0, 6) and net.SEnet.fc[2].weight.shape == (6, 0)
        outputs.append(eval_features(net))
    for modal in (1, 2):
        assert set(outputs[0][modal]) == {"pool", "bn", "pool_m", "bn_m"}
        for name, feats in outputs[0][modal].items():
            assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
            assert torch.equal(feats, outputs[1][modal][name]), (modal, name)
    # Key-seeded encode3 rows differ, so these outputs hold for the documented channel rule (channels 0, 1, 2).
    assert net.channel_choice_matters()


def test_a_wrong_official_state_is_refused_with_the_keys_named(official_keys, resnet50_net):
    state = official_state(official_keys, zeros={k for k, _ in official_keys["keys"]})
    del state["MIA2.conv_narrow2.bias"]
    state["MIA4.conv_narrow1.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="missing 1 keys: MIA2.conv_narrow2.bias.*unexpected 1 keys: MIA4"):
        M.load_checkpoint(resnet50_net, {"net": state})


@pytest.mark.slow
def test_an_official_file_with_every_key_filled_loads_twice_to_bitwise_equal_outputs(official_keys, tmp_path):
    path = tmp_path / "sysu_base_p4_n4_lr_0.1_seed_0_best.t"
    torch.save({"net": official_state(official_keys), "epoch": np.int64(7), "mAP": np.float64(0.5)}, path)
    outputs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = I.IFALNet(OFFICIAL_CLASSES, "resnet50", *SIZE)
        assert M.load_checkpoint(net, str(path))["format"] == "official"
        outputs.append(eval_features(net))
    assert all(torch.equal(outputs[0][m][k], outputs[1][m][k]) for m in (1, 2) for k in outputs[0][m])


# ------------------------------------------------------------------------------ generator and channel choice


@pytest.fixture
def tiny_net(single_thread):
    torch.manual_seed(0)
    return I.IFALNet(5, "resnet18", *SIZE)


def test_the_degenerate_se_weighs_every_channel_one_half_and_selects_channels_0_1_2(tiny_net):
    x = torch.rand(3, 6, 5, 4) * 10
    scaled, weights = tiny_net.SEnet(x)
    assert torch.equal(weights, torch.full((3, 6), 0.5)) and torch.equal(scaled, x * 0.5)
    assert I.top_channels(weights).tolist() == [[0, 1, 2]] * 3


def test_top_channels_is_topk_without_ties_and_lowest_index_first_with_them():
    weights = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(I.top_channels(weights), weights.topk(3, dim=1)[1])
    tied = torch.tensor([[0.1, 0.7, 0.7, 0.2, 0.7, 0.7]])
    assert I.top_channels(tied).tolist() == [[1, 2, 4]]


def literal_middle_image(net, gray):
    """The official generator tail: encode3, SE, then per image the three channels k[i][0..2], decode."""
    x, weights = net.SEnet(F.relu(net.encode3(gray)))
    k = I.top_channels(weights)
    rows = [torch.cat([x[i:i + 1, int(k[i][j]):int(k[i][j]) + 1] for j in range(3)], 1) for i in range(x.size(0))]
    return F.relu(net.decode(torch.cat(rows, 0)))


def test_middle_image_matches_the_official_per_image_loop_and_ignores_unselected_channels(tiny_net):
    gray = torch.randn(4, 1, 8, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tiny_net.encode3.weight.copy_(torch.randn(6, 1, 1, 1, generator=torch.Generator().manual_seed(2)))
        tiny_net.decode.weight.copy_(torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(3)))
        expected = literal_middle_image(tiny_net, gray)
        assert torch.equal(tiny_net.middle_image(gray), expected)
        tiny_net.encode3.bias[4] += 1          # an unselected channel: the M-image does not change
        assert torch.equal(tiny_net.middle_image(gray), expected)
        tiny_net.encode3.bias[1] += 1          # a selected one: it does
        assert not torch.allclose(tiny_net.middle_image(gray), expected)


def test_channel_choice_matters_only_when_encode3_channels_differ(tiny_net):
    assert not tiny_net.channel_choice_matters()          # the official constant initialisation
    with torch.no_grad():
        tiny_net.encode3.bias[5] = 0.1
    assert tiny_net.channel_choice_matters()


def trained_tiny_net(steps=1):
    """A tiny IFALNet (32x16 inputs) after SGD steps of the official recipe (Nesterov, weight decay)."""
    torch.manual_seed(0)
    net = I.IFALNet(5, "resnet18", 32, 16).train()
    optimizer = torch.optim.SGD(M.param_groups(net, 0.1), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(6)
    labels = torch.tensor([0, 0, 1, 1] * 4)
    for _ in range(steps):
        pool, logits = net(*(torch.randn(4, 3, 32, 16, generator=gen) for _ in range(4)))
        optimizer.zero_grad()
        (F.cross_entropy(logits, labels) + pool.mean()).backward()
        optimizer.step()
    return net


def test_a_loaded_checkpoint_brings_the_channels_its_training_selected(single_thread):
    trained = trained_tiny_net()
    # The selected channels 0-2 moved together; the unused 3-5 kept bias 0 exactly.
    assert trained.trained_channels() == (0, 1, 2) and trained.middle_channels is None
    bias = trained.encode3.bias.detach()
    assert torch.equal(bias[:3], bias[:1].expand(3)) and torch.equal(bias[3:], torch.zeros(3))
    gray = torch.randn(3, 1, 8, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = trained.middle_image(gray)
    # A checkpoint whose training selected 3-5 instead (another device's tie-breaking): the same generator.
    state = trained.state_dict()
    swapped = {**state, "encode3.weight": state["encode3.weight"][[3, 4, 5, 0, 1, 2]],
               "encode3.bias": state["encode3.bias"][[3, 4, 5, 0, 1, 2]]}
    for checkpoint, channels in ((state, (0, 1, 2)), (swapped, (3, 4, 5))):
        net = I.IFALNet(5, "resnet18", 32, 16)
        M.load_checkpoint(net, checkpoint)
        assert net.middle_channels == channels
        with torch.no_grad():
            torch.testing.assert_close(net.middle_image(gray), expected, rtol=0, atol=0)
    fresh = I.IFALNet(5, "resnet18", 32, 16)
    M.load_checkpoint(fresh, I.IFALNet(5, "resnet18", 32, 16).state_dict())
    assert fresh.middle_channels is None           # all six at the initial values: the rule (0, 1, 2) holds


# ------------------------------------------------------------------------------------------ routing and blocks


def test_training_forward_sends_each_view_to_its_stem_in_one_batch(tiny_net):
    seen = {}
    for name in ("visible_module", "visible_moduleA", "thermal_module", "thermal_moduleA"):
        getattr(tiny_net, name).register_forward_hook(lambda m, inputs, out, name=name: seen.__setitem__(name, inputs[0]))
    views = [torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    tiny_net.train()
    with torch.no_grad():
        pool, logits = tiny_net(*views)
        middle_vis, middle_ir = literal_middle_image(tiny_net, torch.cat((
            F.batch_norm(F.relu(tiny_net.fc1(F.relu(tiny_net.encode1(views[1])))), None, None, training=True),
            F.batch_norm(F.relu(tiny_net.fc2(F.relu(tiny_net.encode2(views[3])))), None, None, training=True)))).chunk(2)
    assert pool.shape == (8, 512) and logits.shape == (8, 5)
    assert torch.equal(seen["visible_module"], views[0]) and torch.equal(seen["thermal_module"], views[2])
    # bn1 / bn2 (weight 1, bias 0 at initialisation) normalise each modality's gray maps by their own statistics.
    torch.testing.assert_close(seen["visible_moduleA"], middle_vis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(seen["thermal_moduleA"], middle_ir, rtol=1e-5, atol=1e-6)


def test_eval_rows_are_the_original_stem_then_the_middle_stem(tiny_net):
    tiny_net.eval()
    a, b, c = (torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with torch.no_grad():
        for modal, (first, second) in ((1, (0, 1)), (2, (2, 3))):
            def run(original, middle):
                inputs = [a, a, a, a]
                inputs[first], inputs[second] = original, middle
                return tiny_net(*inputs, modal=modal)[1]
            reference, other_middle, other_original = run(a, b), run(a, c), run(c, b)
            torch.testing.assert_close(reference[:2], other_middle[:2], rtol=0, atol=1e-6)   # o rows: stem input only
            torch.testing.assert_close(reference[2:], other_original[2:], rtol=0, atol=1e-6)  # m rows: M-image only
            # The M-image changes the m rows by far more than the tolerance above (the generator is near-constant
            # at initialisation, hence the small scale).
            assert (reference[2:] - other_middle[2:]).abs().max() > 1e-5


def literal_mia_chain(mias, xs):
    """The official MIA1..3 calls on (x_1, x_2) maps of three stages, with the official CBAM (x*ca, then *sa)."""
    def cbam(cb, x):
        out = x * cb.ca(x)
        return out * cb.sa(out)
    outputs, res1, res2 = [], 0, 0
    for layer, (mia, (x_1, x_2)) in enumerate(zip(mias, xs), start=1):
        if layer > 1:
            x_1, x_2 = x_1 + 0.2 * res1, x_2 + 0.2 * res2
        x_1, x_2 = cbam(mia.CBAM_ori, x_1), cbam(mia.CBAM_ori, x_2)
        if layer < 3:
            res1, res2 = mia.conv_narrow1(x_1), mia.conv_narrow2(x_2)
        outputs.append((x_1, x_2))
    return outputs


def test_mia_chain_matches_the_official_calls(tiny_net):
    gen = torch.Generator().manual_seed(4)
    shapes = ((64, 16, 8), (128, 8, 4), (256, 4, 2))            # resnet18 stages 1..3 at 64x32
    xs = [(torch.randn(3, *s, generator=gen), torch.randn(3, *s, generator=gen)) for s in shapes]
    with torch.no_grad():
        expected = literal_mia_chain((tiny_net.MIA1, tiny_net.MIA2, tiny_net.MIA3), xs)
        residuals = None
        for mia, x, want in zip((tiny_net.MIA1, tiny_net.MIA2, tiny_net.MIA3), xs, expected):
            x_1, x_2, residuals = mia(*x, residuals)
            assert torch.equal(x_1, want[0]) and torch.equal(x_2, want[1])
    assert residuals is None and not hasattr(tiny_net.MIA3, "conv_narrow1")


def test_mfa_matches_the_official_forward_in_eval_mode(tiny_net):
    mfa = tiny_net.MFA.eval()
    x = torch.randn(2, 256, 4, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        x1 = (mfa.FC11(x) + mfa.FC12(x) + mfa.FC13(x) + mfa.FC14(x)) / 4
        x1 = mfa.FC1(F.relu(x1))
        x2 = (mfa.FC21(x) + mfa.FC22(x) + mfa.FC23(x) + mfa.FC24(x)) / 4
        x2 = mfa.FC1(F.relu(x2))
        y = mfa.FC2(x)
        att = torch.sigmoid(y)
        torch.testing.assert_close(mfa(x), mfa.conv_o((1 - att) * x1 + y + att * x2), rtol=1e-6, atol=1e-6)
    assert [mfa.get_submodule(f"FC{b}{i}").dilation[0] for b in (1, 2) for i in (1, 2, 3, 4)] == [1, 3, 5, 7, 2, 4, 6, 8]


if __name__ == "__main__":
    write_keys()
