"""eval_metrics: goldens, parity with a literal per-query oracle, and protocols.

The `literal_eval_*` functions below follow the official AGW/IRL eval_metrics.py loop line by
line (REFERENCE 3; the standard CMC that eval_sysu/eval_llcm compute and discard is left out),
with two documented changes: the sort kind is selectable (Q-23) and short
de-duplicated CMC rows are padded with their last value instead of crashing (Q-28).
The `plain_eval_*` functions are the same per-query loop written plainly with whole-row numpy
operations (checked against the literal ones here): the baseline bench/bench_metrics.py times
eval_metrics against, since the official loop's Python list per query would flatter any rewrite.
bench/bench_metrics.py imports both from here.
"""
import contextlib
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

import eval_metrics
from conftest import GOLDEN_DIR
from eval_metrics import eval_llcm, eval_regdb, eval_sysu, evaluate_protocol
from similarity import STANDARD_FUSIONS, similarity


# ----------------------------------------------------------------------------- literal oracle
def _pad_rows(rows, max_rank):
    """Q-28: pad each de-duplicated CMC row to max_rank with its last value (0 if empty)."""
    padded = []
    for row in rows:
        last = row[-1] if len(row) else 0
        padded.append(np.concatenate([row, np.full(max_rank - len(row), last, dtype=row.dtype)]))
    return padded


def sysu_remove(q_pid, q_camid, g_pids_ranked, g_camids_ranked):
    """eval_sysu: a cam-3 query ignores every cam-2 gallery image."""
    return (q_camid == 3) & (g_camids_ranked == 2)


def llcm_remove(q_pid, q_camid, g_pids_ranked, g_camids_ranked):
    """eval_llcm: a query ignores gallery images of its own pid and camera number."""
    return (g_pids_ranked == q_pid) & (g_camids_ranked == q_camid)


def literal_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, stable_sort=False,
                      remove_rule=sysu_remove):
    """The official eval_sysu loop; with remove_rule=llcm_remove it is the official eval_llcm loop."""
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind="stable" if stable_sort else None)
    pred_label = g_pids[indices]
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    new_all_cmc = []
    all_AP = []
    all_INP = []
    num_valid_q = 0.
    for q_idx in range(num_q):
        q_pid = q_pids[q_idx]
        q_camid = q_camids[q_idx]
        order = indices[q_idx]
        remove = remove_rule(q_pid, q_camid, g_pids[order], g_camids[order])
        keep = np.invert(remove)
        new_cmc = pred_label[q_idx][keep]
        new_index = np.unique(new_cmc, return_index=True)[1]
        new_cmc = [new_cmc[index] for index in sorted(new_index)]
        new_match = (new_cmc == q_pid).astype(np.int32)
        new_cmc = new_match.cumsum()
        new_all_cmc.append(new_cmc[:max_rank])
        orig_cmc = matches[q_idx][keep]
        if not np.any(orig_cmc):
            continue
        cmc = orig_cmc.cumsum()
        pos_idx = np.where(orig_cmc == 1)
        pos_max_idx = np.max(pos_idx)
        inp = cmc[pos_max_idx] / (pos_max_idx + 1.0)
        all_INP.append(inp)
        num_valid_q += 1.
        num_rel = orig_cmc.sum()
        tmp_cmc = orig_cmc.cumsum()
        tmp_cmc = [x / (i + 1.) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * orig_cmc
        AP = tmp_cmc.sum() / num_rel
        all_AP.append(AP)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    new_all_cmc = np.asarray(_pad_rows(new_all_cmc, max_rank)).astype(np.float32)
    new_all_cmc = new_all_cmc.sum(0) / num_valid_q
    return new_all_cmc, np.mean(all_AP), np.mean(all_INP)


def literal_eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, stable_sort=False):
    return literal_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort,
                             remove_rule=llcm_remove)


def literal_eval_regdb(distmat, q_pids, g_pids, max_rank=20, stable_sort=False):
    num_q, num_g = distmat.shape
    if num_g < max_rank:
        max_rank = num_g
    indices = np.argsort(distmat, axis=1, kind="stable" if stable_sort else None)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int32)
    all_cmc = []
    all_AP = []
    all_INP = []
    num_valid_q = 0.
    q_camids = np.ones(num_q).astype(np.int32)
    g_camids = 2 * np.ones(num_g).astype(np.int32)
    for q_idx in range(num_q):
        q_pid = q_pids[q_idx]
        q_camid = q_camids[q_idx]
        order = indices[q_idx]
        remove = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
        keep = np.invert(remove)
        raw_cmc = matches[q_idx][keep]
        if not np.any(raw_cmc):
            continue
        cmc = raw_cmc.cumsum()
        pos_idx = np.where(raw_cmc == 1)
        pos_max_idx = np.max(pos_idx)
        inp = cmc[pos_max_idx] / (pos_max_idx + 1.0)
        all_INP.append(inp)
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        num_valid_q += 1.
        num_rel = raw_cmc.sum()
        tmp_cmc = raw_cmc.cumsum()
        tmp_cmc = [x / (i + 1.) for i, x in enumerate(tmp_cmc)]
        tmp_cmc = np.asarray(tmp_cmc) * raw_cmc
        AP = tmp_cmc.sum() / num_rel
        all_AP.append(AP)
    assert num_valid_q > 0, "Error: all query identities do not appear in gallery"
    all_cmc = np.asarray(all_cmc).astype(np.float32)
    all_cmc = all_cmc.sum(0) / num_valid_q
    return all_cmc, np.mean(all_AP), np.mean(all_INP)


