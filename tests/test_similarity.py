"""similarity.py: the fusions of named test features (standard modes, method fusions with cross-feature terms,
element-wise min/max), their transposition, the re-ranking embedding, all against literal per-cell loops."""
from types import SimpleNamespace

import numpy as np
import pytest

from eval_metrics import eval_sysu, evaluate_protocol
from similarity import STANDARD_FUSIONS, Fusion, embedding, negative_similarity, similarity


def unit_rows(rng, n, c=8):
    x = rng.standard_normal((n, c))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def features(rng, n, names=("pool", "bn")):
    return {name: unit_rows(rng, n) for name in names}


def literal_similarity(query, gallery, fusion):
    """Cell by cell: combine over the terms of weight * dot(query row, gallery row)."""
    combine = {"sum": sum, "min": min, "max": max}[fusion.combine]
    rows, columns = len(next(iter(query.values()))), len(next(iter(gallery.values())))
    return np.array([[combine(weight * float(np.dot(query[q][i], gallery[g][j])) for q, g, weight in fusion.terms)
                      for j in range(columns)] for i in range(rows)])


MIDDLE = ("pool", "bn", "pool_m", "bn_m")
FUSIONS = {**STANDARD_FUSIONS,
           "bn_om": Fusion((("bn", "bn_m", 1.0),)),
           "bn_sum4": Fusion((("bn", "bn", 1.0), ("bn", "bn_m", 1.0), ("bn_m", "bn", 1.0), ("bn_m", "bn_m", 1.0))),
           "bn_min": Fusion((("bn", "bn", 1.0), ("bn", "bn_m", 1.0), ("bn_m", "bn", 1.0), ("bn_m", "bn_m", 1.0)),
                            combine="min"),
           "bn_max": Fusion((("bn", "bn", 1.0), ("bn_m", "bn", 0.5)), combine="max")}


@pytest.mark.parametrize("name", list(FUSIONS))
def test_similarity_equals_the_literal_loop(name):
    rng = np.random.default_rng(0)
    query, gallery = features(rng, 5, MIDDLE), features(rng, 7, MIDDLE)
    ours = similarity(query, gallery, FUSIONS[name])
    assert ours.shape == (5, 7)
    np.testing.assert_allclose(ours, literal_similarity(query, gallery, FUSIONS[name]), atol=1e-12)
    np.testing.assert_allclose(negative_similarity(query, gallery, FUSIONS[name]), -ours)


def test_standard_modes_are_the_official_lines():
    rng = np.random.default_rng(1)
    query, gallery = features(rng, 4), features(rng, 6)
    s_pool, s_bn = query["pool"] @ gallery["pool"].T, query["bn"] @ gallery["bn"].T
    np.testing.assert_allclose(similarity(query, gallery, STANDARD_FUSIONS["pool"]), s_pool)
    np.testing.assert_allclose(similarity(query, gallery, STANDARD_FUSIONS["bn"]), s_bn)
    np.testing.assert_allclose(similarity(query, gallery, STANDARD_FUSIONS["sum"]), s_pool + s_bn)
    np.testing.assert_allclose(similarity(query, gallery, STANDARD_FUSIONS["weighted"]), 0.1 * s_pool + 0.9 * s_bn)


def test_a_fusion_reads_only_the_features_it_names():
    rng = np.random.default_rng(2)
    query, gallery = features(rng, 3, ("bn",)), features(rng, 5, ("bn_m",))
    np.testing.assert_allclose(similarity(query, gallery, FUSIONS["bn_om"]), query["bn"] @ gallery["bn_m"].T)
    assert FUSIONS["bn_min"].features("query") == ("bn", "bn_m")
    assert FUSIONS["bn_om"].features("gallery") == ("bn_m",)


@pytest.mark.parametrize("name", ["bn_om", "bn_min", "bn_max", "weighted"])
def test_transposed_fusion_ranks_the_query_set_for_each_gallery_row(name):
    rng = np.random.default_rng(3)
    query, gallery = features(rng, 4, MIDDLE), features(rng, 6, MIDDLE)
    np.testing.assert_allclose(similarity(gallery, query, FUSIONS[name].transposed()),
                               similarity(query, gallery, FUSIONS[name]).T, atol=1e-12)


@pytest.mark.parametrize("terms, combine, message", [
    ((), "sum", "at least one term"),
    ((("bn", "bn", 1.0),), "mean", "unknown combine"),
])
def test_bad_fusions_are_refused(terms, combine, message):
    with pytest.raises(ValueError, match=message):
        Fusion(terms, combine)


@pytest.mark.parametrize("query, gallery, name, message", [
    ({"bn": np.eye(2)}, {"bn": np.eye(2)}, "sum", r"needs query features \['pool'\]"),
    ({"pool": np.eye(2), "bn": np.eye(2)}, {"pool": np.eye(2)}, "weighted", "needs gallery"),
    ({"bn": np.eye(2)}, {"bn": np.eye(2)}, "bn_om", r"needs gallery features \['bn_m'\]"),
])
def test_missing_features_are_named(query, gallery, name, message):
    with pytest.raises(ValueError, match=message):
        similarity(query, gallery, FUSIONS[name])


@pytest.mark.parametrize("name", list(STANDARD_FUSIONS))
def test_embedding_cosine_is_the_similarity_scaled(name):
    rng = np.random.default_rng(4)
    query, gallery = features(rng, 7), features(rng, 9)
    fusion = STANDARD_FUSIONS[name]
    q, g = embedding(query, fusion), embedding(gallery, fusion)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-12)
    literal = literal_similarity(query, gallery, fusion)
    total = sum(weight for _, _, weight in fusion.terms)
    np.testing.assert_allclose(q @ g.T * total, literal, atol=1e-12)
    assert (np.argsort(-(q @ g.T), axis=1) == np.argsort(-literal, axis=1)).all()


@pytest.mark.parametrize("name", ["bn_om", "bn_sum4", "bn_min", "bn_max"])
def test_fusions_without_an_embedding_say_so(name):
    assert FUSIONS[name].embedding_weights() is None
    with pytest.raises(ValueError, match="no single feature per image"):
        embedding(features(np.random.default_rng(5), 2, MIDDLE), FUSIONS[name])


def test_evaluate_protocol_keeps_query_and_gallery_features_apart_when_transposed():
    """A cross-feature fusion names the query feature first; a transposed protocol (gallery rows) must still
    take the 'bn' of the query images and the 'bn_m' of the gallery images."""
    rng = np.random.default_rng(6)
    query, gallery = features(rng, 6, MIDDLE), features(rng, 8, MIDDLE)
    protocol = SimpleNamespace(name="hand", metric="sysu", query_pids=np.arange(6) % 4, query_cams=np.full(6, 3),
                               gallery_pids=np.arange(8) % 4, gallery_cams=np.full(8, 1),
                               trial_indices=[np.arange(8)], trials=[0], transpose=True)
    result = evaluate_protocol(query, gallery, protocol, modes=("bn_om",), fusions=FUSIONS)
    distances = -literal_similarity(query, gallery, FUSIONS["bn_om"]).T       # gallery rows rank the queries
    cmc, mAP, mINP = eval_sysu(distances, protocol.gallery_pids, protocol.query_pids, protocol.gallery_cams,
                               protocol.query_cams)
    assert result["mean"]["bn_om"]["mAP"] == pytest.approx(mAP)
    assert result["mean"]["bn_om"]["cmc"] == pytest.approx(list(cmc))
    with pytest.raises(ValueError, match="unknown similarity mode"):
        evaluate_protocol(query, gallery, protocol, modes=("bn_om",))
