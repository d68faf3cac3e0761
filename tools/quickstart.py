"""The README's main job: a first run that needs no dataset, no GPU and no internet.

It runs, as separate commands (each printed before it runs, so they can be copied):
  1. tools/make_synthetic.py  a synthetic dataset in the exact SYSU-MM01 layout,
  2. pre_process_sysu.py      the training .npy files,
  3. train.py                 IRL, resnet18 at 128x64 on the CPU, from scratch,
  4. test.py                  the SYSU-MM01 all-search protocol (10 gallery trials),
and ends with the results table next to the chance level.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_step(title, args):
    """Run one command from the repository root; stop the whole job if it fails."""
    cmd = [sys.executable] + args
    print(f"\n== {title}\n$ {shlex.join(['python'] + args)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: step '{title}' failed with exit code {result.returncode}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="working folder (data, checkpoints, logs, results)")
    parser.add_argument("--epochs", type=int, default=7, help="training epochs")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = args.out
    data_path = os.path.join(out, "data", "SYSU-MM01")
    model_path = os.path.join(out, "runs")
    start = time.time()

    run_step("1/4 synthetic SYSU-MM01 dataset",
             ["tools/make_synthetic.py", "--out", os.path.join(out, "data"), "--datasets", "sysu",
              "--size", "demo", "--seed", str(args.seed)])
    run_step("2/4 preprocess the training set",
             ["pre_process_sysu.py", "--data-path", data_path, "--img-h", "128", "--img-w", "64"])
    # From scratch on a CPU: bf16 autocast, no warmup, the LR drops x0.1 for the last epoch.
    run_step("3/4 train IRL (resnet18, 128x64, CPU bf16, no ImageNet weights)",
             ["train.py", "--dataset", "sysu", "--data-path", data_path, "--method", "irl",
              "--arch", "resnet18", "--img_h", "128", "--img_w", "64", "--no-pretrained",
              "--device", "cpu", "--amp", "--epochs", str(args.epochs), "--warmup-epochs", "0",
              "--milestones", str(max(args.epochs - 1, 1)), "--eval-every", str(args.epochs),
              "--workers", "2", "--seed", str(args.seed),
              "--model_path", model_path, "--log_path", os.path.join(out, "logs")])
    checkpoint = os.path.join(model_path, f"sysu_irl_p4_n6_lr_0.1_seed_{args.seed}_last.pth")
    results = os.path.join(out, "results_sysu_all.json")
    run_step("4/4 SYSU-MM01 all-search protocol, 10 trials",
             ["test.py", "--dataset", "sysu", "--mode", "all", "--data-path", data_path,
              "--resume", checkpoint, "--device", "cpu", "--workers", "2", "--output", results])

    with open(results) as f:
        summary = json.load(f)
    num_gallery_ids = summary["protocol"]["num_gallery_ids"]
    print(f"\nChance level: Rank-1 = {100.0 / num_gallery_ids:.1f}% "
          f"({num_gallery_ids} gallery identities). Total time: {(time.time() - start) / 60:.1f} min.")
    print(f"Results JSON: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