def plain_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, stable_sort=False,
                    remove_rule=sysu_remove):
    """Per query: argsort its row, drop the removed items, read the match positions off the kept
    ranked pids; de-duplicated CMC from np.unique(return_index). remove_rule=llcm_remove: eval_llcm."""
    return _plain_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort,
                       remove_rule, dedup_cmc=True)


def plain_eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, stable_sort=False):
    return plain_eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort,
                           remove_rule=llcm_remove)


def plain_eval_regdb(distmat, q_pids, g_pids, max_rank=20, stable_sort=False):
    return _plain_loop(distmat, q_pids, g_pids, None, None, max_rank, stable_sort, None,
                       dedup_cmc=False)


def _plain_loop(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort, remove_rule,
                dedup_cmc):
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    hits_at = np.zeros(max_rank, dtype=np.int64)        # valid queries whose CMC first hit is at k
    all_ap, all_inp = [], []
    for q_idx in range(num_q):
        order = np.argsort(distmat[q_idx], kind="stable" if stable_sort else None)
        ranked_pids = g_pids[order]
        if remove_rule is not None:
            remove = remove_rule(q_pids[q_idx], q_camids[q_idx], ranked_pids, g_camids[order])
            ranked_pids = ranked_pids[~remove]
        positions = np.flatnonzero(ranked_pids == q_pids[q_idx])
        if len(positions) == 0:
            continue
        all_ap.append(np.mean(np.arange(1, len(positions) + 1) / (positions + 1.0)))
        all_inp.append(len(positions) / (positions[-1] + 1.0))
        if dedup_cmc:
            first_seen = np.unique(ranked_pids, return_index=True)[1]
            hit = np.count_nonzero(first_seen < positions[0])
        else:
            hit = positions[0]
        if hit < max_rank:
            hits_at[hit] += 1
    assert all_ap, "Error: all query identities do not appear in gallery"
    cmc = np.cumsum(hits_at).astype(np.float32) / np.float32(len(all_ap))
    return cmc, np.mean(all_ap), np.mean(all_inp)


# ----------------------------------------------------------------------------- helpers
def _load(name):
    with np.load(os.path.join(GOLDEN_DIR, name)) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def golden():
    with open(os.path.join(GOLDEN_DIR, "golden_misc.json")) as f:
        return json.load(f)


def _assert_same(ours, reference, exact_cmc=True):
    cmc, mAP, mINP = ours
    ref_cmc, ref_mAP, ref_mINP = reference
    assert cmc.dtype == np.float32
    if exact_cmc:
        np.testing.assert_array_equal(cmc, ref_cmc)
    else:
        np.testing.assert_allclose(cmc, ref_cmc, rtol=0, atol=1e-7)
    np.testing.assert_allclose(mAP, ref_mAP, rtol=0, atol=1e-12)
    np.testing.assert_allclose(mINP, ref_mINP, rtol=0, atol=1e-12)


def _assert_golden(result, expected):
    cmc, mAP, mINP = result
    assert len(cmc) == len(expected["cmc"])
    np.testing.assert_allclose(cmc, expected["cmc"], rtol=0, atol=1e-7)
    assert abs(mAP - expected["mAP"]) < 1e-7
    assert abs(mINP - expected["mINP"]) < 1e-7


# ----------------------------------------------------------------------------- goldens
def test_golden_eval_sysu(golden):
    d = _load("eval_inputs.npz")
    args = (d["distmat"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])
    _assert_golden(eval_sysu(*args), golden["eval_sysu"])
    _assert_golden(literal_eval_sysu(*args), golden["eval_sysu"])


def test_golden_eval_regdb(golden):
    d = _load("eval_inputs.npz")
    _assert_golden(eval_regdb(d["distmat"], d["q_pids"], d["g_pids"]), golden["eval_regdb"])
    _assert_golden(literal_eval_regdb(d["distmat"], d["q_pids"], d["g_pids"]),
                   golden["eval_regdb"])


def test_golden_eval_regdb_transposed_tvsearch(golden):
    d = _load("eval_inputs.npz")
    expected = golden["eval_regdb_transposed_tvsearch"]
    _assert_golden(eval_regdb(d["distmat"].T, d["g_pids"], d["q_pids"]), expected)
    _assert_golden(literal_eval_regdb(d["distmat"].T, d["g_pids"], d["q_pids"]), expected)


def test_golden_eval_llcm(golden):
    d = _load("eval_inputs_llcm.npz")
    args = (d["distmat"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])
    _assert_golden(eval_llcm(*args), golden["eval_llcm"])
    _assert_golden(literal_eval_llcm(*args), golden["eval_llcm"])


