"""Benchmark: rerank.re_ranking against the literal per-row form, time and peak memory.

    python bench/bench_rerank.py           # literal at 600 x 400, ours there and at the LLCM size
    python bench/bench_rerank.py --quick   # literal at 150 x 100, ours at 1,500 x 750

The features are real-shaped (tests/test_rerank.identity_features: a centre per identity, queries
infrared and gallery visible with an offset each), L2-normalised float32, 128-d; distances come from
rerank.feature_distances. The literal form (literal_re_ranking in tests/test_rerank.py, one item at a
time with Python sets and dense n x n arrays) runs only at the small size: at the LLCM size (7,000
queries x 3,500 gallery, n = 10,500 items) its dense arrays alone would need the memory printed in the
last column, and its loops hours. Times are the best of 3 calls at the small size, of 1 call at the
large one; peak = the most memory allocated at once during one more, traced, call (tracemalloc,
which numpy reports its buffers to), the float32 result included, the inputs not.
The script fails if ours and the literal form differ by more than 1e-6 anywhere.

The last rows time what `test.py --rerank` runs over gallery trials at the LLCM ir2vis size: 7,000 queries
against trials of 3,500 gallery images drawn from 7,000 candidates, in LLCM's four modes (sum, weighted, pool,
bn), from 2048-d float64 pool and bn features (sum and weighted concatenate them into 4096-d unit vectors),
feature distances included. Side by side, per trial and mode: from scratch (a new
evaluation.reranked_distance for every call, which recomputes the query x query distances every time, as
before they were reused) and with one reranked_distance over all trials (the query side's self-distances
computed once per mode). The script fails unless both give the same bits. Peak: the most memory allocated
at once during one more, traced, pass over the trials with one reusing distance (the remembered query sides
of all modes included, the features not); then the process's peak resident memory over the whole run.
"""
import argparse
import functools
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import numpy as np  # noqa: E402

from bench_metrics import peak_memory_mb  # noqa: E402
from evaluation import reranked_distance  # noqa: E402
from rerank import RERANK_PRESETS, feature_distances, re_ranking  # noqa: E402
from similarity import STANDARD_FUSIONS  # noqa: E402
from test_rerank import identity_features, literal_re_ranking  # noqa: E402

LITERAL_SIZE, LARGE_SIZE = (600, 400), (7000, 3500)
QUICK_LITERAL_SIZE, QUICK_LARGE_SIZE = (150, 100), (1500, 750)
NUM_IDS, FEATURE_DIM = 351, 128
NETWORK_FEATURE_DIM = 2048     # pool and bn features of the ResNet-50 networks
LLCM_MODES = ("sum", "weighted", "pool", "bn")
TRIAL_CANDIDATES, QUICK_TRIAL_CANDIDATES = 7000, 1500


