"""rerank: k-reciprocal re-ranking against a literal per-row implementation of the paper.

`literal_re_ranking` is written from the definitions of Zhong et al. (CVPR 2017), one item at a
time with Python sets, following the conventions of the standard distance-matrix implementation
where the paper leaves a choice: N(p, k) holds k + 1 items (p itself included), the half-size
neighbourhood is round(k1 / 2) (numpy's round-half-to-even), a candidate set joins R* when it
shares MORE than 2/3 of its members, V's weights are normalised to sum 1, `original` is the
float32 squared distance over its column maximum, transposed, and the Jaccard distance's sum of
maxima is taken as 2 - (sum of minima). That equals the sum of maxima when both rows of V sum to 1,
that is unless an item has no k-reciprocal neighbour at all (its V row is empty), which the
asymmetric cases below produce. Ties in a ranking go to the lower index (rerank's documented
choice). bench/bench_rerank.py imports it from here.
"""
import numpy as np
import pytest

import rerank
from rerank import RERANK_PRESETS, feature_distances, re_ranking


# ----------------------------------------------------------------------------- literal oracle
def literal_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    num_q = len(q_g_dist)
    dist = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                           np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0)
    squared = np.power(dist, 2).astype(np.float32)
    original = (squared / squared.max(axis=0)).T
    num = len(original)
    ranking = np.argsort(original, axis=1, kind="stable")

    def nearest(p, k):                                   # N(p, k)
        return set(ranking[p, :k + 1].tolist())

    def reciprocal(p, k):                                # R(p, k)
        return {g for g in nearest(p, k) if p in nearest(g, k)}

    half = int(np.around(k1 / 2.0))
    weights = np.zeros((num, num), dtype=np.float32)
    for p in range(num):
        expanded = set(reciprocal(p, k1))                # R*(p, k1)
        for q in reciprocal(p, k1):
            candidate = reciprocal(q, half)
            if len(candidate & reciprocal(p, k1)) > 2.0 / 3 * len(candidate):
                expanded |= candidate
        members = sorted(expanded)
        weight = np.exp(-original[p, members])
        weights[p, members] = weight / weight.sum()
    if k2 != 1:                                          # local query expansion
        weights = np.array([weights[ranking[p, :k2]].mean(axis=0) for p in range(num)])
    jaccard = np.zeros((num_q, num), dtype=np.float32)
    for p in range(num_q):
        for g in range(num):
            shared = np.minimum(weights[p], weights[g]).sum()
            jaccard[p, g] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + original[:num_q] * lambda_value
    return final[:, num_q:]


# ----------------------------------------------------------------------------- cases
def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_features(rng, num_q, num_g, dim=8):
    return _unit(rng.standard_normal((num_q, dim))), _unit(rng.standard_normal((num_g, dim)))


def identity_features(rng, num_q, num_g, num_ids, dim=16, noise=0.6):
    """Real-shaped features: a centre per identity, queries infrared and gallery visible, each
    modality with its own offset, as in a VI-ReID test set."""
    centres = rng.standard_normal((num_ids, dim))
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    infrared, visible = rng.standard_normal(dim) * 0.5, rng.standard_normal(dim) * 0.5
    query = _unit(centres[q_pids] + infrared + noise * rng.standard_normal((num_q, dim)))
    gallery = _unit(centres[g_pids] + visible + noise * rng.standard_normal((num_g, dim)))
    return query, gallery, q_pids, g_pids


def _check(distances, **params):
    ours = re_ranking(*distances, **params)
    reference = literal_re_ranking(*distances, **params)
    assert ours.dtype == np.float32 and ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    return ours


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("seed", range(6))
def test_matches_literal_on_random_features(seed):
    rng = np.random.default_rng(seed)
    num_q, num_g = int(rng.integers(5, 30)), int(rng.integers(5, 40))
    _check(feature_distances(*random_features(rng, num_q, num_g)),
           k1=int(rng.integers(2, 12)), k2=int(rng.integers(1, 8)), lambda_value=float(rng.random()))


