"""test.py's research options end to end on the synthetic trees and the tiny checkpoints of tests/test_train.py:
--rerank, --features (re-evaluating saved features reproduces the saving run exactly), --by-camera, and
cross-dataset evaluation."""
import json

import numpy as np
import pytest

import evaluation
from test_test_cli import CPU, run_main, test_script
from test_train import checkpoint, trained

THREE_TRIALS = ["--num-trials", "3"]


@pytest.fixture(scope="module", autouse=True)
def in_process_threads(single_thread):
    """test.py runs in this process here (saves an interpreter and a torch import per run): one thread, as the
    subprocess runs of tests/test_test_cli.py get through OMP_NUM_THREADS."""


def evaluate(ws, dataset, resume, *flags, output):
    """test.py on a checkpoint, in this process; its JSON."""
    assert test_script.main(["--dataset", dataset, "--data-path", ws.data[dataset], "--resume", resume, *CPU,
                             "--output", str(output), *flags]) == 0
    with open(output) as f:
        return json.load(f)


def reevaluate(ws, features, *flags, output):
    """test.py --features in this process (no model, no images: nothing worth a fresh interpreter)."""
    assert test_script.main(["--features", *features, *flags, "--output", str(output)]) == 0
    with open(output) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def sysu_saved(tmp_path_factory):
    """A SYSU all-search run with --by-camera that saved its features: (workspace, summary, npz path)."""
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    folder = tmp_path_factory.mktemp("sysu_saved")
    features = str(folder / "f.npz")
    summary = evaluate(ws, "sysu", checkpoint(tmp_path_factory, "sysu_irl"), *THREE_TRIALS, "--by-camera",
                       "--modes", "bn", "sum", "--save-features", features, output=folder / "run.json")
    return ws, summary, features


def test_saved_features_reproduce_the_run_exactly(sysu_saved, tmp_path):
    ws, run, features = sysu_saved
    again = reevaluate(ws, [features], "--by-camera", "--modes", "bn", "sum", output=tmp_path / "again.json")
    assert again["per_trial"] == run["per_trial"]                    # every per-trial number, bit for bit
    assert again["by_camera"] == run["by_camera"]
    assert again["protocol"] == run["protocol"] and again["checkpoints"] == run["checkpoints"]
    assert again["model"] == run["model"] and again["features"] == [features]
    npz = np.load(features)
    assert npz["query_bn"].dtype == np.float64 and str(npz["metric"]) == "sysu"
    assert json.loads(str(npz["options"]))["protocol_options"]["mode"] == "all"


def test_sysu_per_camera_table_names_the_low_light_cameras(sysu_saved):
    _, run, _ = sysu_saved
    cameras = run["by_camera"]
    assert cameras["low_light_cameras"] == [3, 6]
    for mode in ("bn", "sum"):
        gallery = cameras["summary"][mode]["gallery"]
        assert sorted(gallery["cameras"]) == ["1", "2", "4", "5"]
        query = cameras["summary"][mode]["query"]
        assert sorted(query["cameras"]) == ["3", "6"]
        # Cam-3 queries ignore the cam-2 gallery: its numbers rest on the cam-6 queries alone, in every trial.
        for trial in cameras["per_trial"][mode]:
            assert trial["gallery"]["2"] is not None
        rank1 = {cam: r["mean"]["Rank-1"] for cam, r in gallery["cameras"].items()}
        gap = gallery["gap"]["Rank-1"]
        assert gap["gap"] == pytest.approx(max(rank1.values()) - min(rank1.values()))
        assert rank1[str(gap["best"])] == max(rank1.values()) and rank1[str(gap["worst"])] == min(rank1.values())
        # A per-camera trial entry is the metric on that camera's gallery columns alone: Rank-1 within [0, 1].
        for trial in cameras["per_trial"][mode]:
            for result in trial["gallery"].values():
                assert 0 <= result["cmc"][0] <= 1 and 0 < result["mAP"] <= 1


def test_rerank_from_saved_features_is_labelled_and_moves_the_numbers(sysu_saved, tmp_path):
    ws, run, features = sysu_saved
    reranked = reevaluate(ws, [features], "--rerank", "--modes", "bn", "sum", output=tmp_path / "rr.json")
    assert reranked["protocol"]["name"] == "sysu-all-single-rerank"
    assert reranked["protocol"]["rerank"] == {"preset": "field", "k1": 20, "k2": 6, "lambda_value": 0.3}
    assert reranked["per_trial"]["bn"] != run["per_trial"]["bn"]
    # lambda 1 keeps only the original distance (2 - 2 cos, monotone in the similarity): the plain numbers.
    original = reevaluate(ws, [features], "--rerank", "20", "6", "1", "--modes", "bn", output=tmp_path / "o.json")
    for plain, kept in zip(run["per_trial"]["bn"], original["per_trial"]["bn"]):
        assert kept["mAP"] == pytest.approx(plain["mAP"], abs=1e-6)


@pytest.mark.parametrize("flags, name", [(["--rerank"], "sysu-all-single-rerank"),
                                         (["--rerank", "field"], "sysu-all-single-rerank"),
                                         (["--rerank", "tsme"], "sysu-all-single-rerank-tsme"),
                                         (["--rerank", "31", "19", "0.3"], "sysu-all-single-rerank-tsme"),
                                         (["--rerank", "10", "3", "0.5"], "sysu-all-single-rerank-10-3-0.5"),
                                         (["--flip", "--rerank"], "sysu-all-single-flip-rerank")])
