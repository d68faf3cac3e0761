"""test.py on the checkpoints the tiny training runs of tests/test_train.py write (shared per session):
every dataset and direction, the JSON / NPZ outputs, official checkpoints and the error cases."""
import json
import os

import numpy as np
import pytest
import torch

import data_manager
import methods
import utils
from test_train import checkpoint, load_script, read_metrics, run_script, trained, workspace

test_script = load_script("test")
CPU = ["--device", "cpu", "--workers", "0"]


def evaluate(ws, dataset, resume, *flags, output=None, name=None):
    """Run test.py; read its JSON from `output`, or from the default place next to the checkpoint."""
    run_script("test.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--resume", resume, *CPU,
                           *(["--output", str(output)] if output else []), *flags], cwd=ws.base)
    if output is None:
        output = f"{os.path.splitext(resume)[0]}_{name}.json"
    with open(output) as f:
        return json.load(f)


def check_summary(summary, modes, trials):
    assert summary["protocol"]["modes"] == list(modes) and summary["protocol"]["trials"] == list(trials)
    for mode in modes:
        rows = summary["per_trial"][mode]
        assert [r["trial"] for r in rows] == list(trials)
        for key in ("mAP", "mINP"):
            values = [r[key] for r in rows]
            assert summary["mean"][mode][key] == pytest.approx(np.mean(values))
            assert summary["std"][mode][key] == pytest.approx(np.std(values))
            assert all(0 <= v <= 1 for v in values)
        for r in rows:      # the metrics stop at the gallery size; the summary pads to rank 20
            assert len(r["cmc"]) == min(20, summary["protocol"]["num_gallery"]) and np.all(np.diff(r["cmc"]) >= 0)
        assert len(summary["mean"][mode]["cmc"]) == 20
        assert summary["mean"][mode]["cmc"][0] == pytest.approx(np.mean([r["cmc"][0] for r in rows]))


def test_sysu_all_search_ten_trials_with_features(tmp_path_factory, tmp_path):
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    summary = evaluate(ws, "sysu", checkpoint(tmp_path_factory, "sysu_irl"), "--mode", "all",
                       "--save-features", str(tmp_path / "f.npz"), output=tmp_path / "all.json")
    check_summary(summary, ("bn", "pool"), range(10))
    assert summary["protocol"]["name"] == "sysu-all-single" and summary["model"]["arch"] == "resnet18"
    # Trial 0 is exactly what training evaluated (same features, gallery seed 0).
    (record,) = read_metrics(ws, "sysu_irl")
    for mode in ("bn", "pool"):
        assert summary["per_trial"][mode][0]["mAP"] == pytest.approx(record["eval"][mode]["mAP"], abs=1e-9)
    npz = np.load(tmp_path / "f.npz")
    assert str(npz["protocol"]) == "sysu-all-single" and npz["query_bn"].dtype == np.float64   # as evaluated
    assert npz["query_bn"].shape[0] == len(npz["query_pids"]) == summary["protocol"]["num_query"]
    assert np.allclose(np.linalg.norm(npz["gallery_pool"], axis=1), 1, atol=1e-5)
    assert npz["gallery_trial_indices"].shape == (10, summary["protocol"]["num_gallery"])
    assert int(npz["query_modal"]) == 2 and int(npz["gallery_modal"]) == 1
    assert list(npz["trials"]) == list(range(10))


def test_sysu_indoor_multi_shot(tmp_path_factory, tmp_path):
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    multi = evaluate(ws, "sysu", checkpoint(tmp_path_factory, "sysu_irl"), "--mode", "indoor", "--shots", "10",
                     "--num-trials", "2", output=tmp_path / "multi.json")
    check_summary(multi, ("bn", "pool"), range(2))
    assert multi["protocol"]["name"] == "sysu-indoor-multi10"
    single = data_manager.sysu_protocol(ws.data["sysu"], mode="indoor", trials=[0])
    assert multi["protocol"]["num_gallery"] > len(single.trial_indices[0])


