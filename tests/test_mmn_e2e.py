"""MMN end to end: train.py --method mmn, then test.py on its checkpoint, on the synthetic SYSU, RegDB and LLCM
trees, with every one of the seven BN similarity rows printed and labelled."""
import json
import os

import pytest
import torch

import data_manager
import methods
from test_test_cli import CPU, test_script
from test_train import TINY, run_script, train_script, workspace

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
    assert summary["model"]["method"] == mmn.name and summary["protocol"]["modes"] == list(mmn.modes(dataset))
    assert set(summary["mean"]) >= set(mmn.modes(dataset))


def test_an_official_format_mmn_checkpoint_evaluates_through_test_py(tmp_path_factory, tmp_path, single_thread):
    """An official MMN file ({'net': the 998-key layout}, here without the unused ResNet parts and, as always,
    without the DCL head) gives test.py its class count from classifier1 and evaluates every row."""
    ws = workspace(tmp_path_factory)
    mmn = methods.get("mmn")
    net = mmn.build_model(data_manager.DATASETS["regdb"].official_num_classes, "resnet18", 64, 32)
    ours = net.state_dict()
    state = {key: value for key, value in ours.items() if key not in net.official_optional_keys()}
    for key in net.official_unused_keys():       # the full ResNets' unused parts, shaped as their used twins
        part = key.split(".", 2)[2]
        twin = ours.get(f"base_resnet.base.{part}", ours.get(f"thermal_module.thermal.{part}"))
        state[key] = torch.zeros_like(twin)
    torch.save({"net": state, "epoch": 3}, tmp_path / "regdb_mmn_official.t")
    output = tmp_path / "official.json"
    assert test_script.main(["--dataset", "regdb", "--data-path", ws.data["regdb"], "--method", "mmn", "--arch",
                             "resnet18", *SIZE, "--trial", "1", "--resume", str(tmp_path / "regdb_mmn_official.t"),
                             *CPU, "--output", str(output)]) == 0
    with open(output) as f:
        summary = json.load(f)
    assert summary["model"]["source"] == "official checkpoint" and summary["model"]["method"] == mmn.name
    assert list(summary["mean"]) == list(mmn.modes("regdb"))


def test_the_official_frozen_dcl_head_is_a_train_option_of_mmn_only(tmp_path, capsys):
    args = train_script.build_parser().parse_args(["--method", "mmn", "--dcl-head", "official"])
    config, sources = train_script.resolve_config(args)
    assert config["dcl_head"] == "official" and sources["dcl_head"] == "flag"
    net = methods.get("mmn").build_model(5, "resnet18", 64, 32, options=config)
    assert not any(p.requires_grad for p in net.criterion_div.parameters())
    default, _ = train_script.resolve_config(train_script.build_parser().parse_args(["--method", "mmn"]))
    assert default["dcl_head"] == "trained"
    code = train_script.main(["--method", "agw", "--dcl-head", "official", "--model_path", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: --dcl-head is an option of another method, not of agw\n"