def test_rerank_names(flags, name):
    args = test_script.build_parser().parse_args(["--resume", "x.pth", *flags])
    test_script.resolve_defaults(args)
    assert test_script.protocol_name(args) == name
    assert test_script.mode_labels(args, {"method": "irl"})["bn"].endswith("+ re-ranked")


def test_regdb_by_camera_says_one_camera_each_way(tmp_path_factory, tmp_path):
    ws, _, _ = trained(tmp_path_factory, "regdb_t1")
    summary = evaluate(ws, "regdb", checkpoint(tmp_path_factory, "regdb_t1"), "--by-camera", "--rerank",
                       output=tmp_path / "regdb.json")
    assert "one camera each way" in summary["by_camera"]["note"] and "summary" not in summary["by_camera"]
    assert summary["protocol"]["name"] == "regdb-v2t-rerank"


def test_llcm_per_camera_with_marked_cameras_and_features(tmp_path_factory, tmp_path):
    ws, _, _ = trained(tmp_path_factory, "llcm_irl")
    summary = evaluate(ws, "llcm", checkpoint(tmp_path_factory, "llcm_irl"), "--num-trials", "2", "--by-camera",
                       "--low-light-cams", "2", "5", "8", "--modes", "sum", "--save-features",
                       str(tmp_path / "llcm.npz"), output=tmp_path / "llcm.json")
    cameras = summary["by_camera"]
    assert cameras["low_light_cameras"] == [2, 5, 8]
    assert sorted(cameras["summary"]["sum"]["gallery"]["cameras"], key=int) == [str(c) for c in range(1, 10)]
    assert len(cameras["summary"]["sum"]["query"]["cameras"]) == 8      # NIR cam3 is not used
    again = reevaluate(ws, [str(tmp_path / "llcm.npz")], "--by-camera", "--low-light-cams", "2", "5", "8",
                       "--modes", "sum", output=tmp_path / "again.json")
    assert again["per_trial"] == summary["per_trial"] and again["by_camera"] == summary["by_camera"]
    # Without --low-light-cams every LLCM camera is marked: the dataset was filmed in low light as a whole.
    default = reevaluate(ws, [str(tmp_path / "llcm.npz")], "--by-camera", "--modes", "sum",
                         output=tmp_path / "default.json")
    assert default["by_camera"]["low_light_cameras"] == list(range(1, 10))
    assert default["by_camera"]["summary"] == summary["by_camera"]["summary"]


@pytest.mark.parametrize("dataset, flags", [("regdb", ["--trial", "1"]),
                                           pytest.param("llcm", ["--num-trials", "1"], marks=pytest.mark.slow)])
def test_cross_dataset_sysu_checkpoint(tmp_path_factory, tmp_path, dataset, flags):
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    summary = evaluate(ws, dataset, checkpoint(tmp_path_factory, "sysu_irl"), "--allow-cross-dataset", *flags,
                       output=tmp_path / "cross.json")
    assert summary["dataset"] == dataset and summary["model"]["num_classes"] == 15
    assert all(0 <= r["mAP"] <= 1 for r in summary["per_trial"][summary["protocol"]["modes"][0]])


@pytest.mark.parametrize("case", ["rerank words", "rerank range", "features missing", "features with resume",
                                  "features other images", "features without model", "no input", "unknown mode"])
def test_research_option_errors_are_one_line(sysu_saved, tmp_path, capsys, case):
    ws, _, features = sysu_saved
    argv, message = {
        "rerank words": (["--features", features, "--rerank", "fast"], "expected a preset"),
        "rerank range": (["--features", features, "--rerank", "20", "6", "2"], "lambda in [0, 1]"),
        "features missing": (["--features", str(tmp_path / "none.npz")], "features file not found"),
        "features with resume": (["--features", features, "--resume", "x.pth"], "--features replaces the model"),
        "features other images": (["--features", features, "--mode", "indoor"], "saved with mode all"),
        "features without model": (["--features", features, "--flip"], "holds features without flip"),
        "no input": (["--dataset", "sysu"], "--resume"),
        "unknown mode": (["--features", features, "--modes", "bn", "bn_om"], "--modes bn_om: irl reports pool, bn,"),
    }[case]
    code, err = run_main([*argv, *CPU], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


def test_features_file_names_its_features_and_files_without_names_hold_pool_and_bn(sysu_saved, tmp_path):
    _, _, features = sysu_saved
    protocol, query, gallery, _ = evaluation.load_features(features)
    with np.load(features) as npz:
        assert npz["feature_names"].tolist() == ["pool", "bn"]
        arrays = {key: npz[key] for key in npz.files if key != "feature_names"}
    np.savez(tmp_path / "unnamed.npz", **arrays)
    _, unnamed_query, unnamed_gallery, _ = evaluation.load_features(str(tmp_path / "unnamed.npz"))
    assert list(unnamed_query) == list(query) == ["pool", "bn"]
    assert all(np.array_equal(unnamed_gallery[name], gallery[name]) for name in gallery)


def test_old_features_file_without_metric_is_refused(sysu_saved, tmp_path):
    _, _, features = sysu_saved
    with np.load(features) as npz:
        arrays = {key: npz[key] for key in npz.files if key not in ("metric", "options")}
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(evaluation.FeaturesFileError, match="older test.py"):
        evaluation.load_features(str(tmp_path / "old.npz"))
