"""Benchmark: eval_metrics against a plain per-query loop that argsorts each row.

    python bench/bench_metrics.py              # SYSU (3,803 x 301) and LLCM-size (7,000 x 3,500)
    python bench/bench_metrics.py --quick      # smaller matrices, a few seconds
    python bench/bench_metrics.py --official   # also the official loop (about 30 s more at LLCM size)

Each size gets two distance matrices:
* trained: -cosine similarity of synthetic features (one centre per identity, an offset per modality,
  Gaussian noise; float32 as a network gives them, widened to float64 and L2-normalised as
  model.extract_features does), the float64 matrix test.py passes, with the noise set so that Rank-1 /
  mAP are near published models' (printed with the results);
* near chance: float64 N(0, 1) distances, same-identity pairs 1.5 closer on average (mAP below 0.25).
  True matches sit deep in every row, so most cells are within reach of one: the worst case for
  eval_metrics, which sorts each row by value (in float32) with the cells beyond the query's last
  true match flattened to one value, which the sort passes over quickly.

The baseline (plain_eval_* in tests/test_eval_metrics.py, checked there against the literal copy of
the official loop) ranks one query at a time with whole-row numpy operations; the official loop is
much slower still because it builds a Python list per query. All timings of a case are interleaved in
one run, so both sides see the same machine load. The script fails if any result differs from the
baseline's by more than 1e-12, or, with --require-speedup X, if any case is below X times (wall
time). On a machine shared with other jobs, the CPU-time ratio is the steadier one: a long
loop is more often descheduled than a short call, which inflates its wall time alone.
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
from test_eval_metrics import (literal_eval_llcm, literal_eval_sysu, plain_eval_llcm,  # noqa: E402
                               plain_eval_sysu)

SYSU = dict(functions=(eval_sysu, plain_eval_sysu, literal_eval_sysu), num_ids=96,
            q_cams=(3, 6), g_cams=(1, 2, 4, 5))
LLCM = dict(functions=(eval_llcm, plain_eval_llcm, literal_eval_llcm), num_ids=351,
            q_cams=range(1, 10), g_cams=range(1, 10))
# name, dataset, (num_query, num_gallery), matrix kind, feature noise of the trained kind
FULL_CASES = [
    ("SYSU trained", SYSU, (3803, 301), "trained", 1.5),
    ("SYSU near chance", SYSU, (3803, 301), "near chance", None),
    ("LLCM trained", LLCM, (7000, 3500), "trained", 1.2),
    ("LLCM near chance", LLCM, (7000, 3500), "near chance", None),
]
QUICK_CASES = [(name, dataset, (shape[0] // 4, shape[1] // (4 if dataset is LLCM else 1)), kind, noise)
               for name, dataset, shape, kind, noise in FULL_CASES]
FEATURE_DIM = 64
KINDS = {"trained": "-cosine similarity of synthetic unit features (float64, as test.py), Rank-1/mAP near "
                    "published models'",
         "near chance": "N(0, 1) distances, true matches 1.5 closer: matches deep in every row"}


def make_case(rng, dataset, shape, kind, noise):
    """(distmat, q_pids, g_pids, q_cams, g_cams) of one benchmark case."""
    num_q, num_g = shape
    num_ids = dataset["num_ids"]
    q_pids, g_pids = rng.integers(0, num_ids, num_q), rng.integers(0, num_ids, num_g)
    q_cams, g_cams = rng.choice(list(dataset["q_cams"]), num_q), rng.choice(list(dataset["g_cams"]), num_g)
    if kind == "near chance":
        distmat = rng.standard_normal(shape) - 1.5 * (q_pids[:, None] == g_pids[None, :])
    else:
        centres = rng.standard_normal((num_ids, FEATURE_DIM)).astype(np.float32)
        query, gallery = (_modality_features(rng, centres, pids, noise) for pids in (q_pids, g_pids))
        distmat = -(query @ gallery.T)
    return distmat, q_pids, g_pids, q_cams, g_cams


def _modality_features(rng, centres, pids, noise):
    """Float32 features (identity centre + one offset for the whole modality + noise), widened to float64 and
    made unit, as test.py evaluates them."""
    offset = 0.5 * rng.standard_normal(centres.shape[1]).astype(np.float32)
    features = (centres[pids] + offset + noise * rng.standard_normal((len(pids), centres.shape[1]),
                                                                     dtype=np.float32)).astype(np.float64)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def interleaved_best_times(functions, args, repeats):
    """Best wall and best CPU (process) time of each function over its number of repeats, run in
    turns; and the last results. On a shared machine the CPU time is less disturbed by other jobs."""
    best_wall = [float("inf")] * len(functions)
    best_cpu = [float("inf")] * len(functions)
    results = [None] * len(functions)
    for turn in range(max(repeats)):
        for index, fn in enumerate(functions):
            if turn < repeats[index]:
                wall, cpu = time.perf_counter(), time.process_time()
                results[index] = fn(*args)
                best_cpu[index] = min(best_cpu[index], time.process_time() - cpu)
                best_wall[index] = min(best_wall[index], time.perf_counter() - wall)
    return best_wall, best_cpu, results


def peak_memory_mb(fn, args):
    """Peak memory allocated during one call (numpy reports its buffers to tracemalloc)."""
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def compare(ours, reference):
    """(identical bit for bit, max |difference| over cmc, mAP, mINP)."""
    same_shape = ours[0].shape == reference[0].shape
    cmc_diff = float(np.max(np.abs(ours[0] - reference[0]))) if same_shape else float("inf")
    diff = max(cmc_diff, abs(ours[1] - reference[1]), abs(ours[2] - reference[2]))
    return same_shape and diff == 0.0, diff


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller matrices (a few seconds)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of ours (best is kept)")
    parser.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the plain loop")
    parser.add_argument("--official", action="store_true", help="also time the official loop once")
    parser.add_argument("--require-speedup", type=float, default=None, metavar="X",
                        help="fail if a case is less than X times faster than the plain loop (wall)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"numpy {np.__version__}; best of {args.repeats} runs (ours), {args.loop_repeats} (plain loop)"
          f"{', 1 (official loop)' if args.official else ''}; speed-up in wall time, (cpu) in process CPU "
          f"time; peak = memory allocated by one call of ours")
    header = (f"{'case':<18}{'shape':>10}{'dtype':>8}{'R1':>6}{'mAP':>6}{'mINP':>6}{'ours s':>9}"
              f"{'loop s':>8}{'speed-up':>9}{'(cpu)':>9}"
              + (f"{'official s':>11}{'speed-up':>9}" if args.official else "") + f"{'peak MB':>8}  result")
    print(header)
    print("-" * len(header))
    failures = []
    cases = QUICK_CASES if args.quick else FULL_CASES
    for name, dataset, shape, kind, noise in cases:
        case = make_case(rng, dataset, shape, kind, noise)
        ours_fn, plain_fn, official_fn = dataset["functions"]
        functions, repeats = [ours_fn, plain_fn], [args.repeats, args.loop_repeats]
        if args.official:
            functions.append(official_fn)
            repeats.append(1)
        times, cpu_times, results = interleaved_best_times(functions, case, repeats)
        peak_mb = peak_memory_mb(ours_fn, case)
        identical, diff = compare(results[0], results[1])
        if args.official:
            diff = max(diff, compare(results[0], results[2])[1])
            identical = identical and diff == 0.0
        verdict = "identical (bitwise)" if identical else f"max |diff| = {diff:.1e}"
        speedup, cpu_speedup = times[1] / times[0], cpu_times[1] / cpu_times[0]
        cmc, mAP, mINP = results[0]
        line = (f"{name:<18}{f'{shape[0]}x{shape[1]}':>10}{case[0].dtype.name:>8}{cmc[0]:>6.2f}{mAP:>6.2f}"
                f"{mINP:>6.2f}{times[0]:>9.4f}{times[1]:>8.3f}{speedup:>8.1f}x{cpu_speedup:>8.1f}x")
        if args.official:
            line += f"{times[2]:>11.2f}{times[2] / times[0]:>8.1f}x"
        print(f"{line}{peak_mb:>8.0f}  {verdict}")
        if diff > 1e-12:
            failures.append(f"{name}: results differ from the loop's by {diff:.1e}")
        if args.require_speedup and speedup < args.require_speedup:
            failures.append(f"{name}: {speedup:.1f}x is below the required {args.require_speedup:g}x")
    for kind in dict.fromkeys(case[3] for case in cases):
        print(f"{kind}: {KINDS[kind]}")
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
