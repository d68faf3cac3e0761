"""IFALNet end to end: train.py --method ifalnet and test.py on the synthetic SYSU, RegDB and LLCM trees, every
similarity row printed under its label; RegDB both ways and LLCM with the official swapped computation. The
scripts run in-process (one thread), which saves two interpreter start-ups per run."""
import json
import os

import pytest

import methods
from test_methods import test_script
from test_train import TINY, one_thread, train_script, workspace  # noqa: F401 (one_thread: a fixture)


def run_test(ws, tmp_path, capsys, dataset, checkpoint, *flags):
    """(test.py stdout, its JSON summary) of the checkpoint, 2 gallery trials."""
    results = tmp_path / f"ifalnet{''.join(flags)}.json"
    assert test_script.main(["--dataset", dataset, "--data-path", ws.data[dataset], "--resume", checkpoint,
                             "--device", "cpu", "--workers", "0", "--num-trials", "2", *flags,
                             "--output", str(results)]) == 0
    with open(results) as f:
        return capsys.readouterr().out, json.load(f)


# SYSU in the default suite; RegDB and LLCM behind `slow`.
@pytest.mark.parametrize("dataset", ["sysu", pytest.param("regdb", marks=pytest.mark.slow),
                                     pytest.param("llcm", marks=pytest.mark.slow)])
def test_ifalnet_trains_and_tests_on_every_dataset(tmp_path_factory, tmp_path, capsys, one_thread, dataset):
    ws = workspace(tmp_path_factory)
    model_path = tmp_path / "runs"
    assert train_script.main(["--dataset", dataset, "--data-path", ws.data[dataset], "--method", "ifalnet",
                              "--model_path", str(model_path), "--log_path", str(tmp_path / "logs"), *TINY,
                              "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "(id " in out and ", OriTriplet " in out and ", TCA " in out
    assert "New best checkpoint (epoch 0, ALL (sum of 8) Rank-1" in out      # selected on ALL
    (best,) = [f for f in os.listdir(model_path) if f.endswith("_best.pth")]
    best = str(model_path / best)
    method = methods.get("ifalnet")
    labels = method.mode_labels()
    test_out, summary = run_test(ws, tmp_path, capsys, dataset, best)
    assert summary["model"]["method"] == method.name
    assert summary["protocol"]["modes"] == list(method.report_modes[dataset])
    # One table row per mode, under its label, in the report order.
    rows = [next(i for i, line in enumerate(test_out.splitlines()) if line.startswith(labels[mode] + "  "))
            for mode in method.report_modes[dataset]]
    assert rows == sorted(rows) and len(set(rows)) == len(rows)
    if dataset == "regdb":       # the official test's stuck --tvsearch computes V->T (our default); T->V works too
        _, reverse = run_test(ws, tmp_path, capsys, dataset, best, "--tvsearch")
        assert reverse["protocol"]["name"] != summary["protocol"]["name"]
    if dataset == "llcm":        # the official test's hard-coded [2, 1]: DEEN's transposed VIS->IR
        swapped_out, swapped = run_test(ws, tmp_path, capsys, dataset, best, "--direction", "vis2ir",
                                        "--deen-transposed", "--modes", "all", "all_llcm")
        assert swapped["protocol"]["modes"] == ["all", "all_llcm"]
        assert "ALL as the official LLCM test (4 pool(o,o) + BN sum)  " in swapped_out


def test_the_official_tca_divisor_is_a_train_option_of_ifalnet_only(tmp_path, capsys):
    config, sources = train_script.resolve_config(
        train_script.build_parser().parse_args(["--method", "ifalnet", "--tca-divisor", "official"]))
    assert config["tca_divisor"] == "official" and sources["tca_divisor"] == "flag"
    default, _ = train_script.resolve_config(train_script.build_parser().parse_args(["--method", "ifalnet"]))
    assert default["tca_divisor"] == "identities"
    code = train_script.main(["--method", "deen", "--tca-divisor", "official", "--model_path", str(tmp_path)])
    assert code == 2 and capsys.readouterr().err == "error: --tca-divisor is an option of another method, not of deen\n"
