"""Per-camera metrics (eval_metrics.evaluate_by_camera), evaluate_protocol's distance and by_camera options,
and the per-camera summary
(evaluation.summarise_by_camera), on hand-made cases whose per-camera ranks are worked out below."""
from types import SimpleNamespace

import numpy as np
import pytest

import evaluation
from eval_metrics import eval_llcm, eval_sysu, evaluate_by_camera, evaluate_protocol
from similarity import STANDARD_FUSIONS, Fusion, negative_similarity

# Two SYSU queries (pid 1 from IR cam3, pid 2 from IR cam6) against six gallery images: one per
# (pid 1|2, camera 1|2|4).
Q_PIDS, Q_CAMS = np.array([1, 2]), np.array([3, 6])
G_PIDS, G_CAMS = np.array([1, 2, 1, 2, 1, 2]), np.array([1, 1, 2, 2, 4, 4])
DISTMAT = np.array([[0.5, 0.2, 0.7, 0.8, 0.1, 0.3],
                    [0.1, 0.4, 0.9, 0.3, 0.2, 0.6]])


def metrics(result):
    cmc, mAP, mINP = result
    return [float(v) for v in cmc], float(mAP), float(mINP)


def test_sysu_per_gallery_camera_by_hand():
    cams = evaluate_by_camera(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, "sysu")
    # cam1: q0 ranks pid 2 (0.2) before its match (0.5), q1 pid 1 (0.1) before its match (0.4): both second.
    assert metrics(cams["gallery"][1]) == ([0.0, 1.0], 0.5, 0.5)
    # cam2: the cam-3 query q0 ignores it; q1's match (0.3) is first.
    assert metrics(cams["gallery"][2]) == ([1.0, 1.0], 1.0, 1.0)
    # cam4: q0's match first (0.1), q1's second (0.6 after 0.2).
    assert metrics(cams["gallery"][4]) == ([0.5, 1.0], 0.75, 0.75)


def test_sysu_per_query_camera_by_hand():
    cams = evaluate_by_camera(DISTMAT, Q_PIDS, G_PIDS, Q_CAMS, G_CAMS, "sysu")
    # q0 (cam3, cam2 removed): kept ranking g4 (p1) .1, g1 .2, g5 .3, g0 (p1) .5 -> matches at 1 and 4.
    cmc, mAP, mINP = metrics(cams["query"][3])
    assert cmc[0] == 1.0 and mAP == pytest.approx((1 / 1 + 2 / 4) / 2) and mINP == pytest.approx(2 / 4)
    # q1 (cam6): g0 (p1) .1, g4 (p1) .2, g3 .3, g1 .4, g5 .6, g2 (p1) .9 -> matches at 3, 4, 5; one other
    # identity before the first, so the de-duplicated CMC hits at rank 2.
    cmc, mAP, mINP = metrics(cams["query"][6])
    assert cmc[:2] == [0.0, 1.0]
    assert mAP == pytest.approx((1 / 3 + 2 / 4 + 3 / 5) / 3) and mINP == pytest.approx(3 / 5)


def test_a_camera_without_valid_query_is_none_not_zero():
    only_cam3 = evaluate_by_camera(DISTMAT[:1], Q_PIDS[:1], G_PIDS, Q_CAMS[:1], G_CAMS, "sysu")
    assert only_cam3["gallery"][2] is None and only_cam3["gallery"][1] is not None


def test_llcm_rule_inside_a_camera():
    # Same pid and same camera is removed: the query from cam 1 only matches its cam-2 image.
    q_pids, q_cams = np.array([7]), np.array([1])
    g_pids, g_cams = np.array([7, 8, 7, 8]), np.array([1, 1, 2, 2])
    distmat = np.array([[0.1, 0.2, 0.4, 0.3]])
    cams = evaluate_by_camera(distmat, q_pids, g_pids, q_cams, g_cams, "llcm")
    assert cams["gallery"][1] is None                       # its only match there is removed
    assert metrics(cams["gallery"][2]) == ([0.0, 1.0], 0.5, 0.5)


