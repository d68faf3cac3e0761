"""Re-ranking over gallery trials reuses the query side's self-distances (rerank.ReusingFeatureDistances,
evaluation.reranked_distance) and gives exactly what computing everything afresh gives: the oracle is
rerank.feature_distances / re_ranking called anew for every trial and mode."""
from types import SimpleNamespace

import numpy as np
import pytest

import eval_metrics
import evaluation
import rerank
from similarity import STANDARD_FUSIONS, embedding
from test_rerank import identity_features, random_features

MODES = ("bn", "pool", "sum")
PARAMS = {"k1": 6, "k2": 3, "lambda_value": 0.3}


@pytest.fixture
def self_distance_sizes(monkeypatch):
    """The row count of every self-distance matrix rerank computes, in order."""
    sizes = []
    euclidean = rerank._euclidean

    def counting(a, b=None):
        if b is None:
            sizes.append(len(a))
        return euclidean(a, b)
    monkeypatch.setattr(rerank, "_euclidean", counting)
    return sizes


def _assert_same_bits(ours, reference):
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        assert mine.tobytes() == theirs.tobytes()


def test_reusing_feature_distances_equal_feature_distances_bit_for_bit(self_distance_sizes):
    rng = np.random.default_rng(0)
    query, first_gallery = random_features(rng, 11, 7)
    second_gallery = random_features(rng, 1, 9)[1]
    reusing = rerank.ReusingFeatureDistances()
    calls = [(query, first_gallery), (query, second_gallery), (query, second_gallery),
             (second_gallery, query), (first_gallery, query),              # the constant side as the gallery
             (query.astype(np.float32), first_gallery.astype(np.float32))]  # the same values in another type
    for query_features, gallery_features in calls:
        _assert_same_bits(reusing(query_features, gallery_features),
                          rerank.feature_distances(query_features, gallery_features))
    computed_by_reusing = len(self_distance_sizes) - 2 * len(calls)   # the oracle computes both, every call
    # Computed: both sides of calls 1, 4 and 6, the gallery of call 2 and the query of call 5 (its gallery
    # is call 4's). Reused: the query of call 2, both sides of call 3, the gallery of call 5.
    assert computed_by_reusing == 8


def test_features_changed_in_place_are_not_served_the_old_distances(self_distance_sizes):
    rng = np.random.default_rng(1)
    query, gallery = random_features(rng, 6, 5)
    query[0] = [0.0, 0.6, 0.8, 0, 0, 0, 0, 0]
    reusing = rerank.ReusingFeatureDistances()
    reusing(query, gallery)
    query[2] = query[3]                                   # same object, other values
    _assert_same_bits(reusing(query, gallery), rerank.feature_distances(query, gallery))
    query[0, 0] = -0.0                                    # equal to 0.0 under ==, other bits
    del self_distance_sizes[:]
    reusing(query, gallery)
    assert self_distance_sizes == [6]                     # the query's are computed again, the gallery's not
    reusing(query, gallery)
    assert self_distance_sizes == [6]                     # unchanged since: both reused


def test_remembered_distances_are_read_only():
    query, gallery = random_features(np.random.default_rng(2), 4, 3)
    _, query_self, gallery_self = rerank.ReusingFeatureDistances()(query, gallery)
    for matrix in (query_self, gallery_self):
        with pytest.raises(ValueError, match="read-only"):
            matrix[0, 0] = 1.0


def _protocol(rng, transpose, num_query=30, num_candidates=50, trial_size=35, num_trials=3):
    features = {}
    query_feats, gallery_feats = {}, {}
    for name in ("pool", "bn"):
        features[name] = identity_features(np.random.default_rng(3), num_query, num_candidates, num_ids=6, dim=8)
        query, gallery, _, _ = features[name]
        noisy = query + 0.05 * rng.standard_normal(query.shape)
        query_feats[name], gallery_feats[name] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True), gallery
    _, _, query_pids, gallery_pids = features["bn"]
    protocol = SimpleNamespace(
        name="trials", metric="sysu", query_pids=query_pids, query_cams=np.full(num_query, 3),
        gallery_pids=gallery_pids, gallery_cams=rng.choice([1, 2, 4, 5], num_candidates),
        trial_indices=[np.sort(rng.choice(num_candidates, trial_size, replace=False)) for _ in range(num_trials)],
        trials=list(range(num_trials)), transpose=transpose)
    return query_feats, gallery_feats, protocol


def fresh_reranked_distance(row_feats, column_feats, fusion):
    """The re-ranked distance with nothing kept between calls (what evaluation.reranked_distance computes)."""
    rows, columns = (embedding({key: np.asarray(value, dtype=np.float32) for key, value in feats.items()}, fusion)
                     for feats in (row_feats, column_feats))
    return rerank.re_ranking(*rerank.feature_distances(rows, columns), **PARAMS)


@pytest.mark.parametrize("transpose", [False, True])
def test_trials_reuse_the_query_side_once_per_fusion_and_match_fresh_distances(transpose, self_distance_sizes):
    rng = np.random.default_rng(4)
    query_feats, gallery_feats, protocol = _protocol(rng, transpose)
    expected = eval_metrics.evaluate_protocol(query_feats, gallery_feats, protocol, modes=MODES,
                                              distance=fresh_reranked_distance)
    del self_distance_sizes[:]
    result = eval_metrics.evaluate_protocol(query_feats, gallery_feats, protocol, modes=MODES,
                                            distance=evaluation.reranked_distance(**PARAMS))
    assert result == expected
    num_query, num_trials = len(protocol.query_pids), len(protocol.trials)
    assert self_distance_sizes.count(num_query) == len(MODES)                 # once per fusion
    assert self_distance_sizes.count(35) == len(MODES) * num_trials          # each trial's gallery


def test_one_reranked_distance_gives_each_fusion_and_feature_set_its_own_distances():
    rng = np.random.default_rng(5)
    query_feats, gallery_feats, protocol = _protocol(rng, False)
    gallery = {name: value[protocol.trial_indices[0]] for name, value in gallery_feats.items()}
    distance = evaluation.reranked_distance(**PARAMS)
    for mode in ("bn", "pool", "sum", "bn"):
        np.testing.assert_array_equal(distance(query_feats, gallery, STANDARD_FUSIONS[mode]),
                                      fresh_reranked_distance(query_feats, gallery, STANDARD_FUSIONS[mode]))
    other_query = {"bn": query_feats["pool"], "pool": query_feats["bn"]}      # other features, same fusion
    np.testing.assert_array_equal(distance(other_query, gallery, STANDARD_FUSIONS["bn"]),
                                  fresh_reranked_distance(other_query, gallery, STANDARD_FUSIONS["bn"]))
    query_feats["bn"][[0, 1]] = query_feats["bn"][[1, 0]]                    # changed in place
    np.testing.assert_array_equal(distance(query_feats, gallery, STANDARD_FUSIONS["bn"]),
                                  fresh_reranked_distance(query_feats, gallery, STANDARD_FUSIONS["bn"]))
