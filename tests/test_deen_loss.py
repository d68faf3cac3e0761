"""DEEN's CPM and ORT losses (loss.py) against brute-force loops in float32 and float64, and against the
official loss.py goldens (shared/spec/goldens_deen_caj_mmn/deen_extra_goldens.npz, README section 6.1)."""
import os

import numpy as np
import pytest
import torch

import loss as losses
from conftest import SPEC_GOLDEN_DIR
from utils import ConfigError

EXTRA = os.path.join(SPEC_GOLDEN_DIR, "deen_extra_goldens.npz")
CASES = ["B6P4_D2048_relu", "B3P2_D64_randn", "B2P1_D16_randn", "B4P2_D32_centers"]


def cpm_loop(x, n, margin=0.2):
    """CPM written out per identity with plain Python sums (METHODS.md 1.3 item 3)."""
    blocks = [x[k * len(x) // 4:(k + 1) * len(x) // 4] for k in range(4)]
    p = len(blocks[0]) // n
    centres = [[sum(block[i * p + r] for r in range(p)) / p for i in range(n)] for block in blocks]

    def dist(a, b):
        return float(sum((float(u) - float(v)) ** 2 for u, v in zip(a, b))) ** 0.5

    def term(further, closer):
        return sum(max(0.0, c - f + margin) for f, c in zip(further, closer)) / n

    c1, c2, c3, c4 = centres
    total = 0.0
    for ca, cb, cd in ((c1, c2, c3), (c2, c1, c4)):
        # (same-modality orig centre, other orig centre, DEE centre of the other modality)
        ap = [dist(cb[i], cd[i]) for i in range(n)]
        an = [dist(ca[i], cd[i]) for i in range(n)]
        hard_d = [min(dist(cd[i], cd[j]) for j in range(n) if j != i) for i in range(n)]
        hard_a = [min(dist(ca[i], ca[j]) for j in range(n) if j != i) for i in range(n)]
        total += term(an, ap) + 0.5 * (term(hard_d, ap) + term(hard_a, ap))
    return total / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,p,d", [(2, 1, 3), (3, 2, 5), (4, 3, 4)])
def test_cpm_matches_a_brute_force_loop(dtype, n, p, d):
    torch.manual_seed(n * 10 + p)
    x = torch.randn(4 * n * p, d, dtype=dtype)
    labels = torch.arange(n).repeat_interleave(p).repeat(4)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    expected = cpm_loop(x.double(), n)
    assert losses.CPMLoss()(x, labels).item() == pytest.approx(expected, rel=tol, abs=tol)
    # B given by the recipe (train.py's DEEN loss: no label count, no host read) gives the same loss.
    assert losses.CPMLoss(identities=n)(x, labels).item() == pytest.approx(expected, rel=tol, abs=tol)


def test_cpm_anchor_pairs_carry_no_gradient_and_one_identity_is_refused():
    x = torch.randn(8, 3, requires_grad=True)
    labels = torch.tensor([0, 1] * 4)
    losses.CPMLoss()(x, labels).backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ConfigError, match="at least 2 identities"):
        losses.CPMLoss()(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="3 rows per block do not hold 2 identities"):
        losses.CPMLoss(identities=2)(torch.randn(12, 3), torch.zeros(12, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ort_matches_a_brute_force_loop(dtype):
    torch.manual_seed(3)
    pool = torch.rand(12, 6, dtype=dtype)
    expected = sum(float(pool[4 + k, c]) * float(pool[8 + k, c]) for k in range(4) for c in range(6)) / 12
    assert losses.ort_loss(pool).item() == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpm_and_triplet_reproduce_the_official_goldens(case, dtype):
    golden = np.load(EXTRA)
    prefix = f"case__{case}__"
    x = torch.tensor(golden[prefix + "feat1"], dtype=getattr(torch, dtype), requires_grad=True)
    labels, labs = torch.tensor(golden[prefix + "labels"]), torch.tensor(golden[prefix + "labs"])
    ft1, ft2, ft3 = x.chunk(3, 0)
    cpm1 = losses.CPMLoss()(torch.cat((ft1, ft2)), labs)
    cpm2 = losses.CPMLoss()(torch.cat((ft1, ft3)), labs)
    triplet = losses.OriTripletLoss(margin=0.3)(x, labels)
    for name, value in (("cpm_orig_dee1", cpm1), ("cpm_orig_dee2", cpm2), ("triplet", triplet)):
        np.testing.assert_allclose(value.item(), golden[f"{prefix}{dtype}__{name}"], rtol=1e-5)
    if dtype == "float32":
        (0.8 * (cpm1 + cpm2) + triplet).backward()
        np.testing.assert_allclose(x.grad.numpy(), golden[prefix + "float32__grad_feat1_of_cpm_weighted_plus_triplet"],
                                   atol=1e-6)
