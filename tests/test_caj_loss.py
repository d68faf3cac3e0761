"""CAJ losses (METHODS 6.3): TripletLoss_ADP and KLDivLoss against the official-code goldens
(shared/spec/goldens_deen_caj_mmn/caj_goldens.*, README 6.2), against literal
loop oracles written from the definitions, and for numerical safety."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import caj_goldens
from test_loss import autocast_dtype
from loss import KLDivLoss, TripletLoss_ADP
from utils import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")     # many tiny scalar ops (the loop oracles)

# Tolerances suggested by the goldens' README 6.2 (its f32-vs-f64 spreads are below them).
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
INTER_TOL = dict(rtol=1e-4, atol=1e-4)
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@pytest.fixture(scope="module")
def golden():
    return caj_goldens()


def _cases(section):
    return sorted(caj_goldens()[1][section])


ADP_CASES = _cases("loss_cases")
KL_CASES = _cases("kl_cases")
TOTAL_CASES = _cases("train_ext_total_cases")


def assert_close(got, want, **tol):
    torch.testing.assert_close(got.detach(), torch.as_tensor(want, dtype=got.dtype), **tol)


# ------------------------------------------------------------------------------- ADP: official goldens

def adp_case(golden, case, dtype):
    z, cases = golden
    spec = cases["loss_cases"][case]
    x = torch.from_numpy(z[f"adp__{case}__input"]).to(DTYPES[dtype]).requires_grad_()
    labels = torch.from_numpy(z[f"adp__{case}__labels"])
    loss = TripletLoss_ADP(alpha=spec["alpha"], gamma=spec["gamma"], square=spec["square"])
    terms = loss.terms(x, labels, normalize_feature=spec["normalize_feature"])
    (grad,) = torch.autograd.grad(terms.loss, x)
    return spec, terms, grad, (lambda key: z[f"adp__{case}__{dtype}__{key}"]), z.files


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", ADP_CASES)
def test_adp_golden_loss_correct_and_gradient(golden, case, dtype):
    spec, terms, grad, want, keys = adp_case(golden, case, dtype)
    assert terms.loss.dtype == DTYPES[dtype]
    assert terms.loss.item() == pytest.approx(float(want("loss")), rel=LOSS_TOL["rtol"], abs=LOSS_TOL["atol"])
    assert int(terms.correct) == int(want("correct"))
    if f"adp__{case}__{dtype}__grad_input" in keys:       # float64 grads are stored for 3 cases only
        assert_close(grad, want("grad_input"), **GRAD_TOL)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", ADP_CASES)
def test_adp_golden_intermediates(golden, case, dtype):
    spec, terms, _, want, keys = adp_case(golden, case, dtype)
    names = {"dist_mat": terms.dist, "weights_ap": terms.weights_ap, "weights_an": terms.weights_an,
             "furthest_positive": terms.furthest_positive, "closest_negative": terms.closest_negative,
             "diff_pow": terms.diff_pow, "y": terms.y}
    checked = []
    for name, got in names.items():
        key = f"adp__{case}__{dtype}__inter_{name}"
        if key not in keys:
            continue
        assert got is not None, name
        assert_close(got, want(f"inter_{name}"), **INTER_TOL)
        checked.append(name)
    # y (the violated/satisfied sign) is exact, except where the features are all equal: there fp and cn
    # are both the 1e-6 clamp and their order is rounding (README 6.2).
    if case != "sq1_zero_features":
        assert torch.equal(terms.y, torch.as_tensor(want("inter_y"), dtype=terms.y.dtype))
    expected = {"furthest_positive", "closest_negative", "y"} | ({"diff_pow"} if spec["square"] else set())
    if dtype == "float32":
        expected |= {"dist_mat", "weights_ap", "weights_an"}
    assert set(checked) == expected
    assert (terms.diff_pow is None) == (spec["square"] == 0)


@pytest.mark.parametrize("case", [c for c in ADP_CASES if c.startswith(("readme_sq1", "sq1"))])
def test_adp_golden_cases_exercise_their_regime(golden, case):
    """The case descriptions (violations, clamps) hold for our terms, so each case tests what it claims."""
    spec, terms, grad, _, _ = adp_case(golden, case, "float32")
    assert int((terms.y == -1).sum()) == spec["num_violated(y=-1)"]
    assert int((terms.diff_pow == 88).sum()) == spec["num_clamped_at_88"]
    if spec["num_clamped_at_88"] == spec["N"]:
        assert terms.loss.item() == 88.0 and not grad.any()       # full clamp: flat, zero gradient
    if case == "readme_sq1_eps_regime":
        # the unmasked row max (0 for negatives) lets the 1e-6 dominate: negative weights sum below 1
        assert terms.weights_an.sum(1).min().item() < 0.85


# ----------------------------------------------------------------------------------- KL and the total

@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", KL_CASES)
def test_kl_golden(golden, case, dtype):
    z, _ = golden
    out0 = torch.from_numpy(z[f"kl__{case}__out0"]).to(DTYPES[dtype]).requires_grad_()
    value = KLDivLoss().thirds(out0)
    assert value.dtype == DTYPES[dtype]
    assert value.item() == pytest.approx(float(z[f"kl__{case}__{dtype}__loss"]), rel=1e-5)
    key = f"kl__{case}__{dtype}__grad_out0"
    if key in z.files:
        (grad,) = torch.autograd.grad(value, out0)
        assert_close(grad, z[key], **GRAD_TOL)
        n = out0.shape[0] // 3
        assert not grad[n:].any()        # view 1 is unused and the IR target is detached


def test_kl_official_eps_is_needed_to_match(golden):
    """Guard for keeping eps = 1e-7 (added to the target without renormalising): without it the value
    moves by far more than the golden tolerance."""
    z, _ = golden
    out0 = torch.from_numpy(z["kl__kl_unit__out0"])
    want = float(z["kl__kl_unit__float32__loss"])
    assert KLDivLoss(eps=0).thirds(out0).item() != pytest.approx(want, rel=1e-4)
    assert KLDivLoss().thirds(out0).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("case", TOTAL_CASES)
def test_train_ext_total_golden(golden, case, dtype):
    """train_ext.py: CE(out0, labels) + ADP(1, 1, 1)(feat, labels) + kl * KL(first third, last third)."""
    z, cases = golden
    spec = cases["train_ext_total_cases"][case]
    feat = torch.from_numpy(z[f"total__{case}__feat"]).to(DTYPES[dtype]).requires_grad_()
    out0 = torch.from_numpy(z[f"total__{case}__out0"]).to(DTYPES[dtype]).requires_grad_()
    labels = torch.from_numpy(z[f"total__{case}__labels"])
    adp = TripletLoss_ADP(alpha=spec["alpha"], gamma=spec["gamma"], square=spec["square"])
    loss_id = nn.CrossEntropyLoss()(out0, labels)
    terms = adp.terms(feat, labels)
    loss_kl = KLDivLoss().thirds(out0)
    total = loss_id + adp(feat, labels) + spec["kl"] * loss_kl
    total.backward()
    want = lambda key: float(z[f"total__{case}__{dtype}__{key}"])
    for got, key in [(loss_id, "loss_id"), (terms.loss, "loss_tri"), (loss_kl, "loss_kl"), (total, "loss_total")]:
        assert got.item() == pytest.approx(want(key), rel=1e-5), key
    assert feat.grad.norm().item() == pytest.approx(want("grad_feat_norm"), rel=1e-4)
    assert out0.grad.norm().item() == pytest.approx(want("grad_out0_norm"), rel=1e-4)
    assert int(terms.correct) == spec["batch_acc"]


# ------------------------------------------------------------------------------ literal loop oracles

def oracle_dist(a, b):
    """Official pdist_torch, element by element: sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, 1e-12))."""
    return torch.stack([torch.stack([torch.sqrt(torch.clamp((a[i] * a[i]).sum() + (b[j] * b[j]).sum()
                                                            - 2 * (a[i] * b[j]).sum(), min=1e-12))
                                     for j in range(b.shape[0])]) for i in range(a.shape[0])])


def oracle_softmax_weighted_sum(d_row, mask, sign, alpha):
    """sum_j d_j m_j w_j, w = softmax(sign * alpha * d * m) over the mask, the max taken over every j of
    (value * mask) (the unmasked row max of the official softmax_weights), plus 1e-6 in the normaliser."""
    n = len(mask)
    v = [sign * (d_row[j] * mask[j]) * alpha for j in range(n)]
    top = max(v[j] * mask[j] for j in range(n))
    z = sum(torch.exp(v[j] - top) * mask[j] for j in range(n)) + 1e-6
    return sum(d_row[j] * mask[j] * torch.exp(v[j] - top) * mask[j] / z for j in range(n))


def oracle_norm(v):
    """Euclidean norm; at the zero vector its gradient is taken as 0, the subgradient torch.norm uses."""
    sq = (v * v).sum()
    return torch.sqrt(sq) if sq > 0 else sq


def oracle_adp(x, y, alpha, gamma, square, normalize_feature=False):
    """(loss, correct) of the official TripletLoss_ADP, anchor by anchor, from the definitions."""
    if normalize_feature:
        x = torch.stack([x[i] / (oracle_norm(x[i]) + 1e-12) for i in range(x.shape[0])])
    d = oracle_dist(x, x)
    n, total, correct = x.shape[0], 0, 0
    for i in range(n):
        pos = [1.0 if y[j] == y[i] else 0.0 for j in range(n)]
        neg = [1.0 - p for p in pos]
        fp = oracle_softmax_weighted_sum(d[i], pos, +1, alpha)
        cn = oracle_softmax_weighted_sum(d[i], neg, -1, alpha)
        if square == 0:
            total = total + torch.log(1 + torch.exp(gamma * (fp - cn)))
        else:
            z = torch.clamp(gamma * (fp - cn) ** 2, max=88)
            sign = -1.0 if fp > cn else 1.0
            total = total + torch.log(1 + torch.exp(-sign * z))
        correct += int(cn >= fp)
    return total / n, correct


def caj_labels(num_ids, num_pos, seed):
    """train_ext.py layout: (l1, l1, l2) with l2 = l1, each identity num_pos consecutive rows."""
    ids = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:num_ids]
    block = ids.repeat_interleave(num_pos)
    return torch.cat([block, block, block])


def unbalanced_labels(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.arange(3), torch.randint(0, 3, (7,), generator=g)])[torch.randperm(10, generator=g)]


# Small batches keep the scalar-op oracle fast; P >= 2 gives several positives per row.
LAYOUTS = {"caj_2x2": lambda: caj_labels(2, 2, 0), "caj_2x1": lambda: caj_labels(2, 1, 1),
           "unbalanced": lambda: unbalanced_labels(2)}
CONFIGS = [(1, 1, 1, False), (1, 1, 0, False), (2, 3, 1, False), (2, 3, 0, True), (0.5, 2, 1, True)]


def features(n, dtype, seed, kind="rand", dim=5, scale=0.6):
    """rand: continuous; grid: small integers (many exactly tied distances, rows repeated);
    zeros: all distances at the clamp; spread: far negatives (the eps regime, cn -> 0)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rand":
        x = torch.rand(n, dim, generator=g, dtype=torch.float64) * scale
    elif kind == "grid":
        x = torch.randint(0, 2, (n, dim), generator=g).to(torch.float64)
    elif kind == "zeros":
        x = torch.zeros(n, dim, dtype=torch.float64)
    else:
        x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 8
    return x.to(dtype)