def test_golden_stable_sort_changes_nothing_without_ties(golden):
    d = _load("eval_inputs.npz")
    args = (d["distmat"], d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"])
    _assert_golden(eval_sysu(*args, stable_sort=True), golden["eval_sysu"])


# ----------------------------------------------------------------------------- hand-worked cases
def test_sysu_dedup_cmc_by_hand():
    # Ranked gallery pids 5, 5, 7, 1 (distances 0..3); query pid 1 from camera 6 keeps all.
    # Distinct ranked ids: 5, 7, 1 -> first hit at dedup rank 3; standard rank would be 4.
    dist = np.array([[0.0, 1.0, 2.0, 3.0]])
    cmc, mAP, mINP = eval_sysu(dist, np.array([1]), np.array([5, 5, 7, 1]),
                               np.array([6]), np.array([1, 1, 1, 1]))
    np.testing.assert_array_equal(cmc, [0, 0, 1, 1])   # padded with last value
    assert mAP == pytest.approx(1 / 4) and mINP == pytest.approx(1 / 4)


def test_sysu_camera3_ignores_gallery_camera2():
    # Query from camera 3: the camera-2 gallery items (pids 1 and 5) are dropped.
    dist = np.array([[0.0, 1.0, 2.0, 3.0]])
    g_pids, g_cams = np.array([1, 5, 7, 1]), np.array([2, 2, 4, 5])
    cmc, mAP, mINP = eval_sysu(dist, np.array([1]), g_pids, np.array([3]), g_cams)
    np.testing.assert_array_equal(cmc, [0, 1, 1, 1])   # kept ranked ids: 7, 1
    assert mAP == pytest.approx(1 / 2) and mINP == pytest.approx(1 / 2)
    cmc6, mAP6, _ = eval_sysu(dist, np.array([1]), g_pids, np.array([6]), g_cams)
    np.testing.assert_array_equal(cmc6, [1, 1, 1, 1])
    assert mAP6 == pytest.approx((1 / 1 + 2 / 4) / 2)


def test_llcm_removes_same_pid_same_camera_only():
    dist = np.array([[0.0, 1.0, 2.0]])
    cmc, mAP, mINP = eval_llcm(dist, np.array([1]), np.array([1, 4, 1]),
                               np.array([2]), np.array([2, 2, 3]))
    np.testing.assert_array_equal(cmc, [0, 1, 1])      # kept ranked ids: 4, 1
    assert mAP == pytest.approx(1 / 2) and mINP == pytest.approx(1 / 2)


def test_invalid_queries_count_zero_but_do_not_divide():
    # Query 0 (pid 9) has no gallery match: excluded from num_valid, mAP and mINP.
    dist = np.array([[0.0, 1.0], [1.0, 0.0]])
    q_pids, g_pids = np.array([9, 2]), np.array([1, 2])
    for result in (eval_regdb(dist, q_pids, g_pids),
                   eval_sysu(dist, q_pids, g_pids, np.array([6, 6]), np.array([1, 1]))):
        cmc, mAP, mINP = result
        np.testing.assert_array_equal(cmc, [1, 1])
        assert mAP == 1.0 and mINP == 1.0


def test_max_rank_is_reduced_for_small_galleries_and_respected_otherwise():
    rng = np.random.default_rng(3)
    dist = rng.random((5, 7))
    pids = np.arange(5)
    g_pids = np.array([0, 1, 2, 3, 4, 0, 1])
    assert len(eval_regdb(dist, pids, g_pids)[0]) == 7
    assert len(eval_regdb(dist, pids, g_pids, max_rank=3)[0]) == 3
    assert len(eval_sysu(dist, pids, g_pids, np.full(5, 6), np.ones(7), max_rank=4)[0]) == 4


def test_returns_float32_cmc_and_float_metrics():
    d = _load("eval_inputs.npz")
    cmc, mAP, mINP = eval_regdb(d["distmat"].astype(np.float32), d["q_pids"], d["g_pids"])
    assert cmc.dtype == np.float32 and cmc.shape == (20,)
    assert isinstance(float(mAP), float) and 0 < mAP <= 1 and 0 < mINP <= 1


# ----------------------------------------------------------------------------- random parity
def _random_case(seed):
    """Random sizes (galleries below 20 included), absent query ids, float32/float64."""
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(1, 40)), int(rng.integers(1, 90))
    num_ids = int(rng.integers(1, 25))
    q_pids = rng.integers(0, num_ids + 3, num_q)          # ids >= num_ids never in the gallery
    g_pids = rng.integers(0, num_ids, num_g)
    dtype = np.float32 if seed % 2 else np.float64
    dist = rng.standard_normal((num_q, num_g)).astype(dtype)
    max_rank = int(rng.choice([20, 20, 5, 1, 50]))
    return rng, dist, q_pids, g_pids, max_rank


def _sysu_cams(rng, num_q, num_g):
    return rng.choice([3, 6], num_q), rng.choice([1, 2, 4, 5], num_g)


def _llcm_cams(rng, num_q, num_g):
    num_cams = int(rng.integers(1, 10))
    return rng.integers(1, num_cams + 1, num_q), rng.integers(1, num_cams + 1, num_g)


def _check_parity(ours_fn, literal_fn, args, **kwargs):
    try:
        reference = literal_fn(*args, **kwargs)
    except AssertionError:                       # official code: no valid query
        with pytest.raises(ValueError, match="no valid query"):
            ours_fn(*args, **kwargs)
        return False
    _assert_same(ours_fn(*args, **kwargs), reference)
    return True


