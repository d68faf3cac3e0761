"""Benchmark: vectorised eval_metrics against the literal per-query loop of the official code.

    python bench/bench_metrics.py            # full SYSU (3,803 x 301) and LLCM-size (7,000 x 3,500)
    python bench/bench_metrics.py --quick    # smaller matrices, a few seconds

Both implementations run side by side on the same random distance matrices; the script prints
their times, the speed-up and whether the results are identical, and fails if they differ.
The literal loop is imported from tests/test_eval_metrics.py (single copy of the oracle).
"""
import argparse
import os
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

from eval_metrics import eval_llcm, eval_sysu  # noqa: E402
from test_eval_metrics import literal_eval_llcm, literal_eval_sysu  # noqa: E402

# name, metric pair, (num_query, num_gallery), number of ids, query cameras, gallery cameras
FULL_CASES = [
    ("SYSU all-search", (eval_sysu, literal_eval_sysu), (3803, 301), 96, [3, 6], [1, 2, 4, 5]),
    ("LLCM size", (eval_llcm, literal_eval_llcm), (7000, 3500), 351, range(1, 10), range(1, 10)),
]
QUICK_CASES = [
    ("SYSU (quick)", (eval_sysu, literal_eval_sysu), (1000, 301), 96, [3, 6], [1, 2, 4, 5]),
    ("LLCM (quick)", (eval_llcm, literal_eval_llcm), (1500, 700), 351, range(1, 10), range(1, 10)),
]


def make_case(rng, shape, num_ids, q_cam_values, g_cam_values):
    """Random distances where same-identity pairs are closer on average (realistic mAP)."""
    num_q, num_g = shape
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.choice(list(q_cam_values), num_q)
    g_cams = rng.choice(list(g_cam_values), num_g)
    distmat = rng.standard_normal(shape) - 1.5 * (q_pids[:, None] == g_pids[None, :])
    return distmat, q_pids, g_pids, q_cams, g_cams


def best_time(fn, args, repeats):
    """Best wall time of `repeats` calls and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, result


def peak_memory_mb(fn, args):
    """Peak memory allocated during one call (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def compare(ours, literal):
    """(identical bit for bit, max |difference| over cmc, mAP, mINP)."""
    same_cmc = ours[0].shape == literal[0].shape and np.array_equal(ours[0], literal[0])
    diff = max(float(np.max(np.abs(ours[0] - literal[0]))) if ours[0].shape == literal[0].shape
               else float("inf"), abs(ours[1] - literal[1]), abs(ours[2] - literal[2]))
    return same_cmc and diff == 0.0, diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small matrices (a few seconds)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"numpy {np.__version__}; ours = best of {args.repeats}, literal loop = 1 run; "
          f"peak = extra memory of one call of ours")
    header = (f"{'case':<18}{'shape':>13}{'ours [s]':>10}{'loop [s]':>10}{'speed-up':>10}"
              f"{'peak MB':>9}  result")
    print(header)
    print("-" * len(header))
    all_identical = True
    for name, (ours_fn, literal_fn), shape, num_ids, q_cams, g_cams in (
            QUICK_CASES if args.quick else FULL_CASES):
        case = make_case(rng, shape, num_ids, q_cams, g_cams)
        ours_time, ours = best_time(ours_fn, case, args.repeats)
        loop_time, literal = best_time(literal_fn, case, 1)
        peak_mb = peak_memory_mb(ours_fn, case)
        identical, diff = compare(ours, literal)
        all_identical &= diff <= 1e-12
        verdict = "identical (bitwise)" if identical else f"max |diff| = {diff:.1e}"
        print(f"{name:<18}{f'{shape[0]}x{shape[1]}':>13}{ours_time:>10.3f}{loop_time:>10.2f}"
              f"{loop_time / ours_time:>9.1f}x{peak_mb:>9.0f}  {verdict}; "
              f"R1 {ours[0][0]:.4f} mAP {ours[1]:.4f}")
    if not all_identical:
        print("error: vectorised and literal results differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
