"""bench/bench_loader.py: its official pipeline replays ours bitwise (so both time the same work), and the
tiny run prints both tables; our faster ToTensor + Normalize against torchvision's."""
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


def test_our_to_tensor_and_in_place_normalisation_give_torchvisions_bits():
    import torchvision.transforms as T
    from PIL import Image
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (37, 19, 3), dtype=np.uint8)
    official = T.Compose([T.ToTensor(), T.Normalize(data_loader.IMAGENET_MEAN, data_loader.IMAGENET_STD)])
    ours = T.Compose(data_loader.to_normalized_tensor())
    for image in (Image.fromarray(rgb), rgb):                 # the fast path, and torchvision's for an array
        got = ours(image)
        assert torch.equal(got, official(image)) and got.is_contiguous()
    gray = Image.fromarray(rgb[..., 0])                        # another PIL mode: torchvision's path
    assert torch.equal(data_loader.ToTensor()(gray), T.ToTensor()(gray))
    dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        got = data_loader.ToTensor()(Image.fromarray(rgb))
        assert got.dtype == torch.float64 and torch.equal(got, T.ToTensor()(Image.fromarray(rgb)))
    finally:
        torch.set_default_dtype(dtype)
