"""IFALNet's TcaLoss against a literal transcription of the official loop (float32 and float64, values and
gradients) and its hard-coded divisor option (the method's named terms: test_ifalnet_method.py)."""
import pytest
import torch

import loss as losses
from test_sync_free import SyncRecorder
from utils import ConfigError


def literal_tca(inputs, targets, margin=0.7, divisor=None):
    """IFALNet loss.py TcaLoss.forward, loop by loop as the official code; divisor None = its 4."""
    def pdist(a, b):       # the official pdist_torch
        m, n = a.shape[0], b.shape[0]
        dist = a.pow(2).sum(1, keepdim=True).expand(m, n) + b.pow(2).sum(1, keepdim=True).expand(n, m).t()
        return (dist - 2 * a @ b.t()).clamp(min=1e-12).sqrt()
    ft1, ft2, ft3, ft4 = torch.chunk(inputs, 4, 0)
    lb1 = torch.chunk(targets, 4, 0)[0]
    feats = [(ft1 + ft2) / 2, (ft1 + ft3) / 2, (ft1 + ft4) / 2, (ft2 + ft3) / 2, (ft2 + ft4) / 2, (ft3 + ft4) / 2]
    n = lb1.unique().numel()
    num = inputs.size(0)
    centres = [torch.cat([chunk.mean(0, keepdim=True) for chunk in feat.chunk(n, 0)]) for feat in feats]
    row_centres = torch.stack([inputs[targets == targets[i]].mean(0) for i in range(num)])
    dist_25, dist_16, dist_34 = pdist(centres[1], centres[4]), pdist(centres[0], centres[5]), pdist(centres[2], centres[3])
    dist = pdist(inputs, row_centres)
    positive = sum(max(dist_25[i, i], dist_16[i, i], dist_34[i, i]) for i in range(n))
    negative = []
    for i in range(num):
        others = [(margin - dist[i, j]).clamp(min=0) for j in range(num) if targets[j] != targets[i]]
        negative.append(sum(others) / len(others))
    return positive / (4 if divisor is None else divisor) + sum(negative) / num


def sampler_batch(identities, per_identity, dim, dtype, scale=1.0, seed=0):
    """Features [4M, dim] and labels of an identity-sampler batch: per block, each identity's rows in a row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randperm(50, generator=gen)[:identities]
    block_labels = ids.repeat_interleave(per_identity)
    x = scale * torch.randn(4 * len(block_labels), dim, generator=gen, dtype=torch.float64)
    return x.to(dtype), block_labels.repeat(4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("identities, per_identity, scale", [(4, 2, 0.1), (3, 3, 0.05), (4, 4, 1.0), (2, 1, 0.2)])
def test_tca_matches_the_official_loop(dtype, identities, per_identity, scale):
    x, labels = sampler_batch(identities, per_identity, 7, dtype, scale)
    expected = literal_tca(x, labels)
    got = losses.TcaLoss(official_divisor=True)(x, labels)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    fixed = losses.TcaLoss()(x, labels)          # default: divided by the number of identities
    torch.testing.assert_close(fixed, literal_tca(x, labels, divisor=identities), rtol=tol, atol=tol)
    if identities == 4:
        torch.testing.assert_close(fixed, got, rtol=tol, atol=tol)      # the official default batch: identical


def test_the_negative_term_is_active_at_small_scales_and_off_at_large_ones():
    x, labels = sampler_batch(4, 2, 7, torch.float64, scale=0.05)
    small = losses.TcaLoss()(x, labels) - losses.TcaLoss(margin=0.0)(x, labels)
    assert small > 0.1
    x, labels = sampler_batch(4, 2, 7, torch.float64, scale=10.0)
    assert losses.TcaLoss()(x, labels) == losses.TcaLoss(margin=0.0)(x, labels)


def test_tca_gradients_match_the_official_loop():
    x, labels = sampler_batch(3, 2, 5, torch.float64, scale=0.1, seed=2)
    x_loop = x.clone().requires_grad_()
    literal_tca(x_loop, labels, divisor=3).backward()
    x.requires_grad_()
    losses.TcaLoss()(x, labels).backward()
    torch.testing.assert_close(x.grad, x_loop.grad, rtol=1e-10, atol=1e-12)


def test_tca_refuses_an_identity_missing_from_a_block():
    x, labels = sampler_batch(2, 2, 5, torch.float32)
    labels = labels.clone()
    labels[-1] = 99
    with pytest.raises(ConfigError, match="all four blocks"):
        losses.TcaLoss()(x, labels)



def test_tca_forward_and_backward_never_wait_for_the_device(monkeypatch):
    x, labels = sampler_batch(4, 2, 6, torch.float32, scale=0.1, seed=5)
    x.requires_grad_()
    with SyncRecorder(monkeypatch) as recorder:
        losses.TcaLoss()(x, labels).backward()
    assert recorder.seen == [] and torch.isfinite(x.grad).all()
