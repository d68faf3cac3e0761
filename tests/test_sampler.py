"""GenIdx and IdentitySampler: golden reproduction (REFERENCE 13.3), validation, length, DDP shares."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import GOLDEN_DIR
from utils import ConfigError, GenIdx, IdentitySampler

B, P = 6, 4


def golden_setup():
    """REFERENCE 13.3: 10 ids, 7 RGB and 3 IR images each."""
    return np.repeat(np.arange(10), 7), np.repeat(np.arange(10), 3)


def make_sampler(rgb, ir, seed=0, num_pos=P, batch=B, **kw):
    color_pos, thermal_pos = GenIdx(rgb, ir)
    np.random.seed(seed)
    return IdentitySampler(rgb, ir, color_pos, thermal_pos, num_pos, batch, 0, **kw)


def test_golden_plan_reproduces():
    with open(os.path.join(GOLDEN_DIR, "golden_misc.json")) as f:
        golden = json.load(f)["sampler"]
    sampler = make_sampler(*golden_setup())
    np.testing.assert_array_equal(sampler.index1, golden["index1"])
    np.testing.assert_array_equal(sampler.index2, golden["index2"])


def test_genidx_matches_literal_loop():
    rng = np.random.default_rng(1)
    rgb, ir = rng.integers(0, 5, 40), rng.permutation(np.repeat(np.arange(5), 3))
    color_pos, thermal_pos = GenIdx(rgb, ir)
    for labels, pos in ((rgb, color_pos), (ir, thermal_pos)):
        expected = []
        for c in sorted(set(labels.tolist())):
            expected.append([k for k in range(len(labels)) if labels[k] == c])
        assert [p.tolist() for p in pos] == expected


def test_genidx_indexes_by_sorted_class_position():
    color_pos, _ = GenIdx(np.array([7, 3, 7, 3, 9]), np.array([3, 7, 9]))
    assert [p.tolist() for p in color_pos] == [[1, 3], [0, 2], [4]]


def test_length_is_number_of_yielded_positions():
    rgb, ir = golden_setup()
    sampler = make_sampler(rgb, ir)
    yielded = list(sampler)
    assert yielded == list(range(len(sampler.index1)))
    assert len(sampler) == len(yielded) == sampler.num_batches * B * P
    assert sampler.num_batches == 70 // (B * P) + 1 == 3
    assert sampler.N == 70


def test_dataloader_runs_floor_plus_one_full_batches():
    """Q-08: the DataLoader (batch B*P, drop_last) runs floor(N/(B*P)) + 1 batches and len() says so."""
    rgb, ir = np.repeat(np.arange(12), 9), np.repeat(np.arange(12), 5)   # N = 108 -> 4 + 1 batches
    sampler = make_sampler(rgb, ir)
    loader = torch.utils.data.DataLoader(list(range(len(sampler.index1))), batch_size=B * P,
                                         sampler=sampler, drop_last=True)
    assert len(loader) == sum(1 for _ in loader) == 108 // (B * P) + 1


def test_batch_structure_ids_by_pos_and_paired_labels():
    rng = np.random.default_rng(3)
    rgb = rng.permutation(np.repeat(np.arange(9), 8))
    ir = rng.permutation(np.repeat(np.arange(9), 2))        # fewer IR images than num_pos: with replacement
    sampler = make_sampler(rgb, ir, seed=5)
    l1, l2 = rgb[sampler.index1], ir[sampler.index2]
    np.testing.assert_array_equal(l1, l2)
    for batch in l1.reshape(-1, B, P):
        assert (batch == batch[:, :1]).all()                  # each group of P shares one identity
        assert len(set(batch[:, 0].tolist())) == B            # B distinct identities per batch


def test_plan_depends_only_on_global_numpy_seed():
    rgb, ir = golden_setup()
    a, b, c = make_sampler(rgb, ir, seed=4), make_sampler(rgb, ir, seed=4), make_sampler(rgb, ir, seed=5)
    np.testing.assert_array_equal(a.index1, b.index1)
    np.testing.assert_array_equal(a.index2, b.index2)
    assert not np.array_equal(a.index1, c.index1)


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shares_are_disjoint_equal_and_cover_the_plan(world):
    rgb, ir = np.repeat(np.arange(10), 25), np.repeat(np.arange(10), 12)   # N = 250 -> 11 batches
    samplers = [make_sampler(rgb, ir, num_replicas=world, rank=r) for r in range(world)]
    for s in samplers[1:]:                                   # same seed -> the same plan on every rank
        np.testing.assert_array_equal(s.index1, samplers[0].index1)
        np.testing.assert_array_equal(s.index2, samplers[0].index2)
    shares = [list(s) for s in samplers]
    per_rank = samplers[0].num_batches // world
    assert samplers[0].num_batches == 11
    assert all(len(sh) == len(s) == per_rank * B * P for sh, s in zip(shares, samplers))
    assert len(set().union(*map(set, shares))) == sum(map(len, shares))      # disjoint
    batch_ids = []
    for rank, share in enumerate(shares):
        chunks = np.asarray(share).reshape(-1, B * P)
        starts = chunks[:, 0]
        assert (starts % (B * P) == 0).all()                 # whole, aligned plan batches
        np.testing.assert_array_equal(chunks, starts[:, None] + np.arange(B * P))
        np.testing.assert_array_equal(starts // (B * P), np.arange(rank, per_rank * world, world))
        batch_ids += (starts // (B * P)).tolist()
    assert sorted(batch_ids) == list(range(per_rank * world))


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pos=0), "num_pos"),
    (dict(batch=0), "batchSize"),
    (dict(batch=11), "only 10 identities"),
    (dict(num_replicas=2, rank=2), "rank"),
    (dict(num_replicas=2, rank=-1), "rank"),
    (dict(num_replicas=0, rank=0), "num_replicas"),
    (dict(num_replicas=4, rank=0), "fewer than num_replicas"),
])
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_sampler(*golden_setup(), **kwargs)


def test_non_contiguous_labels_rejected():
    rgb, ir = golden_setup()
    with pytest.raises(ConfigError, match="contiguous"):
        make_sampler(rgb + 1, ir + 1)


def test_identities_missing_from_one_modality_rejected():
    rgb, ir = golden_setup()
    with pytest.raises(ConfigError, match="same identities"):
        make_sampler(rgb, ir[ir != 4])


def test_position_lists_must_match_identities():
    rgb, ir = golden_setup()
    color_pos, thermal_pos = GenIdx(rgb, ir)
    with pytest.raises(ConfigError, match="GenIdx"):
        IdentitySampler(rgb, ir, color_pos[:-1], thermal_pos, P, B)
