"""DEEN end to end: train.py --method deen and test.py --method deen on the synthetic SYSU, RegDB and LLCM
trees."""
import json
import os

import pytest

from test_methods import train_tiny
from test_train import run_script, workspace


# SYSU in the default suite; RegDB (its layer-3 network variant) and LLCM behind `slow` (about 50 s each here).
@pytest.mark.parametrize("dataset", ["sysu", pytest.param("regdb", marks=pytest.mark.slow),
                                     pytest.param("llcm", marks=pytest.mark.slow)])
def test_deen_trains_and_tests_on_every_dataset(tmp_path_factory, tmp_path, dataset):
    ws = workspace(tmp_path_factory)
    out, model_path, _, best = train_tiny(ws, tmp_path, dataset, "deen")
    assert "(id " in out and ", OriTriplet " in out and ", CPM " in out and ", ORT " in out
    results = tmp_path / "deen.json"
    test_out = run_script("test.py", ["--dataset", dataset, "--data-path", ws.data[dataset], "--resume",
                                      os.path.join(model_path, best), "--device", "cpu", "--workers", "0", "--flip",
                                      "--output", str(results)], cwd=ws.base).stdout
    assert "S7 (sum of 6) + flip" in test_out and "S8 (0.1 pool + 0.9 bn) + flip" in test_out
    with open(results) as f:
        summary = json.load(f)
    assert summary["protocol"]["flip"] is True and summary["protocol"]["modes"][:2] == ["sum", "weighted"]
