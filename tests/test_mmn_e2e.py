"""MMN end to end: train.py --method mmn, then test.py on its checkpoint, on the synthetic SYSU, RegDB and LLCM
trees, with every one of the seven BN similarity rows printed and labelled."""
import json
import os

import pytest

import methods
from test_train import TINY, run_script, workspace

# MMN cuts the layer-4 map into 4 stripes: the tiny runs' 32x16 gives 2 rows there, 64x32 gives 4.
SIZE = ["--img_h", "64", "--img_w", "32"]


def train_and_test(ws, tmp_path, dataset):
    model_path = str(tmp_path / "runs")
    out = run_script("train.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--method", "mmn",
                                  "--model_path", model_path, "--log_path", str(tmp_path / "logs"), *TINY, *SIZE,
                                  "--epochs", "1"], cwd=ws.base).stdout
    (best,) = [f for f in os.listdir(model_path) if f.endswith("_best.pth")]
    results = tmp_path / "mmn.json"
    test_out = run_script("test.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--resume",
                                      os.path.join(model_path, best), "--device", "cpu", "--workers", "0",
                                      "--output", str(results)], cwd=ws.base).stdout
    with open(results) as f:
        return out, test_out, json.load(f)


# RegDB in the default suite (resized at load time); SYSU (its 64x32 cache made here) and LLCM behind `slow`.
@pytest.mark.parametrize("dataset", ["regdb", pytest.param("sysu", marks=pytest.mark.slow),
                                     pytest.param("llcm", marks=pytest.mark.slow)])
def test_mmn_trains_and_tests_with_its_seven_labelled_rows(tmp_path_factory, tmp_path, dataset):
    ws = workspace(tmp_path_factory)
    if dataset == "sysu":
        run_script("pre_process_sysu.py", ["--data-path", ws.data["sysu"], "--img-h", "64", "--img-w", "32",
                                           "--workers", "1"], cwd=ws.base)
    out, test_out, summary = train_and_test(ws, tmp_path, dataset)
    assert "(id " in out and ", OriTriplet " in out and ", DCL " in out
    mmn = methods.get("mmn")
    labels = mmn.mode_labels()
    assert f"{labels['bn']}: Rank-1" in out           # the epoch is selected by the o-o BN row
    rows = [line.split("  ")[0] for line in test_out.splitlines()]
    assert [labels[mode] for mode in mmn.modes(dataset)] == [row for row in rows if row in labels.values()]
    assert summary["model"]["method"] == "mmn" and summary["protocol"]["modes"] == list(mmn.modes(dataset))
    assert set(summary["mean"]) >= set(mmn.modes(dataset))