@pytest.mark.parametrize("seed", range(60))
def test_parity_random_sysu(seed):
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    q_cams, g_cams = _sysu_cams(rng, *dist.shape)
    _check_parity(eval_sysu, literal_eval_sysu, (dist, q_pids, g_pids, q_cams, g_cams, max_rank))


@pytest.mark.parametrize("seed", range(60))
def test_parity_random_llcm(seed):
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    q_cams, g_cams = _llcm_cams(rng, *dist.shape)
    _check_parity(eval_llcm, literal_eval_llcm, (dist, q_pids, g_pids, q_cams, g_cams, max_rank))


@pytest.mark.parametrize("seed", range(60))
def test_parity_random_regdb(seed):
    _, dist, q_pids, g_pids, max_rank = _random_case(seed)
    _check_parity(eval_regdb, literal_eval_regdb, (dist, q_pids, g_pids, max_rank))


def test_parity_cases_cover_invalid_queries_and_small_galleries():
    """Guard that the random cases above exercise the edge cases they are meant to."""
    small, with_invalid, no_valid = 0, 0, 0
    for seed in range(60):
        _, dist, q_pids, g_pids, _ = _random_case(seed)
        small += dist.shape[1] < 20
        absent = ~np.isin(q_pids, g_pids)
        with_invalid += absent.any() and not absent.all()
        no_valid += absent.all()
    assert small >= 5 and with_invalid >= 20 and no_valid >= 1


def _check_parity_of_all_metrics(rng, dist, q_pids, g_pids, sort_kind):
    """The three metrics against their literal loops on one distance matrix (cameras drawn from `rng`)."""
    stable = {"stable_sort": sort_kind == "stable"}
    q_cams, g_cams = _sysu_cams(rng, *dist.shape)
    _check_parity(eval_sysu, literal_eval_sysu, (dist, q_pids, g_pids, q_cams, g_cams), **stable)
    q_cams, g_cams = _llcm_cams(rng, *dist.shape)
    _check_parity(eval_llcm, literal_eval_llcm, (dist, q_pids, g_pids, q_cams, g_cams), **stable)
    _check_parity(eval_regdb, literal_eval_regdb, (dist, q_pids, g_pids), **stable)


@pytest.mark.parametrize("sort_kind", ["stable", "default"])
@pytest.mark.parametrize("seed", range(15))
def test_parity_with_ties(seed, sort_kind):
    """Integer distances create many ties; both sides use the same sort kind."""
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    dist = rng.integers(0, 4, dist.shape).astype(dist.dtype)
    _check_parity_of_all_metrics(rng, dist, q_pids, g_pids, sort_kind)


def test_stable_sort_breaks_ties_by_gallery_index():
    # All distances equal: the stable order is the gallery order, so the match is ranked 3rd.
    dist = np.zeros((1, 3))
    cmc, mAP, _ = eval_regdb(dist, np.array([2]), np.array([0, 1, 2]), stable_sort=True)
    np.testing.assert_array_equal(cmc, [0, 0, 1])
    assert mAP == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", range(4))
def test_parity_when_queries_are_split_into_blocks(monkeypatch, seed):
    """Force several query blocks (and blocks of one row) to exercise block boundaries."""
    rng = np.random.default_rng(100 + seed)
    dist = rng.standard_normal((37, 45))
    q_pids, g_pids = rng.integers(0, 12, 37), rng.integers(0, 10, 45)
    monkeypatch.setattr(eval_metrics, "_BLOCK_ELEMENTS", [45, 45 * 4, 45 * 10, 1][seed])
    q_cams, g_cams = _sysu_cams(rng, 37, 45)
    _check_parity(eval_sysu, literal_eval_sysu, (dist, q_pids, g_pids, q_cams, g_cams))
    q_cams, g_cams = _llcm_cams(rng, 37, 45)
    _check_parity(eval_llcm, literal_eval_llcm, (dist, q_pids, g_pids, q_cams, g_cams))
    _check_parity(eval_regdb, literal_eval_regdb, (dist, q_pids, g_pids))


def test_parity_medium_sysu_shape():
    rng = np.random.default_rng(7)
    dist = rng.standard_normal((400, 301))
    q_pids, g_pids = rng.integers(0, 96, 400), np.repeat(np.arange(96), 4)[:301]
    q_cams, g_cams = _sysu_cams(rng, 400, 301)
    assert _check_parity(eval_sysu, literal_eval_sysu, (dist, q_pids, g_pids, q_cams, g_cams))


# ----------------------------------------------------------------------------- ranking without argsort
# eval_metrics ranks float matrices by binary-searching each query's true-match distances in its row
# sorted by value (in float32, cells beyond the last match flattened), and argsorts only queries with
# a tie between a match and another kept item, or a NaN match distance. The tests below check it
# against the literal loop.


def _tricky_case(seed):
    """A random case with NaN, infinite, -0.0/+0.0 and tied distances sprinkled in."""
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    dist = dist.astype(np.float64)
    cells = rng.random(dist.shape)
    dist[cells < 0.05] = np.nan
    dist[(cells >= 0.05) & (cells < 0.08)] = np.inf
    dist[(cells >= 0.08) & (cells < 0.10)] = -np.inf
    dist[(cells >= 0.10) & (cells < 0.13)] = 0.0
    dist[(cells >= 0.13) & (cells < 0.16)] = -0.0
    dist[(cells >= 0.16) & (cells < 0.25)] = np.round(dist[(cells >= 0.16) & (cells < 0.25)], 1)
    return rng, dist, q_pids, g_pids, max_rank