KINDS = ["rand", "grid", "zeros", "spread"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "a{}_g{}_sq{}_norm{}".format(*c))
def test_adp_value_gradient_and_correct_match_loop_oracle_float64(config, layout, kind):
    alpha, gamma, square, normalize = config
    labels = LAYOUTS[layout]()
    x = features(len(labels), torch.float64, seed=KINDS.index(kind), kind=kind).requires_grad_()
    terms = TripletLoss_ADP(alpha, gamma, square).terms(x, labels, normalize_feature=normalize)
    (grad,) = torch.autograd.grad(terms.loss, x)
    x_ref = x.detach().clone().requires_grad_()
    want, correct = oracle_adp(x_ref, labels.tolist(), alpha, gamma, square, normalize)
    (grad_ref,) = torch.autograd.grad(want, x_ref)
    assert terms.loss.item() == pytest.approx(want.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-7, atol=1e-10)
    assert int(terms.correct) == correct


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "a{}_g{}_sq{}_norm{}".format(*c))
def test_adp_value_and_gradient_match_loop_oracle_float32(config, layout, kind):
    alpha, gamma, square, normalize = config
    labels = LAYOUTS[layout]()
    x = features(len(labels), torch.float32, seed=10 + KINDS.index(kind), kind=kind).requires_grad_()
    got = TripletLoss_ADP(alpha, gamma, square)(x, labels, normalize_feature=normalize)
    assert got.dtype == torch.float32
    (grad,) = torch.autograd.grad(got, x)
    x_ref = x.detach().double().requires_grad_()
    want, _ = oracle_adp(x_ref, labels.tolist(), alpha, gamma, square, normalize)
    (grad_ref,) = torch.autograd.grad(want, x_ref)
    assert got.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=1e-3, atol=1e-4)


