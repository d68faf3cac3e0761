"""Losses of REFERENCE 7: official goldens, literal loop oracles (values and gradients), numerical safety."""
import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import GOLDEN_DIR
from loss import (CenterTripletLoss, OriTripletLoss, QuarCenterTripletLoss, TripletLoss_ADP, TripletLoss_WRT,
                  comp_dist)
from utils import ConfigError


# ---------------------------------------------------------------------------------------------- goldens

@pytest.fixture(scope="module")
def golden():
    data = np.load(os.path.join(GOLDEN_DIR, "loss_inputs.npz"))
    with open(os.path.join(GOLDEN_DIR, "golden_misc.json")) as f:
        values = json.load(f)["losses"]
    return torch.from_numpy(data["feats"]), torch.from_numpy(data["labels"]), values


GOLDEN_LOSSES = {
    "QCT_m0.7": lambda: QuarCenterTripletLoss(margin=0.7),
    "OriTriplet_m0.3": lambda: OriTripletLoss(margin=0.3),
    "OriTriplet_m0.7": lambda: OriTripletLoss(margin=0.7),
    "WRT": lambda: TripletLoss_WRT(),
    "CenterTriplet_k4_m0.7": lambda: CenterTripletLoss(k_size=4, margin=0.7),
}


@pytest.mark.parametrize("scale", [1.0, 0.01])
@pytest.mark.parametrize("name", sorted(GOLDEN_LOSSES))
def test_golden_values(golden, name, scale):
    feats, labels, values = golden
    got = GOLDEN_LOSSES[name]()(feats * scale, labels).item()
    assert got == pytest.approx(values[f"{name}_scale{scale}"], rel=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_golden_qct_gradient_norm(golden, scale):
    feats, labels, values = golden
    x = (feats * scale).requires_grad_()
    QuarCenterTripletLoss(margin=0.7)(x, labels).backward()
    assert x.grad.norm().item() == pytest.approx(values[f"QCT_m0.7_scale{scale}_gradnorm"], rel=1e-5)


def test_golden_scale_001_activates_qct_hinge(golden):
    """The small scale must exercise the hinge term, otherwise the golden would not test it."""
    feats, labels, _ = golden
    x = feats * 0.01
    assert (comp_dist(x, x) < 0.7).any()


# ------------------------------------------------------------------------------ literal loop oracles

def oracle_dist(a, b):
    """REFERENCE 7: D[i,j] = sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, 1e-12)), element by element."""
    rows = []
    for i in range(a.shape[0]):
        row = []
        for j in range(b.shape[0]):
            sq = (a[i] * a[i]).sum() + (b[j] * b[j]).sum() - 2 * (a[i] * b[j]).sum()
            row.append(torch.sqrt(torch.clamp(sq, min=1e-12)))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def oracle_center(x, y, label, rows):
    return torch.stack([x[k] for k in rows if y[k] == label]).mean(0)


def oracle_ori_triplet(x, y, margin):
    d = oracle_dist(x, x)
    n, total = x.shape[0], 0
    for i in range(n):
        d_ap = max(d[i, j] for j in range(n) if y[j] == y[i])
        d_an = min(d[i, j] for j in range(n) if y[j] != y[i])
        total = total + torch.clamp(d_ap - d_an + margin, min=0)
    return total / n


def oracle_wrt(x, y):
    d = oracle_dist(x, x)
    n, total = x.shape[0], 0
    for i in range(n):
        pos = [float(y[j] == y[i]) for j in range(n)]
        neg = [1.0 - p for p in pos]
        # positives: v = D*pos, mask pos; negatives: v = -(D*neg), mask neg; mx over ALL j of v*m
        v_pos = [d[i, j] * pos[j] for j in range(n)]
        v_neg = [-(d[i, j] * neg[j]) for j in range(n)]
        mx_pos = max(v_pos[j] * pos[j] for j in range(n))
        mx_neg = max(v_neg[j] * neg[j] for j in range(n))
        z_pos = sum(torch.exp(v_pos[j] - mx_pos) * pos[j] for j in range(n)) + 1e-6
        z_neg = sum(torch.exp(v_neg[j] - mx_neg) * neg[j] for j in range(n)) + 1e-6
        fp = sum(d[i, j] * pos[j] * torch.exp(v_pos[j] - mx_pos) * pos[j] / z_pos for j in range(n))
        cn = sum(d[i, j] * neg[j] * torch.exp(v_neg[j] - mx_neg) * neg[j] / z_neg for j in range(n))
        total = total + torch.log(1 + torch.exp(-(cn - fp)))
    return total / n


def oracle_center_triplet(x, y, k, margin):
    n = x.shape[0]
    centers = torch.stack([oracle_center(x, y, y[i], range(n)) for i in range(n)])
    d_pc = [torch.sqrt(((x[i] - centers[i]) ** 2).sum()) for i in range(n)]
    dc = oracle_dist(centers, centers)
    hinges = []
    for i in range(0, n, k):
        terms = [torch.clamp(margin - dc[i, j], min=0) for j in range(n) if y[j] != y[i]]
        hinges.append(sum(terms) / len(terms))
    return (sum(d_pc) / n + sum(hinges) / len(hinges)) / 2


def oracle_qct(x, y, margin):
    n = x.shape[0]
    h = n // 2
    rgb, ir = range(h), range(h, n)
    d_pc, d_an = [], []
    for i in range(n):
        partner = oracle_center(x, y, y[i], ir if i < h else rgb)
        d_pc.append(torch.sqrt(((x[i] - partner) ** 2).sum()))
        terms = []
        for j in range(n):
            if y[j] != y[i]:
                c = oracle_center(x, y, y[j], range(n))
                dist = oracle_dist(x[i:i + 1], c[None])[0, 0]
                terms.append(torch.clamp(margin - dist, min=0))
        d_an.append(sum(terms) / len(terms))
    return (sum(d_pc) / n + sum(d_an) / n) / 2


def irl_labels(num_ids, num_pos, blocks, seed):
    """IRL/AGW layout: a block of num_ids x num_pos consecutive labels, repeated `blocks` times."""
    ids = torch.randperm(20, generator=torch.Generator().manual_seed(seed))[:num_ids]
    return ids.repeat_interleave(num_pos).repeat(blocks)


def unbalanced_labels(seed):
    """Half-and-half batch where identities have different counts, present in both halves."""
    g = torch.Generator().manual_seed(seed)
    half = torch.cat([torch.arange(4), torch.randint(0, 4, (6,), generator=g)])
    return torch.cat([half[torch.randperm(10, generator=g)], half[torch.randperm(10, generator=g)]])


LAYOUTS = {
    "irl_3x2x4": lambda: irl_labels(3, 2, 4, 0),
    "agw_4x2x2": lambda: irl_labels(4, 2, 2, 1),
    "unbalanced": lambda: unbalanced_labels(2),
}

LOSSES_AND_ORACLES = {
    "ori_m0.3": (lambda: OriTripletLoss(margin=0.3), lambda x, y: oracle_ori_triplet(x, y, 0.3)),
    "wrt": (lambda: TripletLoss_WRT(), oracle_wrt),
    "center_k4": (lambda: CenterTripletLoss(k_size=4, margin=0.7),
                  lambda x, y: oracle_center_triplet(x, y, 4, 0.7)),
    "center_k3": (lambda: CenterTripletLoss(k_size=3, margin=2.0),
                  lambda x, y: oracle_center_triplet(x, y, 3, 2.0)),
    "qct_m0.7": (lambda: QuarCenterTripletLoss(margin=0.7), lambda x, y: oracle_qct(x, y, 0.7)),
    "qct_m3": (lambda: QuarCenterTripletLoss(margin=3.0), lambda x, y: oracle_qct(x, y, 3.0)),
}


def random_features(n, dtype, seed, dim=6, scale=0.4):
    """Small-scale features so that margins are active (hinge terms non-zero)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, dim, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(LOSSES_AND_ORACLES))
def test_value_and_gradient_parity_float64(name, layout):
    make_loss, oracle = LOSSES_AND_ORACLES[name]
    labels = LAYOUTS[layout]()
    x = random_features(len(labels), torch.float64, seed=sorted(LAYOUTS).index(layout)).requires_grad_()
    got = make_loss()(x, labels)
    (grad,) = torch.autograd.grad(got, x)
    x_ref = x.detach().clone().requires_grad_()
    want = oracle(x_ref, labels.tolist())
    (grad_ref,) = torch.autograd.grad(want, x_ref)
    assert got.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(LOSSES_AND_ORACLES))
def test_value_parity_float32(name, layout):
    make_loss, oracle = LOSSES_AND_ORACLES[name]
    labels = LAYOUTS[layout]()
    x = random_features(len(labels), torch.float32, seed=7)
    got = make_loss()(x, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(oracle(x.double(), labels.tolist()).item(), rel=1e-4, abs=1e-5)


def test_parity_cases_exercise_the_hinges():
    """The random features must make each hinge term non-zero, otherwise parity would not cover it."""
    labels = LAYOUTS["irl_3x2x4"]()
    x = random_features(len(labels), torch.float64, seed=3)
    d = comp_dist(x, x)
    assert (d < 0.7).any() and (d > 0.3).any()
    assert QuarCenterTripletLoss(margin=0.7)(x, labels) > QuarCenterTripletLoss(margin=0.0)(x, labels)
    assert CenterTripletLoss(margin=0.7)(x, labels) > CenterTripletLoss(margin=0.0)(x, labels)


def test_comp_dist_matches_oracle_and_plain_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(4, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(comp_dist(a, b), oracle_dist(a, b))
    torch.testing.assert_close(comp_dist(a, b), torch.cdist(a, b))
    assert comp_dist(a, a).diagonal().max().item() == pytest.approx(1e-6, abs=1e-7)


def test_qct_pull_grows_with_a_modality_shift():
    """QCT pulls each row to the OTHER modality's centre: moving only IR rows changes RGB rows' pull."""
    labels = irl_labels(3, 2, 4, 0)
    x = random_features(len(labels), torch.float64, seed=1)
    shifted = x.clone()
    shifted[len(x) // 2:] += 0.5
    loss = QuarCenterTripletLoss(margin=0.0)
    # with margin 0 QCT is half the mean cross-modal pull; a modality shift of 0.5 per dim adds to it
    assert loss(shifted, labels) > loss(x, labels) + 0.1


# ------------------------------------------------------------------------------------ numerical safety

def all_losses():
    return [OriTripletLoss(0.3), TripletLoss_WRT(), CenterTripletLoss(4, 0.7), QuarCenterTripletLoss(0.7),
            TripletLoss_ADP(1, 1, 0), TripletLoss_ADP(1, 1, 1)]


@pytest.mark.parametrize("loss", all_losses(), ids=lambda l: f"{type(l).__name__}{getattr(l, 'square', '')}")
@pytest.mark.parametrize("case", ["all_identical", "identical_per_identity", "zeros"])
def test_zero_distances_give_finite_values_and_gradients(loss, case):
    labels = irl_labels(3, 2, 4, 0)
    base = random_features(len(labels), torch.float32, seed=0, dim=8, scale=3.0)
    if case == "all_identical":
        x = base[:1].repeat(len(labels), 1)
    elif case == "identical_per_identity":
        x = base[labels % len(labels)]
    else:
        x = torch.zeros_like(base)
    x = x.clone().requires_grad_()
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(x.grad).all()


def autocast_dtype():
    """fp16 autocast on the CPU when this torch supports it, else bfloat16."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.nn.Linear(2, 2)(torch.ones(1, 2))
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


@pytest.mark.parametrize("loss", all_losses(), ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("identical", [False, True])
def test_autocast_features_are_safe_and_computed_in_float32(loss, identical):
    labels = irl_labels(3, 2, 4, 0)
    layer = torch.nn.Linear(16, 32)
    with torch.no_grad():
        layer.weight.mul_(30.0)                 # large features: squared norms overflow half precision
    inputs = torch.rand(1 if identical else len(labels), 16).expand(len(labels), 16)
    dtype = autocast_dtype()
    with torch.autocast("cpu", dtype=dtype):
        feats = layer(inputs)
        assert feats.dtype == dtype
        value = loss(feats, labels)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert value.item() == pytest.approx(loss(feats.detach().float(), labels).item(), rel=1e-5)


def test_half_precision_squared_norms_would_overflow():
    """Guard for the test above: the features it builds do overflow if squared in half precision."""
    feats = torch.full((2, 32), 100.0, dtype=torch.float16)
    assert not torch.isfinite((feats * feats).sum(1)).all()
    assert torch.isfinite(comp_dist(feats, feats)).all()


def test_wrt_large_margin_gap_does_not_overflow():
    labels = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[0.0], [200.0], [0.5], [199.5]])        # fp - cn ~ 200 > log(float32 max)
    value = TripletLoss_WRT()(x, labels)
    assert math.isfinite(value.item()) and value.item() > 100


# ----------------------------------------------------------------------------------- argument checks

def test_qct_rejects_odd_batches():
    with pytest.raises(ConfigError, match="even"):
        QuarCenterTripletLoss()(torch.rand(5, 3), torch.tensor([0, 0, 1, 1, 0]))


def test_qct_rejects_identity_missing_from_one_half():
    with pytest.raises(ConfigError, match="both the RGB half"):
        QuarCenterTripletLoss()(torch.rand(4, 3), torch.tensor([0, 1, 0, 0]))


def test_rows_without_negatives_contribute_zero_hinge():
    labels = torch.zeros(4, dtype=torch.long)
    x = torch.rand(4, 3, dtype=torch.float64)
    assert OriTripletLoss(0.3)(x, labels).item() == 0.0
    center = CenterTripletLoss(4, 0.7)(x, labels)
    assert center.item() == pytest.approx(oracle_center_triplet_pull_only(x), rel=1e-12)


def oracle_center_triplet_pull_only(x):
    c = x.mean(0)
    return sum(torch.sqrt(((x[i] - c) ** 2).sum()) for i in range(len(x))).item() / len(x) / 2
