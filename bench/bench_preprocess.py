"""Benchmark pre_process_sysu.py against the official script on a synthetic SYSU-MM01 tree.

    python bench/bench_preprocess.py [--size demo] [--train-ids 54] [--workers 0 1 2] [--rounds 5]
                                     [--img-h 384 --img-w 192]

Variants, each run in its own fresh subprocess so that its peak memory is its own:
  official   the literal transcription of the official pre_process_sysu.py (official_pre_process in
             tests/test_preprocess.py, the single copy of that oracle): a list of
             np.array(Image.open(p).resize((w, h), LANCZOS)), then np.save(np.array(list)) per modality;
  ours/N     pre_process_sysu.py --workers N (N = 0: decoding in the main process).
The variants run interleaved, in a rotated order, for --rounds rounds, so that the load of a shared machine
falls on all of them alike; the time ratio is the median over rounds of official wall / variant wall from
the same round. Prints one table: median and best wall time, median CPU time (main process + workers),
peak RSS of the main process and of the biggest worker, the ratios, and whether the four .npy files were
byte-identical to the official ones in every round. Exit status 1 if any run's files differ.
"""
import argparse
import functools
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import data_manager  # noqa: E402
import pre_process_sysu  # noqa: E402
from tools.make_synthetic import make_sysu  # noqa: E402

OFFICIAL = "official"


def child(args):
    """Run one variant in this (fresh) process and print its measurements as JSON."""
    if args.child == OFFICIAL:
        from test_preprocess import official_pre_process
        run = functools.partial(official_pre_process, args.data_path, os.path.join(args.out, ""),
                                args.img_h, args.img_w)
    else:
        run = functools.partial(pre_process_sysu.main, ["--data-path", args.data_path,
                                                        "--workers", str(args.workers[0]),
                                                        "--img-h", str(args.img_h), "--img-w", str(args.img_w)])
    # Imports are done above and not timed: both variants pay for numpy and Pillow alike.
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    code = run()
    wall = time.perf_counter() - start
    if code:
        sys.exit(code)
    print(json.dumps({"wall": wall, "cpu": cpu_seconds() - cpu_before, "rss_main_mb": peak_rss_kb() / 1024,
                      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def cpu_seconds():
    """User + system time of this process and of its finished children (the pool's workers)."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def peak_rss_kb():
    """VmHWM of this process. (ru_maxrss of RUSAGE_SELF would carry over the forking parent's peak across
    exec on Linux, i.e. the memory of the tree generator in the benchmark's parent process.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_variant(label, workers, data_path, out_dir, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", OFFICIAL if workers is None else "ours",
           "--data-path", data_path, "--out", out_dir, "--workers", str(workers or 0),
           "--img-h", str(args.img_h), "--img-w", str(args.img_w)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{label} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def take_outputs(folder, names):
    """sha256 of the four output files, which are then deleted: the next run creates its files afresh
    instead of overwriting these (on ext4 replacing a file with fresh data starts its write-back, a cost
    that would fall on whichever variant runs next), and their pages leave the page cache."""
    digests = {}
    for key, name in names.items():
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            digests[key] = hashlib.file_digest(f, "sha256").hexdigest()
        os.remove(path)
    return digests


def warm_page_cache(files):
    # The first variant to run would otherwise be the only one reading the JPEGs from disk.
    for path in files:
        with open(path, "rb") as f:
            f.read()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="demo", choices=["test", "demo"], help="synthetic tree preset")
    parser.add_argument("--train-ids", type=int, default=None, help="override the number of training ids")
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({0, 1, os.cpu_count() or 1}),
                        help="--workers values of pre_process_sysu.py to compare (default 0, 1 and the CPU count)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved runs of every variant")
    parser.add_argument("--img-h", type=int, default=384)
    parser.add_argument("--img-w", type=int, default=192)
    parser.add_argument("--child", choices=[OFFICIAL, "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    variants = {OFFICIAL: None, **{f"ours/{w}": w for w in args.workers}}
    runs = {label: [] for label in variants}
    identical = {label: True for label in variants if label != OFFICIAL}
    with tempfile.TemporaryDirectory() as tmp:
        overrides = {} if args.train_ids is None else {"train_ids": args.train_ids}
        data_path = make_sysu(os.path.join(tmp, "synthetic"), size=args.size, seed=0, **overrides)
        official_out = os.path.join(tmp, "official")
        os.makedirs(official_out)
        rgb_files, ir_files = data_manager.sysu_training_files(data_path)
        data_mb = (len(rgb_files) + len(ir_files)) * args.img_h * args.img_w * 3 / 2**20
        print(f"synthetic SYSU ({args.size}): {len(rgb_files)} RGB + {len(ir_files)} IR images -> "
              f"{args.img_h}x{args.img_w}, {data_mb:.0f} MB of pixels; {os.cpu_count()} CPU(s); "
              f"{args.rounds} interleaved rounds")
        warm_page_cache(rgb_files + ir_files)
        labels = list(variants)
        for round_ in range(args.rounds):
            # each variant takes every position in turn: no one always runs after the same neighbour
            order = labels[round_ % len(labels):] + labels[:round_ % len(labels)]
            digests = {}
            for label in order:
                out = official_out if label == OFFICIAL else data_path
                runs[label].append(run_variant(label, variants[label], data_path, out, args))
                # The official script writes the unsized names, ours names its files by size.
                names = (data_manager.SYSU_NPY_FILES if label == OFFICIAL
                         else data_manager.sysu_npy_files(args.img_h, args.img_w))
                digests[label] = take_outputs(out, names)
            for label in identical:
                identical[label] &= digests[label] == digests[OFFICIAL]

    official = runs[OFFICIAL]
    print(f"{'variant':<10} {'wall s':>7} {'best s':>7} {'CPU s':>6} {'peak RSS main MB':>17} "
          f"{'peak RSS worker MB':>19} {'time ratio':>11} {'memory ratio':>13}  identical")
    for label, results in runs.items():
        median = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
        time_ratio = statistics.median(o["wall"] / r["wall"] for o, r in zip(official, results))
        memory_ratio = statistics.median(o["rss_main_mb"] / r["rss_main_mb"] for o, r in zip(official, results))
        best = min(r["wall"] for r in results)
        print(f"{label:<10} {median('wall'):7.2f} {best:7.2f} {median('cpu'):6.2f} {median('rss_main_mb'):17.1f} "
              f"{median('rss_worker_mb'):19.1f} {time_ratio:10.2f}x {memory_ratio:12.2f}x  "
              f"{identical.get(label, 'reference')}")
    print("medians over rounds (best s: fastest round); ratios are official / variant within a round "
          "(higher = better for the variant)")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