def test_oracle_cases_cover_both_signs_the_clamp_and_the_eps_regime():
    """Guard: the random oracle inputs contain satisfied and violated rows, clamped rows and negatives far
    enough for the 1e-6 to matter, otherwise the parity tests above would not cover those branches."""
    labels = LAYOUTS["caj_2x2"]()
    rand = TripletLoss_ADP(1, 1, 1).terms(features(len(labels), torch.float64, seed=0), labels)
    assert (rand.y == 1).any() and (rand.y == -1).any()
    spread = TripletLoss_ADP(2, 3, 1).terms(features(len(labels), torch.float64, seed=3, kind="spread"), labels)
    assert (spread.diff_pow == 88).any()
    assert spread.weights_an.sum(1).min() < 0.5
    grid = features(len(labels), torch.float64, seed=1, kind="grid")
    assert len(torch.unique(grid, dim=0)) < len(grid)           # repeated rows: zero distances off the diagonal


@pytest.mark.parametrize("labels", [[0, 0, 1, 1], [0, 1, 0, 1], [3, 3, 3, 7, 7, 7]])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_adp_exact_tie_counts_as_satisfied(dtype, labels):
    """fp == cn: the official y = -(y1 + y1 - 1) with y1 = (fp > cn) gives +1, and correct uses cn >= fp.
    alpha = 0 (uniform weights) on equal features with as many positives as negatives makes the tie exact."""
    x = torch.zeros(len(labels), 5, dtype=DTYPES[dtype])
    terms = TripletLoss_ADP(alpha=0, gamma=1, square=1).terms(x, torch.tensor(labels))
    assert torch.equal(terms.furthest_positive, terms.closest_negative)       # the tie is exact
    assert terms.y.tolist() == [1.0] * len(labels)
    assert int(terms.correct) == len(labels) == oracle_adp(x.double(), labels, 0, 1, 1)[1]
    assert terms.loss.item() == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------- convention and safety

