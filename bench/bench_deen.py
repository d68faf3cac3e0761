"""DEEN train step: the official PNL product (through its [Nh/2, Nl/2] energy matrix) against ours (associated
through [C, C], no energy matrix), side by side in one run: step time, the step's peak memory, |diff|.

    python bench/bench_deen.py                     # resnet50 384x144, 2 ids x 2 images per modality
    python bench/bench_deen.py --quick             # resnet18 384x144 (the same MFA1 attention sizes), 1 step
    python bench/bench_deen.py --batch-size 6 --num-pos 4    # the official batch (48 images; needs the memory)

Each variant runs in a fresh process. Peak memory is the peak resident set during the timed steps minus the
resident set just before them (weights, gradients and momentum already allocated by a warm-up step), read
from /proc/self/status (VmHWM, reset through /proc/self/clear_refs); glibc hands blocks of 64 KB or more back
to the system on free (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors. On CUDA the
peak is torch.cuda.max_memory_allocated over the timed steps. Linux only. Random weights with the
zero-initialised MFA BatchNorms set non-zero (so the attention changes the outputs), the same in both
variants; DEE dropout off so that both compute the same thing.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import methods  # noqa: E402
import model as M  # noqa: E402
from bench_model import ALLOCATOR_ENV, reset_peak_resident, resident_kb  # noqa: E402   the IRL/AGW bench's reading

VARIANTS = ("official", "ours")
NUM_CLASSES = 395
MFA_BN_WEIGHT = re.compile(r"MFA\d\.(CNL|PNL)\.W\.1\.weight")


def child(args):
    """One variant in this process: warm-up step, then timed steps; prints JSON."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    deen = methods.get("deen")
    net = deen.build_model(NUM_CLASSES, args.arch, args.img_h, args.img_w).to(device).train()
    net.DEE.dropout.p = 0.0
    with torch.no_grad():
        for name, p in net.named_parameters():
            if MFA_BN_WEIGHT.fullmatch(name):
                p.normal_(0.0, 0.1)
    net.set_official_form(args.child == "official")
    criterion = deen.build_criterion(deen.defaults)
    optimizer = torch.optim.SGD(M.param_groups(net, 0.01), lr=0.01, momentum=0.9, nesterov=True)
    per_modality = args.batch_size * args.num_pos
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(per_modality, 3, args.img_h, args.img_w, generator=gen).to(device) for _ in range(2)]
    ids = torch.arange(args.batch_size).repeat_interleave(args.num_pos)
    labels = deen.train_labels(ids, ids).to(device)

    def step():
        optimizer.zero_grad(set_to_none=False)
        outputs = deen.forward_train(net, views)
        sum(criterion(outputs, labels).values()).backward()
        optimizer.step()
        return outputs[0].detach()

    first_pool = step().cpu()          # warm-up: allocates gradients and momentum; the outputs to compare
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_resident()          # VmHWM back to the current resident set
        base = resident_kb("VmRSS") * 1024
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else resident_kb("VmHWM") * 1024) - base
    torch.save(first_pool, args.out)
    print(json.dumps({"step_s": statistics.median(times), "peak_mb": peak / 2**20}))


def run_variant(variant, args, out):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--out", out, "--arch", args.arch,
           "--size", str(args.img_h), str(args.img_w), "--batch-size", str(args.batch_size),
           "--num-pos", str(args.num_pos), "--steps", str(args.steps), "--device", args.device]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ALLOCATOR_ENV})
    if result.returncode != 0:
        sys.exit(f"{variant} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--size", nargs=2, type=int, default=(384, 144), metavar=("H", "W"))
    parser.add_argument("--batch-size", type=int, default=2, help="identities per batch")
    parser.add_argument("--num-pos", type=int, default=2, help="images per identity and modality")
    parser.add_argument("--steps", type=int, default=2, help="timed train steps per variant")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="resnet18, one timed step")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.img_h, args.img_w = args.size
    if args.quick:
        args.arch, args.steps = "resnet18", 1
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        return child(args)
    import tempfile
    images = 2 * args.batch_size * args.num_pos
    print(f"DEEN {args.arch} {args.img_h}x{args.img_w}, train step of {images} images "
          f"({args.batch_size} ids x {args.num_pos} x 2 modalities, tripled by DEE), {args.device}, "
          f"{args.steps} timed step(s) per variant")
    with tempfile.TemporaryDirectory() as tmp:
        results, pools = {}, {}
        for variant in VARIANTS:
            out = os.path.join(tmp, f"{variant}.pt")
            results[variant] = run_variant(variant, args, out)
            pools[variant] = torch.load(out)
    official = results["official"]
    print(f"{'variant':<10} {'step s':>8} {'peak MB':>9} {'time ratio':>11} {'memory ratio':>13}  max |diff| pool")
    for variant, r in results.items():
        diff = "reference" if variant == "official" else f"{(pools[variant] - pools['official']).abs().max():.2e}"
        print(f"{variant:<10} {r['step_s']:8.2f} {r['peak_mb']:9.0f} {official['step_s'] / r['step_s']:10.2f}x "
              f"{official['peak_mb'] / r['peak_mb']:12.2f}x  {diff}")
    print("ratios are official / ours (higher = better for ours); peak MB: above the resident set before the step")


if __name__ == "__main__":
    main()
