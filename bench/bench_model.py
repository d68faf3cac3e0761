"""The IRL/AGW model, official execution mode against ours, side by side in one run: train-step time, the
step's peak memory, eval images/s, and how far our outputs are from the official mode's.

    python bench/bench_model.py                       # IRL resnet50 384x192, 16-image train step (4 per view)
    python bench/bench_model.py --quick               # resnet18 128x64: the same table in about a minute
    python bench/bench_model.py --method agw --arch resnet50 --size 288 144

Variants (model.py switches):
  official    the official computation: Non_local through its L x L matrix, layerATT attention written out as
              matrix products and softmax, LPA's quadrant loop; contiguous fp32, eager; evaluation under
              torch.no_grad at the official IRL test batch (4).
  ours        fused attention (Non_local associated through C' x C', scaled_dot_product_attention, LPA in
              place), channels-last, fp32; evaluation under torch.inference_mode at --eval-batch.
  ours+ckpt   ours with activation checkpointing (net.set_grad_checkpointing(True), train.py --grad-checkpoint).
  ours+bf16   ours under CPU bf16 autocast (--bf16): faster where the CPU has bf16 instructions, but its
              outputs are bf16-rounded, not within the fp32 goldens' tolerances.

Every variant runs in a fresh process (so that one's memory never counts against another), in interleaved
rounds; the table shows medians over the rounds. Peak memory is the process's peak resident set during the
timed train steps minus its resident set just before them (weights, gradients and momentum allocated
beforehand), read from /proc/self/status (VmHWM, reset through /proc/self/clear_refs); glibc
is told to hand every block of 64 KB or more back to the system on free (MALLOC_MMAP_THRESHOLD_) so that the
resident set follows the live tensors. Linux only. Random weights with every branch switched on (the
zero-initialised Non_local/NAF/delta gates set non-zero), the same in every variant; |diff| is the largest
absolute difference from the official mode's train pool/logits and eval features, checked against the
goldens' tolerances (tests/test_model.py: train pool 1e-3, logits 2e-3, eval features 1e-5). Evaluation
runs first, on the initial weights. There is no warm-up call (a full-size step takes minutes on a CPU): every
variant's first call pays the same one-off costs.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import methods  # noqa: E402
import model as M  # noqa: E402
from utils import format_table  # noqa: E402

VARIANTS = ("official", "ours", "ours+ckpt")
BF16_VARIANT = "ours+bf16"
OFFICIAL_EVAL_BATCH = 4                     # the official IRL test.py --test-batch
GOLDEN_TOLERANCES = {"train pool": 1e-3, "train logits": 2e-3, "eval features": 1e-5}
NUM_CLASSES = 395
ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def resident_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_resident():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build(args, variant):
    """The network of `variant` with random weights and every gate on, identical across variants."""
    torch.manual_seed(0)
    net = methods.get(args.method).build_model(NUM_CLASSES, args.arch, *args.size)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".W.1.weight") or name.split(".")[-1] in ("beta", "gamma", "delta"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    net.set_official_form(variant == "official")
    net.set_grad_checkpointing(variant == "ours+ckpt")
    if variant != "official":
        net.to(memory_format=torch.channels_last)
    return net


def images(n, size, seed, channels_last):
    x = torch.randn((n, 3) + tuple(size), generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def child(args, variant, out_path):
    """One variant in this (fresh) process: writes its timings, memory and outputs to out_path."""
    torch.set_num_threads(args.threads)
    method = methods.get(args.method)
    net = build(args, variant)
    channels_last = variant != "official"
    bf16 = variant == BF16_VARIANT
    n_views = len(method.view_modalities)
    views = [images(args.train_images // n_views, args.size, 10 + i, channels_last) for i in range(n_views)]
    labels = torch.arange(args.train_images) % NUM_CLASSES
    optimizer = torch.optim.SGD(M.param_groups(net, 0.1), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    outputs = {}

    def train_step():
        optimizer.zero_grad(set_to_none=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pool, logits = method.forward_train(net, views)
            loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return pool, logits

    # Evaluation first, so that every variant extracts features with the same (initial) weights.
    net.eval()
    batch = OFFICIAL_EVAL_BATCH if variant == "official" else args.eval_batch
    x = images(args.eval_images, args.size, 99, channels_last)

    def evaluate():
        features = []
        context = torch.no_grad() if variant == "official" else torch.inference_mode()
        with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for chunk in x.split(batch):
                features.append(net(*([chunk] * net.num_inputs), modal=1)[1].float())
        return torch.cat(features)

    start = time.perf_counter()
    outputs["eval features"] = evaluate()
    eval_seconds = time.perf_counter() - start
    net.train()
    # Gradients and momentum allocated before the measured steps (what SGD's first step would allocate:
    # a zero momentum buffer gives the same update), so that the peak above the steady state is the step's.
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    steady_kb = resident_kb("VmRSS")
    reset_peak_resident()
    seconds = []
    for _ in range(args.train_steps):
        start = time.perf_counter()
        pool, logits = train_step()
        seconds.append(time.perf_counter() - start)
        outputs.setdefault("train pool", pool.detach().float())
        outputs.setdefault("train logits", logits.detach().float())
        del pool, logits
    peak_kb = resident_kb("VmHWM")
    train_seconds = statistics.median(seconds)

    torch.save({"train step s": train_seconds, "peak MB": (peak_kb - steady_kb) / 1024,
                "eval img/s": args.eval_images / eval_seconds, "outputs": outputs}, out_path)


def run_variant(args, variant, folder, round_index):
    out_path = os.path.join(folder, f"{variant}_{round_index}.pt")
    command = [sys.executable, os.path.abspath(__file__), "--child", variant, "--child-out", out_path,
               "--method", args.method, "--arch", args.arch, "--size", *map(str, args.size),
               "--train-images", str(args.train_images), "--train-steps", str(args.train_steps),
               "--eval-images", str(args.eval_images), "--eval-batch", str(args.eval_batch),
               "--threads", str(args.threads)]
    subprocess.run(command, check=True, env={**os.environ, **ALLOCATOR_ENV})
    return torch.load(out_path, weights_only=True)


def largest_difference(outputs, reference):
    return {k: (outputs[k] - reference[k]).abs().max().item() for k in reference}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="resnet18 at 128x64, 1 round (about a minute)")
    parser.add_argument("--method", default="irl", choices=methods.names())
    parser.add_argument("--arch", default=None, help="backbone (default resnet50, quick resnet18)")
    parser.add_argument("--size", nargs=2, type=int, default=None, metavar=("H", "W"),
                        help="input size (default 384 192, quick 128 64)")
    parser.add_argument("--train-images", type=int, default=16, help="images per train step, all views together")
    parser.add_argument("--train-steps", type=int, default=1, help="timed train steps per round (median)")
    parser.add_argument("--eval-images", type=int, default=16, help="images per eval measurement")
    parser.add_argument("--eval-batch", type=int, default=16, help="our eval batch (the official mode uses 4)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--bf16", action="store_true", help="add the CPU bf16-autocast variant")
    parser.add_argument("--child", choices=VARIANTS + (BF16_VARIANT,), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.arch = args.arch or ("resnet18" if args.quick else "resnet50")
    args.size = tuple(args.size or ((128, 64) if args.quick else (384, 192)))
    args.rounds = args.rounds or (1 if args.quick else 3)
    n_views = len(methods.get(args.method).view_modalities)
    if args.train_images % n_views:
        parser.error(f"--train-images must be a multiple of {args.method}'s {n_views} views")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(args, args.child, args.child_out)
        return
    variants = VARIANTS + ((BF16_VARIANT,) if args.bf16 else ())
    runs = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for round_index in range(args.rounds):
            for variant in variants:
                runs[variant].append(run_variant(args, variant, folder, round_index))
                print(f"round {round_index + 1}/{args.rounds}: {variant} done", file=sys.stderr, flush=True)
    medians = {v: {k: statistics.median(r[k] for r in runs[v]) for k in ("train step s", "peak MB", "eval img/s")}
               for v in variants}
    official = medians["official"]
    rows = []
    for v in variants:
        diff = largest_difference(runs[v][0]["outputs"], runs["official"][0]["outputs"])
        within = [k for k, tol in GOLDEN_TOLERANCES.items() if diff[k] <= tol]
        rows.append({"variant": v, **medians[v],
                     "step speed-up": official["train step s"] / medians[v]["train step s"],
                     "memory ratio": medians[v]["peak MB"] / official["peak MB"],
                     "eval speed-up": medians[v]["eval img/s"] / official["eval img/s"],
                     **{f"|diff| {k}": f"{diff[k]:.1e}" for k in GOLDEN_TOLERANCES},
                     "within tol": "all" if len(within) == len(diff) else "/".join(within) or "none"})
    title = (f"{args.method} {args.arch} {args.size[0]}x{args.size[1]}, train step of {args.train_images} images, "
             f"eval of {args.eval_images} images (batch: official {OFFICIAL_EVAL_BATCH}, ours {args.eval_batch}), "
             f"{args.threads} threads, medians of {args.rounds} interleaved round(s)")
    print(format_table(rows, ["variant", "train step s", "step speed-up", "peak MB", "memory ratio", "eval img/s",
                              "eval speed-up"] + [f"|diff| {k}" for k in GOLDEN_TOLERANCES] + ["within tol"],
                       title=title))
    print(json.dumps({v: medians[v] for v in variants}))


if __name__ == "__main__":
    main()