def test_forward_is_the_scalar_loss_of_terms_like_the_other_metric_losses():
    labels = caj_labels(3, 2, 0)
    x = features(len(labels), torch.float32, seed=4)
    adp = TripletLoss_ADP(1, 1, 1)
    value = adp(x, labels)
    assert value.dim() == 0 and value.item() == adp.terms(x, labels).loss.item()
    assert adp.terms(x, labels).correct.dtype == torch.int64


def test_adp_square0_large_gap_is_finite_where_the_official_overflows():
    """Official SoftMarginLoss computes log(1 + exp(t)): inf in float32 once t > 88.7. Here it is t."""
    labels = torch.tensor([0, 0, 1, 1])
    x = torch.tensor([[0.0], [100.0], [0.5], [99.5]])          # fp ~ 100, cn ~ 0.5 for rows 0 and 2
    terms = TripletLoss_ADP(1, 1, 0).terms(x, labels)
    t = terms.furthest_positive - terms.closest_negative
    assert t.max().item() > 89
    assert not torch.isfinite(torch.log(1 + torch.exp(t))).all()    # what the official formula gives
    assert math.isfinite(terms.loss.item())
    assert terms.loss.item() == pytest.approx(oracle_adp(x.double(), [0, 0, 1, 1], 1, 1, 0)[0].item(), rel=1e-5)


