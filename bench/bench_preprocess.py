"""Benchmark pre_process_sysu.py against the official naive loop on a synthetic SYSU-MM01 tree.

    python bench/bench_preprocess.py [--size demo] [--train-ids 54] [--workers 2] [--img-h 384 --img-w 192]

Each variant runs in its own fresh subprocess so that peak memory (VmHWM / maxrss) is its own:
  naive      the official script: list of np.array(Image.open(p).resize((w, h), LANCZOS)), then
             np.save(np.array(list))  -> holds every image twice at the end;
  ours/1     pre_process_sysu.py --workers 0 (decoding in-process, streamed into the memmap);
  ours/N     pre_process_sysu.py --workers N (parallel decoding processes).
Prints wall time, peak RSS of the main process and of the biggest worker, the ratios, and whether the four
.npy files are byte-identical to the naive ones.
"""
import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import data_manager  # noqa: E402
import pre_process_sysu  # noqa: E402
from tools.make_synthetic import make_sysu  # noqa: E402


def naive_preprocess(data_path, out_dir, img_h, img_w):
    """The official loop (listing and labels via data_manager, identical to the official ones)."""
    rgb_files, ir_files = data_manager.sysu_training_files(data_path)
    rgb_labels, ir_labels = data_manager.sysu_training_labels(rgb_files, ir_files)
    for modality, files, labels in (("rgb", rgb_files, rgb_labels), ("ir", ir_files, ir_labels)):
        images = []
        for path in files:
            images.append(np.array(Image.open(path).resize((img_w, img_h), Image.LANCZOS)))
        np.save(os.path.join(out_dir, f"train_{modality}_resized_img.npy"), np.array(images))
        np.save(os.path.join(out_dir, f"train_{modality}_resized_label.npy"), np.array(labels.tolist()))


def child(args):
    """Run one variant in this (fresh) process and print its measurements as JSON."""
    start = time.perf_counter()
    if args.child == "naive":
        naive_preprocess(args.data_path, args.out, args.img_h, args.img_w)
    else:
        code = pre_process_sysu.main(["--data-path", args.data_path, "--workers", str(args.workers),
                                      "--img-h", str(args.img_h), "--img-w", str(args.img_w)])
        if code != 0:
            sys.exit(code)
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "rss_main_mb": peak_rss_kb() / 1024,
                      "rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def peak_rss_kb():
    """VmHWM of this process. (ru_maxrss of RUSAGE_SELF would carry over the forking parent's peak across
    exec on Linux, i.e. the memory of the tree generator in the benchmark's parent process.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_variant(variant, data_path, out_dir, args, workers=0):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--data-path", data_path,
           "--out", out_dir, "--workers", str(workers), "--img-h", str(args.img_h), "--img-w", str(args.img_w)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in pre_process_sysu.OUTPUT_FILES.values()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="demo", choices=["test", "demo"], help="synthetic tree preset")
    parser.add_argument("--train-ids", type=int, default=None, help="override the number of training ids")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8))
    parser.add_argument("--img-h", type=int, default=384)
    parser.add_argument("--img-w", type=int, default=192)
    parser.add_argument("--child", choices=["naive", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--data-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {} if args.train_ids is None else {"train_ids": args.train_ids}
        data_path = make_sysu(os.path.join(tmp, "synthetic"), size=args.size, seed=0, **overrides)
        naive_out = os.path.join(tmp, "naive")
        os.makedirs(naive_out)
        rgb_files, ir_files = data_manager.sysu_training_files(data_path)
        data_mb = (len(rgb_files) + len(ir_files)) * args.img_h * args.img_w * 3 / 2**20
        print(f"synthetic SYSU ({args.size}): {len(rgb_files)} RGB + {len(ir_files)} IR images -> "
              f"{args.img_h}x{args.img_w}, {data_mb:.0f} MB of pixels; {os.cpu_count()} CPU(s)")

        results = {"naive": run_variant("naive", data_path, naive_out, args)}
        reference = digests(naive_out)
        identical = {}
        for label, workers in (("ours/1", 0), (f"ours/{args.workers}", args.workers)):
            results[label] = run_variant("ours", data_path, naive_out, args, workers)
            identical[label] = digests(data_path) == reference

    naive = results["naive"]
    print(f"{'variant':<10} {'wall s':>8} {'peak RSS main MB':>17} {'peak RSS worker MB':>19} "
          f"{'time ratio':>11} {'memory ratio':>13}  identical")
    for label, r in results.items():
        print(f"{label:<10} {r['wall']:8.2f} {r['rss_main_mb']:17.1f} {r['rss_worker_mb']:19.1f} "
              f"{naive['wall'] / r['wall']:10.2f}x {naive['rss_main_mb'] / r['rss_main_mb']:12.2f}x  "
              f"{identical.get(label, 'reference')}")
    print("ratios are naive / variant (higher = better for the variant)")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