@pytest.mark.parametrize("seed", range(25))
def test_parity_of_all_metrics_on_one_matrix(seed):
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    q_cams, g_cams = _sysu_cams(rng, *dist.shape)
    _check_parity(eval_sysu, literal_eval_sysu, (dist, q_pids, g_pids, q_cams, g_cams, max_rank))
    q_cams, g_cams = _llcm_cams(rng, *dist.shape)
    _check_parity(eval_llcm, literal_eval_llcm, (dist, q_pids, g_pids, q_cams, g_cams, max_rank))
    _check_parity(eval_regdb, literal_eval_regdb, (dist, q_pids, g_pids, max_rank))


@pytest.mark.parametrize("sort_kind", ["stable", "default"])
@pytest.mark.parametrize("seed", range(12))
def test_parity_with_nan_inf_signed_zero_and_ties(seed, sort_kind):
    rng, dist, q_pids, g_pids, max_rank = _tricky_case(seed)
    _check_parity_of_all_metrics(rng, dist, q_pids, g_pids, sort_kind)


def _count_routes(monkeypatch):
    """Spy on the ranking: rows value-sorted, rows argsorted."""
    counts = {"value-sorted": 0, "argsorted": 0}
    sorted_rows, full_sort = eval_metrics._sorted_rows, eval_metrics._rank_by_full_sort

    def spy_sorted_rows(values, *args):
        counts["value-sorted"] += len(values)
        return sorted_rows(values, *args)

    def spy_full_sort(distmat, rows, *args):
        counts["argsorted"] += len(rows)
        return full_sort(distmat, rows, *args)

    monkeypatch.setattr(eval_metrics, "_sorted_rows", spy_sorted_rows)
    monkeypatch.setattr(eval_metrics, "_rank_by_full_sort", spy_full_sort)
    return counts


def test_parity_cases_exercise_every_route(monkeypatch):
    """Guard that the parity cases above reach the routes they are meant to test: random cases
    only the sorted rows, tricky ones also the argsort."""
    counts = _count_routes(monkeypatch)
    for seed in range(25):
        rng, dist, q_pids, g_pids, _ = _random_case(seed)
        with contextlib.suppress(ValueError):                # cases without a valid query
            eval_llcm(dist, q_pids, g_pids, *_llcm_cams(rng, *dist.shape))
    assert counts["value-sorted"] >= 100 and counts["argsorted"] == 0
    for seed in range(12):
        rng, dist, q_pids, g_pids, _ = _tricky_case(seed)
        with contextlib.suppress(ValueError):
            eval_regdb(dist, q_pids, g_pids)
    assert counts["argsorted"] >= 20


def test_only_queries_with_a_tie_at_a_match_are_argsorted(monkeypatch):
    counts = _count_routes(monkeypatch)
    # Query 0: a non-match (column 0) exactly as far as its match (column 2) -> argsorted.
    # Query 1: ties among non-matches only, and between its two matches -> no argsort needed.
    dist = np.array([[0.5, 0.1, 0.5, 0.9],
                     [0.3, 0.3, 0.7, 0.7]])
    q_pids, g_pids = np.array([1, 2]), np.array([0, 3, 1, 2])
    g_pids_1 = np.array([0, 3, 2, 2])
    cmc, mAP, _ = eval_regdb(dist[:1], q_pids[:1], g_pids, stable_sort=True)
    assert counts["argsorted"] == 1
    assert mAP == pytest.approx(1 / 3)               # stable: column 0 before column 2
    cmc, mAP, _ = eval_regdb(dist[1:], q_pids[1:], g_pids_1)
    assert counts["argsorted"] == 1
    assert mAP == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_nan_distances_rank_last_like_argsort():
    # argsort puts NaN after every number: the NaN non-match does not precede the match at 2.0,
    # and the NaN match is ranked after everything else.
    dist = np.array([[np.nan, 2.0, 1.0], [0.5, 1.0, np.nan]])
    cmc, mAP, mINP = eval_regdb(dist, np.array([5, 7]), np.array([3, 5, 4]))
    literal = literal_eval_regdb(dist, np.array([5, 7]), np.array([3, 5, 4]))
    _assert_same((cmc, mAP, mINP), literal)
    assert mAP == pytest.approx(1 / 2)


def test_own_identity_only_rules_never_remove_other_identities():
    """eval_metrics skips such rules for other identities' gallery items; check the claim."""
    rng = np.random.default_rng(11)
    q_pids, q_cams = rng.integers(0, 5, 200), rng.integers(1, 4, 200)
    g_pids, g_cams = rng.integers(0, 5, 300), rng.integers(1, 4, 300)
    for metric in eval_metrics._OWN_IDENTITY_ONLY_RULES:
        removed = eval_metrics.removed_gallery(metric, q_pids, q_cams, g_pids, g_cams)
        assert removed.any()
        assert not (removed & (q_pids[:, None] != g_pids[None, :])).any()