@pytest.mark.parametrize("make", [lambda: TripletLoss_ADP(1, 1, 1), lambda: TripletLoss_ADP(2, 3, 0)],
                         ids=["adp_sq1", "adp_sq0"])
def test_adp_under_autocast_is_computed_in_float32(make):
    labels = caj_labels(3, 2, 0)
    layer = torch.nn.Linear(16, 32)
    with torch.no_grad():
        layer.weight.mul_(30.0)            # squared norms overflow half precision
    inputs = torch.rand(len(labels), 16, generator=torch.Generator().manual_seed(0))
    dtype = autocast_dtype()
    with torch.autocast("cpu", dtype=dtype):
        feats = layer(inputs)
        assert feats.dtype == dtype
        value = make()(feats, labels)
    assert value.dtype == torch.float32
    value.backward()
    assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert value.item() == pytest.approx(make()(feats.detach().float(), labels).item(), rel=1e-5)


def test_kl_under_autocast_is_computed_in_float32():
    logits = torch.randn(12, 7, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=autocast_dtype()):
        value = KLDivLoss().thirds(logits.to(autocast_dtype()))
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(KLDivLoss().thirds(logits.to(autocast_dtype()).float()).item(), rel=1e-6)


def oracle_kl(pred, target, T=3.0, eps=1e-7):
    total = 0
    for i in range(pred.shape[0]):
        zp = sum(math.exp(v / T) for v in pred[i].tolist())
        zt = sum(math.exp(v / T) for v in target[i].tolist())
        for c in range(pred.shape[1]):
            q = math.exp(target[i, c].item() / T) / zt + eps
            log_p = pred[i, c].item() / T - math.log(zp)
            total += q * (math.log(q) - log_p)
    return T * T * total / pred.shape[0]


@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_kl_matches_loop_oracle(T, dtype):
    logits = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    got = KLDivLoss(T=T).thirds(logits.to(DTYPES[dtype]))
    want = oracle_kl(logits[:3], logits[6:], T=T)
    assert got.item() == pytest.approx(want, rel=1e-12 if dtype == "float64" else 1e-5)


def test_kl_cuda_free_and_target_detached():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    KLDivLoss().thirds(logits).backward()
    assert logits.grad[:2].abs().sum() > 0 and not logits.grad[2:].any()


# ----------------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("square", [2, -1, 0.5])
def test_adp_rejects_square_other_than_0_or_1(square):
    with pytest.raises(ConfigError, match="square"):
        TripletLoss_ADP(square=square)


@pytest.mark.parametrize("n", [0, 4, 7])
def test_kl_thirds_rejects_batches_not_in_three_blocks(n):
    with pytest.raises(ConfigError, match="3n rows"):
        KLDivLoss().thirds(torch.zeros(n, 5))
