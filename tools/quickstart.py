"""The README's main job: a first run that needs no dataset, no GPU and no internet.

It runs, as separate commands (each printed before it runs, so they can be copied):
  1. tools/make_synthetic.py  a synthetic dataset in the exact SYSU-MM01 layout,
  2. pre_process_sysu.py      the training .npy files,
  3. train.py                 AGW (default) or IRL, resnet18, on the CPU, from scratch,
  4. test.py                  the SYSU-MM01 all-search protocol (10 gallery trials),
and ends with the results table next to the chance level.

Precision follows the CPU: bf16 autocast where the CPU computes bf16 natively (AVX-512 BF16 or AMX),
fp32 elsewhere, because emulated bf16 is many times slower than fp32. The default method is AGW, IRL's
baseline: from scratch it leaves chance within the 10-minute budget of a 2-core CPU without native bf16,
where IRL needs about three times the compute (`--method irl` runs IRL's version).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
import utils  # noqa: E402

# Per method: input size and epochs. Both train from scratch with BATCH identities x NUM_POS images per batch,
# lr 0.1 (the recipes'; backbone 0.01, the official 0.1x: at 1x, lr 0.1 and no warmup IRL collapsed to chance),
# no warmup, and the LR drops x0.1 for the last epoch.
SETTINGS = {"agw": dict(img_h=96, img_w=48, epochs=7), "irl": dict(img_h=128, img_w=64, epochs=7)}
BATCH, NUM_POS = 6, 4


def run_step(title, args):
    """Run one command from the repository root; stop the whole job if it fails."""
    cmd = [sys.executable] + args
    print(f"\n== {title}\n$ {shlex.join(['python'] + args)}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: step '{title}' failed with exit code {result.returncode}")


def precision():
    """(train.py flag, name, one line saying why) for this CPU."""
    native, reason = utils.cpu_bf16_support()
    if native:
        return "--amp", "bf16", f"precision: bf16 autocast, because {reason}"
    return "--no-amp", "fp32", f"precision: fp32, because {reason} (about 15x slower than fp32)"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="working folder (data, checkpoints, logs, results)")
    parser.add_argument("--method", choices=tuple(SETTINGS), default="agw", help="method to train (default agw)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 7)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = dict(SETTINGS[args.method], **({"epochs": args.epochs} if args.epochs else {}))
    img_h, img_w, epochs = settings["img_h"], settings["img_w"], settings["epochs"]
    out = args.out
    data_path = os.path.join(out, "data", "SYSU-MM01")
    model_path = os.path.join(out, "runs")
    workers = str(utils.default_workers(2))
    start = time.time()
    amp_flag, amp_name, amp_line = precision()
    print(amp_line, flush=True)

    run_step("1/4 synthetic SYSU-MM01 dataset",
             ["tools/make_synthetic.py", "--out", os.path.join(out, "data"), "--datasets", "sysu",
              "--size", "demo", "--seed", str(args.seed)])
    run_step("2/4 preprocess the training set",
             ["pre_process_sysu.py", "--data-path", data_path, "--img-h", str(img_h), "--img-w", str(img_w)])
    run_step(f"3/4 train {args.method.upper()} (resnet18, {img_h}x{img_w}, CPU {amp_name}, no ImageNet weights)",
             ["train.py", "--dataset", "sysu", "--data-path", data_path, "--method", args.method,
              "--arch", "resnet18", "--img_h", str(img_h), "--img_w", str(img_w), "--no-pretrained",
              "--device", "cpu", amp_flag, "--epochs", str(epochs), "--batch-size", str(BATCH), "--num_pos", str(NUM_POS),
              "--lr_scheduler", "step", "--warmup-epochs", "0", "--milestones", str(max(epochs - 1, 1)),
              "--eval-every", str(epochs), "--log-every", "10", "--workers", workers, "--seed", str(args.seed),
              "--model_path", model_path, "--log_path", os.path.join(out, "logs")])
    config, _ = train.resolve_config(train.build_parser().parse_args(
        ["--dataset", "sysu", "--method", args.method, "--batch-size", str(BATCH), "--num_pos", str(NUM_POS),
         "--seed", str(args.seed)]))
    checkpoint = os.path.join(model_path, f"{train.run_suffix(config)}_last.pth")   # the name train.py gives it
    results = os.path.join(out, f"results_sysu_all_{args.method}.json")
    run_step("4/4 SYSU-MM01 all-search protocol, 10 trials",
             ["test.py", "--dataset", "sysu", "--mode", "all", "--data-path", data_path,
              "--resume", checkpoint, "--device", "cpu", "--workers", workers, "--output", results])

    with open(results) as f:
        summary = json.load(f)
    num_gallery_ids = summary["protocol"]["num_gallery_ids"]
    print(f"\nChance level: Rank-1 = {100.0 / num_gallery_ids:.1f}% ({num_gallery_ids} gallery identities). "
          f"Method: {args.method.upper()}, precision: {amp_name}. Total time: {(time.time() - start) / 60:.1f} min.")
    print(f"Results JSON: {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