def test_sysu_removal_is_the_product_of_its_query_rows_and_gallery_columns():
    """eval_metrics sets SYSU's removed cells aside as rows x columns; check that this product is
    exactly the rule, for a subset of queries too."""
    rng = np.random.default_rng(12)
    q_pids, q_cams = rng.integers(0, 5, 200), rng.choice([3, 6], 200)
    g_pids, g_cams = rng.integers(0, 5, 300), rng.choice([1, 2, 4, 5], 300)
    removal = eval_metrics._Removal("sysu", q_pids, q_cams, g_pids, g_cams)
    queries = np.arange(10, 150)
    rows, columns = removal.other_identity_cells(queries)
    product = np.zeros((len(queries), len(g_pids)), dtype=bool)
    product[np.ix_(rows, columns)] = True
    expected = eval_metrics.removed_gallery("sysu", q_pids[queries], q_cams[queries], g_pids, g_cams)
    assert product.any() and np.array_equal(product, expected)
    assert eval_metrics._Removal("llcm", q_pids, q_cams, g_pids, g_cams).other_identity_cells(
        queries) is None


@pytest.mark.parametrize("seed", range(6))
def test_parity_on_non_contiguous_and_float32_matrices(seed):
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    q_cams, g_cams = _llcm_cams(rng, *dist.shape)
    for matrix in (np.asfortranarray(dist), dist.astype(np.float32), np.asarray(dist.T).T):
        _check_parity(eval_llcm, literal_eval_llcm, (matrix, q_pids, g_pids, q_cams, g_cams, max_rank))


# Float64 matrices are ranked in float32 (eval_metrics._rank_by_match_distances): distances that
# differ only below float32's resolution round to equal values and must go to the argsort.
def test_float64_distances_equal_after_rounding_rank_by_their_exact_values(monkeypatch):
    counts = _count_routes(monkeypatch)
    # Query 0: the non-match is 1e-12 farther than the match -> match first (AP 1).
    # Query 1: the non-match is 1e-12 closer -> match second (AP 1/2).
    # Query 2: no rounding collision (nothing argsorted for it): match third (AP 1/3).
    dist = np.array([[1.0, 1.0 + 1e-12, 3.0],
                     [1.0, 1.0 - 1e-12, 3.0],
                     [5.0, 2.0, 1.0]])
    assert np.float32(dist[0, 1]) == np.float32(dist[0, 0])     # the case the test is about
    q_pids, g_pids = np.array([1, 1, 1]), np.array([1, 2, 3])
    cmc, mAP, mINP = eval_regdb(dist, q_pids, g_pids)
    _assert_same((cmc, mAP, mINP), literal_eval_regdb(dist, q_pids, g_pids))
    assert mAP == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert counts["argsorted"] == 2


def _beyond_float32_case(seed):
    """A random float64 case whose rows hold near-equal pairs (closer than float32's resolution), and
    rows scaled beyond float32's range (to +-inf) or below it (to zero or subnormals)."""
    rng, dist, q_pids, g_pids, max_rank = _random_case(seed)
    dist = dist.astype(np.float64)
    num_q, num_g = dist.shape
    source, target = rng.integers(0, num_g, num_q), rng.integers(0, num_g, num_q)
    nudge = rng.choice([-1e-12, 0.0, 1e-12], num_q) * np.abs(dist[np.arange(num_q), source])
    dist[np.arange(num_q), target] = dist[np.arange(num_q), source] + nudge
    scale = rng.choice([1.0, 1.0, 2.0 ** 200, 2.0 ** -1000, 1e-310], num_q)
    return rng, dist * scale[:, None], q_pids, g_pids, max_rank


@pytest.mark.parametrize("sort_kind", ["stable", "default"])
@pytest.mark.parametrize("seed", range(24))
def test_parity_beyond_float32_resolution_and_range(seed, sort_kind):
    with np.errstate(under="ignore"):
        rng, dist, q_pids, g_pids, _ = _beyond_float32_case(seed)
    with np.errstate(all="raise"):                 # rounding to float32 must not warn either
        _check_parity_of_all_metrics(rng, dist, q_pids, g_pids, sort_kind)


@pytest.mark.parametrize("seed", range(3))
def test_parity_in_a_larger_gallery_with_close_and_deep_matches(seed):
    """Trained-like rows (matches close: most of the row is flattened beyond the last match) and
    near-chance rows (matches deep) in one block of a 700-item gallery."""
    rng = np.random.default_rng(300 + seed)
    num_q, num_g = 150, 700
    q_pids, g_pids = rng.integers(0, 40, num_q), rng.integers(0, 40, num_g)
    trained_like = [0.7, 0.7, 0.2][seed]
    pull = np.where(rng.random(num_q) < trained_like, 4.0, 0.5)[:, None]
    dist = rng.standard_normal((num_q, num_g)) - pull * (q_pids[:, None] == g_pids[None, :])
    if seed == 2:
        dist = dist.astype(np.float32)
    _check_parity_of_all_metrics(rng, dist, q_pids, g_pids, "default")