@pytest.mark.parametrize("preset", sorted(RERANK_PRESETS))
@pytest.mark.parametrize("seed", range(3))
def test_matches_literal_on_identity_clusters_with_the_presets(seed, preset):
    rng = np.random.default_rng(10 + seed)
    query, gallery, _, _ = identity_features(rng, 45, 40, num_ids=9)
    _check(feature_distances(query, gallery), **RERANK_PRESETS[preset])


@pytest.mark.parametrize("num_q, num_g", [(1, 1), (1, 4), (5, 1)])
def test_matches_literal_with_one_query_or_one_gallery_item(num_q, num_g):
    rng = np.random.default_rng(15)
    _check(feature_distances(*random_features(rng, num_q, num_g)), k1=3, k2=2, lambda_value=0.3)


@pytest.mark.parametrize("k1, k2", [(1, 1), (1, 3), (3, 1), (50, 2), (200, 200), (4, 60)])
def test_matches_literal_at_extreme_neighbourhood_sizes(k1, k2):
    """Neighbourhoods as small as one item, and larger than all items (clipped like slicing)."""
    rng = np.random.default_rng(20)
    _check(feature_distances(*random_features(rng, 12, 15)), k1=k1, k2=k2, lambda_value=0.5)


@pytest.mark.parametrize("seed", range(3))
def test_matches_literal_on_asymmetric_float64_and_integer_distances(seed):
    """The standard code reads column i of the concatenated matrix as item i's row; with
    asymmetric inputs that differs from its row i, so the transposition is checked."""
    rng = np.random.default_rng(30 + seed)
    num_q, num_g = 14, 17
    q_g, q_q, g_g = rng.random((num_q, num_g)), rng.random((num_q, num_q)), rng.random((num_g, num_g))
    _check((q_g, q_q, g_g), k1=5, k2=3, lambda_value=0.3)
    integers = tuple((m * 50).astype(np.int64) + 1 for m in (q_g, q_q, g_g))
    _check(integers, k1=5, k2=3, lambda_value=0.3)      # many ties: broken by index on both sides


def test_matches_literal_with_duplicate_items():
    """Repeated features tie at distance 0, before the item itself for the later copies."""
    rng = np.random.default_rng(40)
    query, gallery = random_features(rng, 10, 12)
    query[3] = query[1]
    gallery[5] = gallery[0] = query[2]
    _check(feature_distances(query, gallery), k1=4, k2=3, lambda_value=0.3)


@pytest.mark.parametrize("seed", range(3))
def test_matches_literal_across_small_blocks(monkeypatch, seed):
    """Tiny blocks and term budgets exercise every chunk boundary (and the query/gallery split)."""
    monkeypatch.setattr(rerank, "_BLOCK_CELLS", [1, 37, 200][seed])
    monkeypatch.setattr(rerank, "_BLOCK_TERMS", [1, 50, 333][seed])
    rng = np.random.default_rng(50 + seed)
    query, gallery, _, _ = identity_features(rng, 23, 19, num_ids=5)
    _check(feature_distances(query, gallery), k1=6, k2=4, lambda_value=0.3)


def test_float32_features_match_literal_on_the_same_matrices():
    rng = np.random.default_rng(60)
    query, gallery, _, _ = identity_features(rng, 30, 25, num_ids=6)
    distances = feature_distances(query.astype(np.float32), gallery.astype(np.float32))
    assert all(matrix.dtype == np.float32 for matrix in distances)
    _check(distances, k1=8, k2=3, lambda_value=0.3)


# ----------------------------------------------------------------------------- behaviour
def test_lambda_one_returns_the_normalised_original_distance():
    rng = np.random.default_rng(70)
    q_g, q_q, g_g = feature_distances(*random_features(rng, 6, 9))
    squared = np.concatenate([q_q, q_g], axis=1).astype(np.float32) ** 2
    expected = (q_g.astype(np.float32) ** 2) / squared.max(axis=1, keepdims=True)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=3, k2=2, lambda_value=1.0), expected,
                               rtol=1e-6)