def regdb_pattern(tmp_path_factory):
    trained(tmp_path_factory, "regdb_t1"), trained(tmp_path_factory, "regdb_t2")
    return checkpoint(tmp_path_factory, "regdb_t1").replace("trial_1_", "trial_{trial}_")


def test_regdb_every_split_with_its_own_checkpoint(tmp_path_factory, tmp_path):
    ws = workspace(tmp_path_factory)
    summary = evaluate(ws, "regdb", regdb_pattern(tmp_path_factory), "--num-trials", "2",
                       output=tmp_path / "v2t.json")
    check_summary(summary, ("bn", "pool"), [1, 2])
    assert summary["protocol"]["name"] == "regdb-v2t" and summary["protocol"]["tvsearch"] is False
    assert summary["checkpoints"]["2"].endswith("trial_2_best.pth")


def official_regdb_checkpoint(tmp_path):
    """An official-format file (no record of its split) holding only a classifier."""
    path = str(tmp_path / "regdb_official_best.t")
    torch.save({"net": {"classifier.weight": torch.zeros(206, 2048)}, "epoch": 1}, path)
    return path


def test_regdb_plain_checkpoint_evaluates_the_split_it_was_trained_on(tmp_path_factory, tmp_path):
    """`python test.py --dataset regdb --tvsearch True --resume path` works as written for our checkpoints."""
    ws = workspace(tmp_path_factory)
    regdb_pattern(tmp_path_factory)
    summary = evaluate(ws, "regdb", checkpoint(tmp_path_factory, "regdb_t2"), "--tvsearch", "True",
                       output=tmp_path / "t2v.json")
    check_summary(summary, ("bn", "pool"), [2])
    assert summary["protocol"]["tvsearch"] is True and list(summary["checkpoints"]) == ["2"]


def test_regdb_thermal_to_visible_accepts_true_and_the_bare_flag(tmp_path_factory, tmp_path):
    parser = test_script.build_parser()
    for flags, expected in ((["--tvsearch"], True), (["--tvsearch", "True"], True), (["--tvsearch", "false"], False),
                            ([], False)):
        assert parser.parse_args(["--resume", "x", *flags]).tvsearch is expected
    ws = workspace(tmp_path_factory)
    pattern = regdb_pattern(tmp_path_factory)
    t2v = evaluate(ws, "regdb", pattern, "--tvsearch", "True", "--trial", "1", output=tmp_path / "t2v.json")
    v2t = evaluate(ws, "regdb", checkpoint(tmp_path_factory, "regdb_t1"), "--trial", "1",
                   output=tmp_path / "v2t.json")
    check_summary(t2v, ("bn", "pool"), [1])
    assert t2v["protocol"]["name"] == "regdb-t2v" and t2v["protocol"]["tvsearch"] is True
    assert t2v["per_trial"]["bn"][0] != v2t["per_trial"]["bn"][0]        # the transposed ranking


@pytest.mark.parametrize("flags, name", [([], "llcm-ir2vis-single"), (["--direction", "vis2ir"], "llcm-vis2ir-single"),
                                         (["--direction", "vis2ir", "--deen-transposed"], "llcm-vis2ir-single-deen")])
def test_llcm_directions_report_sum_and_weighted(tmp_path_factory, tmp_path, flags, name):
    ws, _, _ = trained(tmp_path_factory, "llcm_irl")
    output = None if not flags else tmp_path / "llcm.json"     # default: next to the checkpoint
    summary = evaluate(ws, "llcm", checkpoint(tmp_path_factory, "llcm_irl"), "--num-trials", "3", *flags,
                       output=output, name=name)
    check_summary(summary, ("sum", "weighted", "pool", "bn"), range(3))
    assert summary["protocol"]["name"] == name