def literal_by_camera(distmat, q_pids, g_pids, q_cams, g_cams, metric_fn):
    """One camera at a time with explicit index lists."""
    out = {"gallery": {}, "query": {}}
    for cam in sorted(set(g_cams.tolist())):
        columns = [j for j in range(len(g_pids)) if g_cams[j] == cam]
        sub = np.array([[distmat[i][j] for j in columns] for i in range(len(q_pids))])
        try:
            out["gallery"][cam] = metric_fn(sub, q_pids, g_pids[columns], q_cams, g_cams[columns])
        except ValueError:
            out["gallery"][cam] = None
    for cam in sorted(set(q_cams.tolist())):
        rows = [i for i in range(len(q_pids)) if q_cams[i] == cam]
        try:
            out["query"][cam] = metric_fn(distmat[rows], q_pids[rows], g_pids, q_cams[rows], g_cams)
        except ValueError:
            out["query"][cam] = None
    return out


@pytest.mark.parametrize("metric, metric_fn, q_cam_choices, g_cam_choices",
                         [("sysu", eval_sysu, (3, 6), (1, 2, 4, 5)), ("llcm", eval_llcm, (1, 2, 4), (1, 2, 3, 4))])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_cases_match_one_camera_at_a_time(metric, metric_fn, q_cam_choices, g_cam_choices, seed):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, 6, 30), rng.integers(0, 6, 40)
    q_cams, g_cams = rng.choice(q_cam_choices, 30), rng.choice(g_cam_choices, 40)
    distmat = rng.random((30, 40))
    ours = evaluate_by_camera(distmat, q_pids, g_pids, q_cams, g_cams, metric)
    expected = literal_by_camera(distmat, q_pids, g_pids, q_cams, g_cams, metric_fn)
    for side in ("gallery", "query"):
        assert sorted(ours[side]) == sorted(expected[side])
        for cam, result in expected[side].items():
            if result is None:
                assert ours[side][cam] is None
            else:
                assert metrics(ours[side][cam]) == metrics(result)


def unit_rows(rng, n, c):
    x = rng.standard_normal((n, c))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


PERMUTED = np.array([4, 5, 0, 1, 2, 3])


def protocol_of(transpose):
    """Trial 0: the gallery in order; trial 1: the same images in another order (the same ranks, no ties)."""
    return SimpleNamespace(name="hand", metric="sysu", query_pids=Q_PIDS, query_cams=Q_CAMS, gallery_pids=G_PIDS,
                           gallery_cams=G_CAMS, trial_indices=[np.arange(6), PERMUTED], trials=[0, 1],
                           transpose=transpose)


def test_evaluate_protocol_takes_a_distance_and_reports_every_trial_by_camera():
    rng = np.random.default_rng(5)
    query = {"pool": unit_rows(rng, 2, 4), "bn": unit_rows(rng, 2, 4)}
    gallery = {"pool": unit_rows(rng, 6, 4), "bn": unit_rows(rng, 6, 4)}
    columns_seen = []

    def hand_distance(rows, columns, fusion):
        """DISTMAT for the trial's gallery order, found by matching the trial's feature rows."""
        order = [int(np.flatnonzero((gallery["bn"] == row).all(axis=1))[0]) for row in columns["bn"]]
        columns_seen.append(order)
        return DISTMAT[:, order]

    result = evaluate_protocol(query, gallery, protocol_of(False), modes=("bn",), distance=hand_distance,
                               by_camera=True)
    assert columns_seen == [list(range(6)), PERMUTED.tolist()]
    first, second = result["by_camera"]["bn"]
    assert first["trial"] == 0 and second["trial"] == 1
    assert first["gallery"][2] == {"cmc": [1.0, 1.0], "mAP": 1.0, "mINP": 1.0}
    assert first["gallery"][4]["mAP"] == 0.75 and first["query"][6]["mINP"] == pytest.approx(3 / 5)
    assert first["gallery"] == second["gallery"] and first["query"] == second["query"]
    plain = evaluate_protocol(query, gallery, protocol_of(False), modes=("bn",))
    default = evaluate_protocol(query, gallery, protocol_of(False), modes=("bn",), distance=negative_similarity)
    assert plain == default and "by_camera" not in plain