def test_re_ranking_brings_same_identity_closer_on_identity_clusters():
    """The point of re-ranking: with clustered features, true matches gain relative to impostors."""
    rng = np.random.default_rng(80)
    query, gallery, q_pids, g_pids = identity_features(rng, 120, 90, num_ids=15, noise=1.0)
    distances = feature_distances(query, gallery)
    same = q_pids[:, None] == g_pids[None, :]

    def margin(matrix):                                  # mean impostor minus mean match distance,
        matrix = matrix / matrix.std()                   # in units of the matrix's spread
        return matrix[~same].mean() - matrix[same].mean()

    assert margin(re_ranking(*distances, **RERANK_PRESETS["field"])) > margin(distances[0])


def test_presets():
    assert RERANK_PRESETS["field"] == {"k1": 20, "k2": 6, "lambda_value": 0.3}
    assert RERANK_PRESETS["tsme"] == {"k1": 31, "k2": 19, "lambda_value": 0.3}
    assert re_ranking.__defaults__ == tuple(RERANK_PRESETS["field"].values())


def test_feature_distances():
    rng = np.random.default_rng(90)
    query, gallery = random_features(rng, 7, 5)
    q_g, q_q, g_g = feature_distances(query, gallery)
    for matrix, a, b in ((q_g, query, gallery), (q_q, query, query), (g_g, gallery, gallery)):
        expected = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
        np.testing.assert_allclose(matrix, expected, atol=1e-7)
    assert (np.diag(q_q) == 0).all() and (np.diag(g_g) == 0).all()


# ----------------------------------------------------------------------------- errors
_GOOD = feature_distances(*random_features(np.random.default_rng(0), 4, 5))


@pytest.mark.parametrize("arguments, message", [
    ((np.zeros(3), _GOOD[1], _GOOD[2]), "q_g_dist must be a 2-D"),
    ((np.zeros((0, 5)), np.zeros((0, 0)), _GOOD[2]), "non-empty"),
    ((_GOOD[0], _GOOD[1][:3], _GOOD[2]), r"q_q_dist must have shape \(4, 4\)"),
    ((_GOOD[0], _GOOD[1], _GOOD[2][:, :4]), r"g_g_dist must have shape \(5, 5\)"),
    ((_GOOD[0].astype(str), _GOOD[1], _GOOD[2]), "real numbers"),
    ((np.where(np.eye(4, 5) > 0, np.nan, _GOOD[0]), _GOOD[1], _GOOD[2]), "q_g_dist holds non-finite"),
    ((np.zeros((4, 5)), np.zeros((4, 4)), np.zeros((5, 5))), "distance 0 from every item"),
])
def test_argument_errors(arguments, message):
    with pytest.raises(ValueError, match=message):
        re_ranking(*arguments)


@pytest.mark.parametrize("params, message", [
    ({"k1": 0}, "k1 must be a positive integer"),
    ({"k2": 2.5}, "k2 must be a positive integer"),
    ({"k1": True}, "k1 must be a positive integer"),
    ({"lambda_value": 1.5}, r"lambda_value must be a number in \[0, 1\]"),
    ({"lambda_value": "0.3"}, "lambda_value"),
])
def test_parameter_errors(params, message):
    with pytest.raises(ValueError, match=message):
        re_ranking(*_GOOD, **params)


@pytest.mark.parametrize("query, gallery, message", [
    (np.ones((3, 4)), _unit(np.ones((2, 4))), "query_features must be L2-normalised"),
    (_unit(np.ones((3, 4))), _unit(np.ones((2, 5))), "differ in size"),
    (np.ones(4), _unit(np.ones((2, 4))), "query_features must be a non-empty 2-D"),
    (_unit(np.ones((3, 4))), np.full((2, 4), np.nan), "gallery_features holds non-finite"),
])
def test_feature_errors(query, gallery, message):
    with pytest.raises(ValueError, match=message):
        feature_distances(query, gallery)
