"""DEEN network (model_deen.py): official key layout, official-format checkpoints, goldens of the official
code with key-seeded weights (shared/spec/goldens_deen_caj_mmn, README section 6.1), the memory-lean PNL
product against the literal one."""
import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch

import loss as losses
import model as M
import model_deen as D
import model_ifalnet as I
import model_mmn as X
from conftest import GOLDEN_DIR, SPEC_GOLDEN_DIR
from utils import CheckpointError, ConfigError

IO = os.path.join(SPEC_GOLDEN_DIR, "deen_model_io.npz")
KEYS = os.path.join(SPEC_GOLDEN_DIR, "deen_keys.json")
NL_BN_WEIGHT = r"MFA\d\.(CNL|PNL)\.W\.1\.weight"


def fill_tensor(key, shape, dtype):
    """The goldens' fill rule (README section 4), including the MFA BN-weight adjustment."""
    if dtype != "float32":
        return torch.zeros(shape, dtype=torch.int64)
    g = torch.Generator().manual_seed(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    if key.endswith("running_var"):
        return 0.5 + torch.rand(shape, generator=g)
    if key.endswith("running_mean"):
        return 0.1 * torch.randn(shape, generator=g)
    if re.fullmatch(NL_BN_WEIGHT, key):
        return 0.001 * (1 + 0.1 * torch.randn(shape, generator=g))
    if len(shape) == 1 and key.endswith(".weight"):
        return 1 + 0.1 * torch.randn(shape, generator=g)
    if len(shape) > 1:
        return torch.randn(shape, generator=g) * (1.0 / math.sqrt(math.prod(shape[1:])))
    return torch.randn(shape, generator=g) * 0.1


def official_file(keys, path):
    """An official-format checkpoint ({'net', 'epoch', ...}) holding every official key, filled by the rule."""
    state = {k: fill_tensor(k, tuple(shape), dtype) for k, shape, dtype in keys}
    torch.save({"net": state, "epoch": np.int64(3), "mAP": np.float64(0.5)}, path)
    return str(path)


@pytest.fixture(scope="module")
def golden():
    return np.load(IO)


@pytest.fixture(scope="module")
def llcm_net(tmp_path_factory):
    """The LLCM variant (resnet50, 713 classes, 384x144) loaded from an official-format file."""
    torch.manual_seed(0)
    keys = json.load(open(KEYS))["llcm"]["keys"]
    net = D.DEEN(713, "resnet50", 384, 144)
    meta = M.load_checkpoint(net, official_file(keys, tmp_path_factory.mktemp("deen") / "llcm_deen_best.t"))
    assert meta["format"] == "official"
    return net


def official_keys(dataset):
    with open(os.path.join(GOLDEN_DIR, f"deen_official_state_dict_{dataset}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("dataset", ["llcm", "regdb"])
def test_keys_are_the_official_ones_in_official_order(dataset):
    official = official_keys(dataset)
    net = D.DEEN(official["classifier.weight"][0], "resnet50", 384, 144, layer3_variant=dataset == "regdb")
    ours = net.state_dict()
    unused = net.official_unused_keys()
    assert unused <= set(official) and not unused & set(ours)
    assert list(ours) == [k for k in official if k not in unused]
    assert all(list(ours[k].shape) == list(official[k]) for k in ours)
    # The RegDB network registers layer4 without using it (METHODS.md 1.2): 60 trunk keys more to skip.
    assert sum(k.startswith("base_resnet.base.layer4.") for k in unused) == (60 if dataset == "regdb" else 0)
    assert len(official) == {"llcm": 1048, "regdb": 1022}[dataset]


def test_regdb_official_file_loads_strictly_and_wrong_keys_are_named(tmp_path):
    official = official_keys("regdb")
    # Broadcast zeros keep the file small; one filled entry shows the values arrive.
    state = {k: torch.zeros((), dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32).expand(s)
             for k, s in official.items()}
    state["DEE.FC1.weight"] = fill_tensor("DEE.FC1.weight", tuple(official["DEE.FC1.weight"]), "float32")
    torch.save({"net": state, "epoch": np.int64(3)}, tmp_path / "regdb.t")
    net = D.DEEN(206, "resnet50", 384, 144, layer3_variant=True)
    M.load_checkpoint(net, str(tmp_path / "regdb.t"))
    assert torch.equal(net.state_dict()["DEE.FC1.weight"], state["DEE.FC1.weight"])
    del state["MFA2.PNL.g.bias"]
    state["MFA3.PNL.g.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="missing 1 keys: MFA2.PNL.g.bias.*unexpected 1 keys: MFA3.PNL.g.bias"):
        M.load_checkpoint(net, {"net": state})


@pytest.mark.slow
def test_eval_outputs_reproduce_the_official_goldens(llcm_net, golden):
    llcm_net.eval()
    x = torch.from_numpy(golden["input_eval_x"])
    with torch.no_grad():
        for modal in (1, 2):
            pool, feat = llcm_net(x, x, modal=modal)
            assert pool.shape == (6, 2048)      # the DEE tripling stays in eval mode
            np.testing.assert_allclose(pool.numpy(), golden[f"llcm__eval_modal{modal}_out0_l2norm_pool"], atol=1e-6)
            np.testing.assert_allclose(feat.numpy(), golden[f"llcm__eval_modal{modal}_out1_l2norm_feat"], atol=1e-6)


def train_forward(net, golden):
    net.train()
    net.DEE.dropout.eval()
    try:
        with torch.no_grad():
            return net(torch.from_numpy(golden["input_train_x1"]), torch.from_numpy(golden["input_train_x2"]))
    finally:
        net.eval()


@pytest.mark.slow
def test_train_outputs_and_losses_reproduce_the_official_goldens(llcm_net, golden):
    before = {k: v.clone() for k, v in llcm_net.state_dict().items()}
    pool, logits, ort_raw = train_forward(llcm_net, golden)
    after = llcm_net.state_dict()
    np.testing.assert_allclose(after["bottleneck.running_var"].numpy(),
                               golden["llcm__train_after_bottleneck_running_var"], rtol=1e-5)
    np.testing.assert_allclose(after["MFA2.PNL.W.1.running_var"].numpy(),
                               golden["llcm__train_after_MFA2_PNL_W_1_running_var"], rtol=1e-5)
    llcm_net.load_state_dict(before)
    np.testing.assert_allclose(pool.numpy(), golden["llcm__train_modal0_out0_pool"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(logits.numpy(), golden["llcm__train_modal0_out1_logits"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ort_raw.item(), golden["llcm__train_modal0_out2_loss_ort_raw"], rtol=1e-5)
    l1, l2 = torch.from_numpy(golden["label1"]), torch.from_numpy(golden["label2"])
    labels = torch.cat((l1, l2, l1, l2, l1, l2))
    terms = losses_of(pool, logits, ort_raw, labels)
    for name, value in terms.items():
        np.testing.assert_allclose(value.item(), golden[f"llcm__train_loss_{name}"], rtol=1e-5)
    np.testing.assert_allclose(sum(terms.values()).item(), golden["llcm__train_loss_total"], rtol=1e-5)


def losses_of(pool, logits, ort_raw, labels):
    """train.py's loss lines (README section 6.1), written out independently of method_deen."""
    labs = torch.cat(labels.chunk(3)[:2])
    ft1, ft2, ft3 = pool.chunk(3, 0)
    cpm = losses.CPMLoss()
    return {"id": torch.nn.functional.cross_entropy(logits, labels),
            "tri": losses.OriTripletLoss(margin=0.3)(pool, labels),
            "cpm": 0.8 * (cpm(torch.cat((ft1, ft2)), labs) + cpm(torch.cat((ft1, ft3)), labs)),
            "ort": 0.01 * ort_raw}


@pytest.mark.parametrize("high,low,size", [(64, 32, (6, 4)), (32, 16, (5, 4))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pnl_product_equals_the_literal_official_one(high, low, size, dtype):
    torch.manual_seed(0)
    block = D.PNL(high, low).to(dtype)
    torch.nn.init.normal_(block.W[1].weight)
    x_h, x_l = torch.randn(3, high, *size, dtype=dtype), torch.randn(3, low, *size, dtype=dtype)
    ours = block(x_h, x_l)
    block.official_form = True
    literal = block(x_h, x_l)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, literal, rtol=tol, atol=tol)


def test_literal_attention_is_the_official_matrix_product():
    """The literal form itself against a per-element loop of energy / L times g."""
    torch.manual_seed(1)
    theta, phi, g = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64), \
        torch.randn(2, 5, 4, dtype=torch.float64)
    expected = torch.zeros(2, 3, 4, dtype=torch.float64)
    for n in range(2):
        for q in range(3):
            for c in range(4):
                expected[n, q, c] = sum(sum(theta[n, q, k] * phi[n, k, l] for k in range(4)) / 5 * g[n, l, c]
                                        for l in range(5))
    torch.testing.assert_close(D.position_attention_literal(theta, phi, g), expected)
    torch.testing.assert_close(D.position_attention(theta, phi, g), expected)


@pytest.mark.parametrize("size", [(385, 144), (36, 36)])
def test_sizes_with_an_odd_position_count_are_refused_in_one_line(size):
    with pytest.raises(ConfigError, match="even number of positions"):
        D.DEEN(5, "resnet18", *size)


def test_stage_map_size_is_the_side_of_each_stage_output():
    """The size rule DEEN's and MMN's input checks use, against the maps the backbone really gives."""
    net = D.DEEN(5, "resnet18", 32, 16).eval()
    trunk = net.base_resnet.base
    with torch.no_grad():
        for height, width in ((33, 17), (37, 23), (64, 32), (50, 26), (19, 11)):
            x = net.visible_module(torch.zeros(1, 3, height, width))
            sizes = {"stem": x.shape[2:]}
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                x = getattr(trunk, stage)(x)
                sizes[stage] = x.shape[2:]
            assert {stage: (M.stage_map_size(height, stage), M.stage_map_size(width, stage)) for stage in sizes} \
                == {stage: tuple(size) for stage, size in sizes.items()}


@pytest.mark.parametrize("network, name", [(D.DEEN, "DEEN"), (X.MMN, "MMN"), (I.IFALNet, "IFALNet")],
                         ids=["DEEN", "MMN", "IFALNet"])
def test_deen_mmn_and_ifalnet_make_the_checks_of_every_network(network, name):
    """Size, modal and activation-checkpointing checks: each a one-line ConfigError (model.NetworkBase)."""
    net = network(5, "resnet18", 64, 32)
    for size in ((0, 32), (64.0, 32), (True, 32)):
        with pytest.raises(ConfigError, match=r"^image size must be positive integers, got "):
            type(net).check_input_size(*size)
    images = torch.zeros(2, 3, 64, 32)
    for modal in (3, -1, "1", None):
        with pytest.raises(ConfigError, match=r"^modal must be 0 \(train\), 1 \(visible\) or 2 \(thermal\), got "):
            net(*([images] * net.num_inputs), modal=modal)
    assert net.set_grad_checkpointing(False) is net
    refusal = rf"^--grad-checkpoint is not available for {name} \(IRL, AGW and CAJ have it\)$"
    with pytest.raises(ConfigError, match=refusal):
        net.set_grad_checkpointing(True)


def test_whole_network_official_form_matches_ours_forward_and_backward():
    """Train step of a small DEEN in float64 with every MFA block switched on: outputs and gradients agree."""
    torch.manual_seed(0)
    net = D.DEEN(5, "resnet18", 32, 16).double().train()
    net.DEE.dropout.p = 0.0
    for name, p in net.named_parameters():
        if re.fullmatch(NL_BN_WEIGHT, name):
            torch.nn.init.normal_(p, 0.0, 0.5)
    x1, x2 = torch.randn(2, 3, 32, 16, dtype=torch.float64), torch.randn(2, 3, 32, 16, dtype=torch.float64)
    results = []
    for official in (True, False):
        net.set_official_form(official)
        net.zero_grad()
        pool, logits, ort = net(x1, x2)
        (logits.square().mean() + pool.mean() + ort).backward()
        results.append((pool.detach(), logits.detach(), {k: p.grad.clone() for k, p in net.named_parameters()
                                                          if p.grad is not None}))
    (pool_o, logits_o, grads_o), (pool, logits, grads) = results
    torch.testing.assert_close(pool, pool_o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, logits_o, rtol=1e-10, atol=1e-10)
    assert grads.keys() == grads_o.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_o[k], rtol=1e-8, atol=1e-10, msg=k)


class GoldenDropoutMask(torch.nn.Module):
    """DEE's Dropout(0.01) with the golden's mask (its RNG draw is torch's): the listed elements zeroed, the
    others scaled by float32(1 / 0.99) (README section 6.1)."""

    def __init__(self, dropped_flat_idx):
        super().__init__()
        self.dropped = torch.from_numpy(dropped_flat_idx.astype(np.int64))

    def forward(self, x):
        keep = torch.ones(x.numel(), dtype=x.dtype)
        keep[self.dropped] = 0
        return x * keep.reshape(x.shape) * torch.tensor(1 / 0.99, dtype=torch.float32)


@pytest.mark.slow
def test_gradients_and_the_dropout_golden_reproduce(llcm_net, golden):
    before = {k: v.clone() for k, v in llcm_net.state_dict().items()}
    x1, x2 = torch.from_numpy(golden["input_train_x1"]), torch.from_numpy(golden["input_train_x2"])
    l1, l2 = torch.from_numpy(golden["label1"]), torch.from_numpy(golden["label2"])
    labels = torch.cat((l1, l2, l1, l2, l1, l2))
    dropout = llcm_net.DEE.dropout
    try:
        llcm_net.train()
        dropout.eval()
        llcm_net.zero_grad()
        sum(losses_of(*llcm_net(x1, x2), labels).values()).backward()
        params = dict(llcm_net.named_parameters())
        for name, norm in zip(golden["llcm__grad_param_names"], golden["llcm__grad_total_norms"]):
            rtol = 5e-2 if name.startswith("MFA") else 5e-3
            np.testing.assert_allclose(params[name].grad.norm().item(), norm, rtol=rtol, err_msg=name)
        full = golden["llcm__grad_total_full_MFA1_PNL_W_1_weight"]
        np.testing.assert_allclose(params["MFA1.PNL.W.1.weight"].grad.numpy(), full, atol=5e-2 * np.abs(full).max())
        llcm_net.load_state_dict(before)
        llcm_net.DEE.dropout = GoldenDropoutMask(golden["llcm__train_dropout_dropped_flat_idx"])
        with torch.no_grad():
            pool, logits, ort_raw = llcm_net(x1, x2)
        np.testing.assert_allclose(pool.numpy(), golden["llcm__train_dropout_out0_pool"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(logits.numpy(), golden["llcm__train_dropout_out1_logits"], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(ort_raw.item(), golden["llcm__train_dropout_out2_loss_ort_raw"], rtol=1e-5)
        total = sum(losses_of(pool, logits, ort_raw, labels).values())
        np.testing.assert_allclose(total.item(), golden["llcm__train_dropout_loss_total"], rtol=1e-5)
    finally:
        llcm_net.DEE.dropout = dropout
        llcm_net.load_state_dict(before)
        llcm_net.zero_grad(set_to_none=True)
        llcm_net.eval()