def timed(fn, args, kwargs, repeats):
    """(result, best wall seconds over `repeats` calls), without tracing: tracemalloc slows the
    literal form's many small Python allocations far more than ours."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - start)
    return result, best


def literal_dense_gb(num_q, num_g, input_itemsize=4):
    """Memory of the literal form's dense arrays: the concatenated distances (input type), their
    float32 square, `original`, the int64 argsort, V and its query expansion (float32)."""
    num = num_q + num_g
    return num * num * (input_itemsize + 4 + 4 + 8 + 4 + 4) / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=3, help="gallery trials of the test.py --rerank rows")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    literal_size, large_size, candidates = LITERAL_SIZE, LARGE_SIZE, TRIAL_CANDIDATES
    if args.quick:
        literal_size, large_size, candidates = QUICK_LITERAL_SIZE, QUICK_LARGE_SIZE, QUICK_TRIAL_CANDIDATES
    print(f"numpy {np.__version__}; features {FEATURE_DIM}-d float32, {NUM_IDS} identities; "
          f"peak MB = memory allocated during one call (result included, inputs not)")
    header = (f"{'queries x gallery':>18}{'preset':>7}{'ours s':>8}{'ours MB':>9}{'literal s':>11}"
              f"{'literal MB':>12}{'speed-up':>10}{'max |diff|':>12}")
    print(header)
    print("-" * len(header))
    failures = []
    for size in (literal_size, large_size):
        query, gallery, _, _ = identity_features(rng, *size, num_ids=NUM_IDS, dim=FEATURE_DIM, noise=1.0)
        distances = feature_distances(query.astype(np.float32), gallery.astype(np.float32))
        for preset in ("field", "tsme"):
            params = RERANK_PRESETS[preset]
            small = size == literal_size
            ours, ours_s = timed(re_ranking, distances, params, repeats=3 if small else 1)
            line = f"{f'{size[0]} x {size[1]}':>18}{preset:>7}{ours_s:>8.2f}"
            line += f"{peak_memory_mb(functools.partial(re_ranking, **params), distances):>9.0f}"
            if small:
                literal, literal_s = timed(literal_re_ranking, distances, params, repeats=1)
                literal_mb = peak_memory_mb(functools.partial(literal_re_ranking, **params), distances)
                diff = float(np.abs(ours - literal).max())
                line += f"{literal_s:>11.2f}{literal_mb:>12.0f}{literal_s / ours_s:>9.0f}x{diff:>12.1e}"
                if not diff <= 1e-6:
                    failures.append(f"{preset} at {size}: ours and the literal form differ by {diff:.1e}")
            else:
                line += f"{'not run':>11}{f'~{literal_dense_gb(*size) * 1024:.0f}':>12}"
            print(line)
    failures += trials_side_by_side(rng, large_size[0], large_size[1], candidates, args.trials)
    for failure in failures:
        print(f"error: {failure}", file=sys.stderr)
    return 1 if failures else 0


def trials_side_by_side(rng, num_query, trial_size, num_candidates, num_trials):
    """Print the test.py --rerank rows (see the module doc); return the failures."""
    print(f"\ntest.py --rerank over {num_trials} gallery trials: {num_query} queries, {trial_size} of "
          f"{num_candidates} gallery candidates per trial, {NETWORK_FEATURE_DIM}-d float64 pool + bn features, "
          f"field preset")
    print(f"{'mode':>9}{'trial':>6}{'scratch s':>11}{'reusing s':>11}")
    query, candidates = {}, {}
    for key in ("pool", "bn"):
        query[key], candidates[key], _, _ = identity_features(rng, num_query, num_candidates, num_ids=NUM_IDS,
                                                              dim=NETWORK_FEATURE_DIM, noise=1.0)
    trials = [np.sort(rng.choice(num_candidates, trial_size, replace=False)) for _ in range(num_trials)]
    galleries = [{key: value[indices] for key, value in candidates.items()} for indices in trials]
    params = RERANK_PRESETS["field"]
    reusing = reranked_distance(**params)
    totals, failures = {"scratch": 0.0, "reusing": 0.0}, []
    for trial, gallery in enumerate(galleries, 1):
        for mode in LLCM_MODES:
            arguments = (query, gallery, STANDARD_FUSIONS[mode])
            scratch, scratch_s = timed(reranked_distance(**params), arguments, {}, repeats=1)
            reused, reusing_s = timed(reusing, arguments, {}, repeats=1)
            totals["scratch"] += scratch_s
            totals["reusing"] += reusing_s
            print(f"{mode:>9}{trial:>6}{scratch_s:>11.2f}{reusing_s:>11.2f}")
            if scratch.tobytes() != reused.tobytes():
                failures.append(f"{mode}, trial {trial}: the reusing distance differs from the one from scratch")
    print(f"{'all':>9}{'':>6}{totals['scratch']:>11.2f}{totals['reusing']:>11.2f}   "
          f"reusing takes {100 * totals['reusing'] / totals['scratch']:.0f}% of the time; "
          f"results {'differ' if failures else 'identical (bitwise)'}")

    def all_trials():
        distance = reranked_distance(**params)
        for gallery in galleries:
            for mode in LLCM_MODES:
                distance(query, gallery, STANDARD_FUSIONS[mode])
    print(f"peak over the trials with one reusing distance: {peak_memory_mb(all_trials, ()):.0f} MB allocated "
          f"at once; this process's peak resident memory: "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")
    return failures


if __name__ == "__main__":
    sys.exit(main())
