"""MMN's losses: DCLoss against a brute-force loop (float32, float64), and the official train.py loss terms
(goldens of shared/spec/goldens_deen_caj_mmn, README section 6.3) from the official stripe features."""
import json
import os

import numpy as np
import pytest
import torch

import loss as losses
import method_mmn
import middle_modality as mm
import model_mmn
from conftest import SPEC_GOLDEN_DIR
from test_deen_model import fill_tensor

IO = os.path.join(SPEC_GOLDEN_DIR, "mmn_model_io.npz")
KEYS = os.path.join(SPEC_GOLDEN_DIR, "mmn_keys.json")
HEAD_PREFIX = "criterion_div."      # the goldens fill the DCLoss head with this key prefix


def unit_row(row):
    """row / max(|row|, 1e-12), written out."""
    norm = torch.sqrt(sum(v * v for v in row))
    return row / torch.clamp(norm, min=1e-12)


def batch_norm_loop(rows, bn):
    """Training-mode BatchNorm1d of a list of rows, feature by feature (biased variance)."""
    n, out = len(rows), [r.clone() for r in rows]
    for f in range(rows[0].numel()):
        column = [r[f] for r in rows]
        mean = sum(column) / n
        var = sum((v - mean) ** 2 for v in column) / n
        for i in range(n):
            out[i][f] = (column[i] - mean) / torch.sqrt(var + bn.eps) * bn.weight[f] + bn.bias[f]
    return out


def dcl_loop(x, head):
    """DCLoss written out row by row: project every row, then the mean distance of row k and row k + n/2."""
    linear1, (bn1, _, linear2, bn2) = head.fc1[0], head.fc2
    rows = [linear1.weight @ unit_row(r) for r in x]
    rows = [torch.relu(r) for r in batch_norm_loop(rows, bn1)]
    rows = batch_norm_loop([linear2.weight @ r + linear2.bias for r in rows], bn2)
    z = [unit_row(r) for r in rows]
    half = len(z) // 2
    distances = [torch.sqrt(sum((z[k][f] - z[k + half][f]) ** 2 for f in range(z[k].numel()))) for k in range(half)]
    return sum(distances) / half


def filled_head(in_dim, dim, dtype):
    torch.manual_seed(0)
    head = losses.DCLoss(in_dim, dim)
    with torch.no_grad():
        for p in head.parameters():      # away from the identity init so the BN affine terms matter
            p.add_(0.3 * torch.randn_like(p))
    return head.to(dtype).train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dcl_matches_the_loop_with_its_gradient(dtype):
    head = filled_head(12, 5, dtype)
    x = torch.randn(8, 12, dtype=dtype).relu().requires_grad_()
    value = head(x)
    oracle = dcl_loop(x, head)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(value, oracle, rtol=tol, atol=tol)
    grad, = torch.autograd.grad(value, x)
    grad_oracle, = torch.autograd.grad(oracle, x)
    torch.testing.assert_close(grad, grad_oracle, rtol=10 * tol, atol=10 * tol)


def test_dcl_of_identical_halves_is_zero_with_a_finite_gradient():
    head = filled_head(6, 4, torch.float64)
    half = torch.randn(3, 6, dtype=torch.float64)
    x = torch.cat((half, half)).requires_grad_()
    value = head(x)
    value.backward()
    assert value.item() == 0 and torch.isfinite(x.grad).all()


@pytest.fixture(scope="module")
def golden():
    return np.load(IO)


def golden_head():
    """The DCLoss head filled by the goldens' rule (keys 'criterion_div.' + key), in training mode."""
    head = losses.DCLoss()
    keys = json.load(open(KEYS))["criterion_div_keys (DCLoss, filled with prefix criterion_div.)"]
    head.load_state_dict({k: fill_tensor(HEAD_PREFIX + k, tuple(shape), dtype) for k, shape, dtype in keys})
    return head.train()


def golden_stripes(golden):
    return [torch.from_numpy(golden[f"train_modal0_out{s}_x4{s + 1}"]) for s in range(4)]


def test_dcl_reproduces_the_official_stripe_values(golden):
    head = golden_head()
    for s, features in enumerate(golden_stripes(golden)):
        _, middle_vis, _, middle_ir = features.chunk(4, 0)
        value = head(torch.cat((middle_vis, middle_ir)))
        np.testing.assert_allclose(value.item(), golden[f"train_loss_dcl_stripe{s + 1}_unweighted"], rtol=1e-5)
    # Four batch-statistics updates of the head's BNs, as the official train step makes.
    np.testing.assert_allclose(head.fc2[0].running_mean.numpy(), golden["train_after_criterion_div_fc2_0_running_mean"],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(head.fc2[3].running_var.numpy(), golden["train_after_criterion_div_fc2_3_running_var"],
                               rtol=1e-5)


def test_mmn_loss_terms_reproduce_train_py_on_the_official_outputs(golden):
    """id, OriTriplet and DCL of MMNLoss on the official network's stripe features and logits."""
    head = golden_head()
    features = golden_stripes(golden)
    dcl = torch.stack([head(torch.cat(f.chunk(4, 0)[1::2])) for f in features])
    outputs = model_mmn.MMNTrainOutputs(features=tuple(features), dcl=dcl, middle_images=None, logits=tuple(
        torch.from_numpy(golden[f"train_modal0_out{s + 4}_logits{s + 1}"]) for s in range(4)))
    labels = torch.cat((torch.from_numpy(golden["label1"]), torch.from_numpy(golden["label2"])))
    terms = method_mmn.MMNLoss(margin=0.3)(outputs, labels)
    assert list(terms) == ["id", "OriTriplet", "DCL"]
    for ours, official in (("id", "id"), ("OriTriplet", "tri"), ("DCL", "dcl")):
        np.testing.assert_allclose(terms[ours].item(), golden[f"train_loss_{official}"], rtol=1e-5)
    np.testing.assert_allclose(sum(terms.values()).item(), golden["train_loss_total"], rtol=1e-5)
    triplet = losses.OriTripletLoss(0.3)
    for s, f in enumerate(features):
        stripe = mm.pairwise_block_triplet(f, labels[:2], labels[2:], triplet)
        np.testing.assert_allclose(stripe.item(), golden[f"train_loss_tri_stripe{s + 1}"], rtol=1e-5)