def test_items_just_beyond_the_last_match_are_neither_ties_nor_closer(monkeypatch):
    """Cells beyond a query's last match are flattened to the value just past it: an item exactly
    there must rank after the match without being taken for a tie, one at the match distance is a tie."""
    counts = _count_routes(monkeypatch)
    last = np.float32(1.0)
    just_past = np.nextafter(last, np.float32(2.0))
    dist = np.array([[last, just_past, 0.5, 3.0],                 # match at column 0
                     [last, last, 0.5, 3.0]], dtype=np.float32)    # column 1: a tie with the match
    q_pids, g_pids = np.array([1, 1]), np.array([1, 2, 3, 4])
    cmc, mAP, mINP = eval_regdb(dist, q_pids, g_pids, stable_sort=True)
    _assert_same((cmc, mAP, mINP), literal_eval_regdb(dist, q_pids, g_pids, stable_sort=True))
    assert mAP == pytest.approx(1 / 2)                            # both: match second, after 0.5
    assert counts["argsorted"] == 1                               # the tie only


# ----------------------------------------------------------------------------- plain loop (bench)
@pytest.mark.parametrize("sort_kind", ["stable", "default"])
@pytest.mark.parametrize("seed", range(20))
def test_plain_loop_matches_the_literal_loop(seed, sort_kind):
    """bench/bench_metrics.py times eval_metrics against plain_eval_*; it must be a faithful loop."""
    rng, dist, q_pids, g_pids, max_rank = _tricky_case(seed) if seed % 2 else _random_case(seed)
    stable = {"stable_sort": sort_kind == "stable"}
    for plain, literal, cams in ((plain_eval_sysu, literal_eval_sysu, _sysu_cams),
                                 (plain_eval_llcm, literal_eval_llcm, _llcm_cams)):
        args = (dist, q_pids, g_pids, *cams(rng, *dist.shape), max_rank)
        try:
            reference = literal(*args, **stable)
        except AssertionError:
            with pytest.raises(AssertionError):
                plain(*args, **stable)
            continue
        _assert_same(plain(*args, **stable), reference, exact_cmc=True)
    if np.isin(q_pids, g_pids).any():
        _assert_same(plain_eval_regdb(dist, q_pids, g_pids, max_rank, **stable),
                     literal_eval_regdb(dist, q_pids, g_pids, max_rank, **stable))


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("call, message", [
    (lambda: eval_regdb(np.zeros(3), np.zeros(1), np.zeros(3)), "2-D"),
    (lambda: eval_regdb(np.zeros((0, 3)), np.zeros(0), np.zeros(3)), "non-empty"),
    (lambda: eval_regdb(np.zeros((2, 3)), np.zeros(3), np.zeros(3)), "q_pids"),
    (lambda: eval_regdb(np.zeros((2, 3)), np.zeros(2), np.zeros((3, 1))), "g_pids"),
    (lambda: eval_sysu(np.zeros((2, 3)), np.zeros(2), np.zeros(3), np.zeros(1), np.zeros(3)),
     "q_camids"),
    (lambda: eval_llcm(np.zeros((2, 3)), np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(2)),
     "g_camids"),
    (lambda: eval_regdb(np.zeros((2, 3)), np.zeros(2), np.zeros(3), max_rank=0), "max_rank"),
    (lambda: eval_regdb(np.array([["a", "b"]]), np.zeros(1), np.zeros(2)), "real numbers"),
    (lambda: eval_regdb(np.zeros((2, 3)), np.array([7, 8]), np.zeros(3)), "no valid query"),
    # Every gallery item of the query's identity is removed -> no valid query.
    (lambda: eval_llcm(np.zeros((1, 2)), np.array([1]), np.array([1, 2]), np.array([4]),
                       np.array([4, 4])), "no valid query"),
])
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ----------------------------------------------------------------------------- features
def _unit_rows(rng, n, c, dtype=np.float64):
    x = rng.standard_normal((n, c))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _features(rng, n, c=8, dtype=np.float64):
    return {"pool": _unit_rows(rng, n, c, dtype), "bn": _unit_rows(rng, n, c, dtype)}


# ----------------------------------------------------------------------------- evaluate_protocol
def _protocol(rng, metric, transpose=False, num_trials=3, num_ids=12):
    """A TestProtocol-like object: all queries, one sampled gallery item per id per trial."""
    num_q, num_cand = 30, 3 * num_ids
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = np.repeat(np.arange(num_ids), 3)
    cams = {"sysu": ([3, 6], [1, 2, 4, 5]), "llcm": ([1, 2, 3], [1, 2, 3]), "regdb": ([1], [2])}
    q_cams, g_cams = rng.choice(cams[metric][0], num_q), rng.choice(cams[metric][1], num_cand)
    trial_indices = [np.arange(num_ids) * 3 + rng.integers(0, 3, num_ids)
                     for _ in range(num_trials)]
    return SimpleNamespace(name=f"test-{metric}", metric=metric, query_pids=q_pids,
                           query_cams=q_cams, gallery_pids=g_pids, gallery_cams=g_cams,
                           trial_indices=trial_indices, trials=list(range(num_trials)),
                           transpose=transpose)