def test_transposed_protocols_keep_their_sides_names():
    rng = np.random.default_rng(6)
    query = {"bn": unit_rows(rng, 2, 4)}
    gallery = {"bn": unit_rows(rng, 6, 4)}
    result = evaluate_protocol(query, gallery, protocol_of(True), modes=("bn",), by_camera=True)
    trial = result["by_camera"]["bn"][0]
    # Transposed, gallery rows rank the queries: the protocol's gallery cameras are still under "gallery".
    assert sorted(trial["gallery"]) == [1, 2, 4] and sorted(trial["query"]) == [3, 6]


def test_summary_over_trials_and_gap():
    by_camera = {"bn": [{"trial": 0, "gallery": {1: {"cmc": [0.5], "mAP": 0.6, "mINP": 0.4},
                                                 2: {"cmc": [1.0], "mAP": 0.9, "mINP": 0.8}}, "query": {3: None}},
                        {"trial": 1, "gallery": {1: {"cmc": [0.25], "mAP": 0.4, "mINP": 0.2}, 2: None},
                         "query": {3: {"cmc": [0.5], "mAP": 0.5, "mINP": 0.5}}}]}
    summary = evaluation.summarise_by_camera(by_camera)["bn"]
    cam1, cam2 = summary["gallery"]["cameras"][1], summary["gallery"]["cameras"][2]
    assert cam1["trials"] == [0, 1] and cam1["mean"]["Rank-1"] == pytest.approx(0.375)
    assert cam1["std"]["mAP"] == pytest.approx(0.1)
    assert cam2["trials"] == [0] and cam2["mean"]["mAP"] == pytest.approx(0.9)     # trial 1: no valid query
    assert summary["gallery"]["gap"]["Rank-1"] == {"best": 2, "worst": 1, "gap": pytest.approx(0.625)}
    assert summary["query"]["gap"]["mAP"] is None                                   # one camera: no gap
    table = evaluation.by_camera_table({"bn": summary}, ["bn"], "t", low_light=(2,))
    assert "cam2 (low-light)" in table and "62.50 (cam2-cam1)" in table and "cam3" not in table


def test_reranking_non_finite_features_is_a_one_line_config_error():
    import utils
    rng = np.random.default_rng(7)
    query = {"bn": unit_rows(rng, 3, 4)}
    gallery = {"bn": unit_rows(rng, 5, 4)}
    distance = evaluation.reranked_distance(k1=2, k2=1, lambda_value=0.3)
    assert distance(query, gallery, STANDARD_FUSIONS["bn"]).shape == (3, 5)
    query["bn"][1, 0] = np.nan
    with pytest.raises(utils.ConfigError, match="re-ranking needs finite features"):
        distance(query, gallery, STANDARD_FUSIONS["bn"])


def test_reranking_a_fusion_without_one_feature_per_image_is_a_one_line_config_error():
    import utils
    rng = np.random.default_rng(8)
    query, gallery = ({"bn": unit_rows(rng, n, 4), "bn_m": unit_rows(rng, n, 4)} for n in (3, 5))
    distance = evaluation.reranked_distance(k1=2, k2=1, lambda_value=0.3)
    for fusion in (Fusion((("bn", "bn_m", 1.0),)), Fusion((("bn", "bn", 1.0), ("bn_m", "bn_m", 1.0)), "max")):
        with pytest.raises(utils.ConfigError, match="this mode has none"):
            distance(query, gallery, fusion)
