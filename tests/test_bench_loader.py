"""bench/bench_loader.py: its official pipeline replays ours bitwise (so both time the same work), and the
tiny run prints both tables."""
import os
import sys

import numpy as np
import torch

from conftest import ROOT
import data_loader
import methods
import utils

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_loader  # noqa: E402


def test_the_official_pipeline_draws_the_same_views_as_ours(tmp_path):
    labels = bench_loader.write_training_cache(str(tmp_path), 8, 32, 16)
    ours = utils.PlannedPairs(data_loader.SYSUData(str(tmp_path), methods.get("irl").train_views(32, 16),
                                                   img_h=32, img_w=16))
    official = bench_loader.OfficialSYSUData(str(tmp_path), 32, 16)
    official.cIndex, official.tIndex = np.arange(len(labels)), np.arange(len(labels))[::-1]
    for k in range(len(labels)):
        utils.set_seed(k)
        expected = official[k]
        utils.set_seed(k)
        got = ours[(int(official.cIndex[k]), int(official.tIndex[k]), 0)]
        assert all(torch.equal(a, b) for a, b in zip(expected[:4], got[:4]))
        assert (int(expected[4]), int(expected[5])) == (int(got[4]), int(got[5]))


def test_tiny_run_prints_the_rates_and_the_worker_table(capsys):
    threads = torch.get_num_threads()
    try:
        assert bench_loader.main(["--img-h", "32", "--img-w", "16", "--images", "8", "--items", "4", "--rounds", "1",
                                  "--gpu-ips", "1000"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("official ") for line in lines) and any(line.startswith("ours ") for line in lines)
    (row,) = [line.split() for line in lines if line.startswith("1000 ")]
    assert len(row) == 3 and all(int(n) >= 1 for n in row[1:])


def test_bad_sizes_are_a_one_line_error(capsys):
    assert bench_loader.main(["--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