def official_checkpoint(tmp_path_factory, path):
    """Our SYSU weights in the official format: {'net', 'epoch', 'cmc', 'mAP', 'mINP'} with numpy values and
    the official-only (unused) entries."""
    ours = utils.load_torch_file(checkpoint(tmp_path_factory, "sysu_irl"))
    cfg = ours["config"]
    net = methods.get("irl").build_model(cfg["num_classes"], cfg["arch"], cfg["img_h"], cfg["img_w"])
    state = dict(ours["model"], **{k: torch.zeros(1) for k in net.official_unused_keys()})
    torch.save({"net": state, "epoch": 3, "cmc": np.zeros(20, np.float32), "mAP": np.float64(0.5),
                "mINP": np.float64(0.25)}, path)
    return path


def test_official_checkpoint_needs_the_right_class_count(tmp_path_factory, tmp_path, capsys):
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    path = official_checkpoint(tmp_path_factory, str(tmp_path / "sysu_IRL_p4_n6_lr_0.1_seed_0_best.t"))
    size = ["--arch", "resnet18", "--img_h", "32", "--img_w", "16", "--num-trials", "1"]
    code, err = run_main(["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", path, *CPU, *size], capsys)
    assert code == 2 and "has 15 classes but 395 were expected" in err
    summary = evaluate(ws, "sysu", path, *size, "--num-classes", "15", output=tmp_path / "official.json")
    assert summary["model"]["source"] == "official checkpoint"
    (record,) = read_metrics(ws, "sysu_irl")       # same weights: the training-time trial-0 numbers
    for mode in ("bn", "pool"):
        assert summary["per_trial"][mode][0]["mAP"] == pytest.approx(record["eval"][mode]["mAP"], abs=1e-9)


def text_file(folder):
    path = os.path.join(folder, "notes.pth")
    with open(path, "w") as f:
        f.write("epoch,rank1\n1,0.5\n")
    return path


def run_main(argv, capsys):
    code = test_script.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["missing checkpoint", "pattern without trial", "missing split", "wrong dataset",
                                  "wrong dataset without trial", "directory", "not a checkpoint",
                                  "missing dataset", "flag clash", "trial pattern off regdb", "tvsearch off regdb"])
def test_errors_are_one_line_with_exit_code_2(tmp_path_factory, tmp_path, capsys, case):
    ws = workspace(tmp_path_factory)
    sysu = lambda: checkpoint(tmp_path_factory, "sysu_irl")
    argv, message = {
        "missing checkpoint": (["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume",
                                str(tmp_path / "none.pth")], "checkpoint not found"),
        "pattern without trial": (["--dataset", "regdb", "--data-path", ws.data["regdb"], "--resume",
                                   official_regdb_checkpoint(tmp_path)], "containing {trial}"),
        "missing split": (["--dataset", "regdb", "--data-path", ws.data["regdb"], "--resume",
                           regdb_pattern(tmp_path_factory), "--num-trials", "3"], "split 3"),
        "wrong dataset": (["--dataset", "llcm", "--data-path", ws.data["llcm"], "--resume", sysu()],
                          "was trained on sysu, not llcm"),
        # A SYSU checkpoint given for RegDB without --trial: the mismatch, not the {trial}-pattern advice.
        "wrong dataset without trial": (["--dataset", "regdb", "--data-path", ws.data["regdb"], "--resume", sysu()],
                                        "was trained on sysu, not regdb"),
        "directory": (["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", str(tmp_path)],
                      "is a directory"),
        "not a checkpoint": (["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", text_file(tmp_path)],
                             "not a PyTorch checkpoint"),
        "missing dataset": (["--dataset", "sysu", "--data-path", str(tmp_path / "nowhere"), "--resume", sysu()],
                            "nowhere"),
        "flag clash": (["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", sysu(), "--img_h", "64"],
                       "--img_h 64 (checkpoint: 32)"),
        "trial pattern off regdb": (["--dataset", "sysu", "--resume", "a_{trial}.pth"], "for RegDB"),
        "tvsearch off regdb": (["--dataset", "sysu", "--resume", "a.pth", "--tvsearch"], "regdb only"),
    }[case]
    code, err = run_main([*argv, *CPU], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
