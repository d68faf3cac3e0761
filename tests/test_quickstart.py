"""The README's main job end to end (slow: several minutes on 2 cores; CI runs it as command 1)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_quickstart_learns_far_above_chance(tmp_path):
    subprocess.run([sys.executable, "tools/quickstart.py", "--out", str(tmp_path)], cwd=ROOT, check=True)
    with open(tmp_path / "results_sysu_all_agw.json") as f:
        summary = json.load(f)
    chance_rank1 = 1.0 / summary["protocol"]["num_gallery_ids"]
    bn = summary["mean"]["bn"]
    assert bn["cmc"][0] > 3 * chance_rank1, (bn["cmc"][0], chance_rank1)
    assert len(summary["per_trial"]["bn"]) == 10