def _direct(protocol, qf, gf, mode, trial):
    idx = protocol.trial_indices[trial]
    g_trial = {k: v[idx] for k, v in gf.items()}
    gp, gc = protocol.gallery_pids[idx], protocol.gallery_cams[idx]
    qp, qc = protocol.query_pids, protocol.query_cams
    if protocol.transpose:
        dist = -similarity(g_trial, qf, STANDARD_FUSIONS[mode])
        qp, qc, gp, gc = gp, gc, qp, qc
    else:
        dist = -similarity(qf, g_trial, STANDARD_FUSIONS[mode])
    if protocol.metric == "regdb":
        return eval_regdb(dist, qp, gp)
    return {"sysu": eval_sysu, "llcm": eval_llcm}[protocol.metric](dist, qp, gp, qc, gc)


@pytest.mark.parametrize("metric, transpose", [("sysu", False), ("llcm", False), ("regdb", False),
                                               ("regdb", True), ("llcm", True)])
def test_evaluate_protocol_matches_direct_computation(metric, transpose):
    rng = np.random.default_rng(5)
    protocol = _protocol(rng, metric, transpose)
    num_cand = len(protocol.gallery_pids)
    qf, gf = _features(rng, 30, dtype=np.float32), _features(rng, num_cand, dtype=np.float32)
    modes = ("bn", "pool", "sum", "weighted")
    result = evaluate_protocol(qf, gf, protocol, modes=modes)
    json.dumps(result)                                  # JSON-friendly
    assert set(result) == {"per_trial", "mean", "std"}
    for mode in modes:
        trials = result["per_trial"][mode]
        assert [t["trial"] for t in trials] == protocol.trials
        direct = [_direct(protocol, qf, gf, mode, k) for k in range(len(protocol.trials))]
        for got, (cmc, mAP, mINP) in zip(trials, direct):
            np.testing.assert_allclose(got["cmc"], cmc, rtol=0, atol=1e-7)
            assert got["mAP"] == pytest.approx(mAP, abs=1e-12)
            assert got["mINP"] == pytest.approx(mINP, abs=1e-12)
        cmcs = np.array([d[0] for d in direct], dtype=np.float64)
        np.testing.assert_allclose(result["mean"][mode]["cmc"], cmcs.mean(0), atol=1e-7)
        np.testing.assert_allclose(result["std"][mode]["cmc"], cmcs.std(0), atol=1e-7)
        assert result["mean"][mode]["mAP"] == pytest.approx(np.mean([d[1] for d in direct]))
        assert result["std"][mode]["mINP"] == pytest.approx(np.std([d[2] for d in direct]))


def test_evaluate_protocol_transpose_changes_the_query_side():
    rng = np.random.default_rng(6)
    protocol = _protocol(rng, "regdb", num_trials=1)
    qf, gf = _features(rng, 30), _features(rng, len(protocol.gallery_pids))
    plain = evaluate_protocol(qf, gf, protocol, modes=("bn",))
    protocol.transpose = True
    flipped = evaluate_protocol(qf, gf, protocol, modes=("bn",))
    idx = protocol.trial_indices[0]
    dist = -(gf["bn"][idx] @ qf["bn"].T)
    cmc, mAP, _ = eval_regdb(dist, protocol.gallery_pids[idx], protocol.query_pids)
    assert flipped["per_trial"]["bn"][0]["mAP"] == pytest.approx(mAP)
    assert flipped["per_trial"]["bn"][0]["mAP"] != pytest.approx(plain["per_trial"]["bn"][0]["mAP"])
    assert flipped["std"]["bn"]["mAP"] == 0.0


def test_evaluate_protocol_default_modes_and_missing_transpose_attribute():
    rng = np.random.default_rng(8)
    protocol = _protocol(rng, "sysu", num_trials=2)
    del protocol.transpose                               # duck typing: defaults to False
    qf, gf = _features(rng, 30), _features(rng, len(protocol.gallery_pids))
    result = evaluate_protocol(qf, gf, protocol)
    assert set(result["per_trial"]) == {"bn", "pool"}
    assert len(result["mean"]["bn"]["cmc"]) == 12        # trial galleries have 12 items


@pytest.mark.parametrize("change, message", [
    ({"metric": "market"}, "unknown metric"),
    ({"trials": [0]}, "one trial id per gallery trial"),
    ({"trial_indices": [], "trials": []}, "one trial id per gallery trial"),
])
def test_evaluate_protocol_errors(change, message):
    rng = np.random.default_rng(9)
    protocol = _protocol(rng, "sysu", num_trials=2)
    for key, value in change.items():
        setattr(protocol, key, value)
    qf, gf = _features(rng, 30), _features(rng, len(protocol.gallery_pids))
    with pytest.raises(ValueError, match=message):
        evaluate_protocol(qf, gf, protocol)


def test_non_finite_warnings_count_rows_with_any_bad_feature():
    rng = np.random.default_rng(10)
    qf, gf = _features(rng, 6), _features(rng, 5)
    assert eval_metrics.non_finite_warnings(qf, gf) == []
    qf["pool"][1, 0], qf["bn"][1, 3], qf["bn"][4, 2] = np.nan, np.inf, -np.inf   # rows 1 and 4
    gf["bn"][0, 0] = np.nan
    warnings = eval_metrics.non_finite_warnings(qf, gf)
    assert len(warnings) == 2
    assert warnings[0].startswith("warning: 2 of 6 query features are not finite")
    assert warnings[1].startswith("warning: 1 of 5 gallery features are not finite")
