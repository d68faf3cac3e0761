"""Benchmark the IRL/AGW models: eval images/s and train-step seconds, channels-last vs contiguous.

    python bench/bench_model.py                 # resnet50 at 384x192 and resnet18 at 128x64, IRL and AGW
    python bench/bench_model.py --quick         # one timed iteration, small batches (about a minute on CPU)
    python bench/bench_model.py --device cuda --methods irl --threads 1

eval     = model.eval() + torch.inference_mode(), one modality (IRL averages its two stems), fp32.
train    = forward_views + cross-entropy + backward + SGD step (REFERENCE 8.2 groups), batch per view.
Random weights (no ImageNet file needed); timings exclude one warm-up iteration. On a CPU shared with
other jobs, fewer intra-op threads (--threads 1) are often much faster: OpenMP hand-offs stall.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import methods  # noqa: E402
import model as M  # noqa: E402
from utils import format_table  # noqa: E402

CONFIGS = (("resnet50", 384, 192), ("resnet18", 128, 64))


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters, device):
    """Seconds per call of fn, after one warm-up call."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def images(n, h, w, device, memory_format, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, h, w, generator=gen).to(device).contiguous(memory_format=memory_format)


def bench_one(method, arch, h, w, channels_last, args, device):
    torch.manual_seed(0)
    net = methods.get(method).build_model(395, arch, h, w).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=memory_format)

    x = images(args.eval_batch, h, w, device, memory_format, 0)
    net.eval()

    def eval_step():
        with torch.inference_mode():
            net(*([x] * net.num_inputs), modal=1)

    eval_seconds = timed(eval_step, args.iters, device)

    views = [images(args.train_batch, h, w, device, memory_format, 1 + i)
             for i in range(len(methods.get(method).view_modalities))]
    labels = torch.arange(args.train_batch * len(views), device=device) % 395
    optimizer = torch.optim.SGD(M.param_groups(net, 0.1), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    net.train()

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        _, logits = methods.get(method).forward_train(net, views)
        F.cross_entropy(logits, labels).backward()
        optimizer.step()

    train_seconds = timed(train_step, args.iters, device)
    return {"method": method, "arch": arch, "size": f"{h}x{w}",
            "memory": "channels_last" if channels_last else "contiguous",
            "eval img/s": args.eval_batch / eval_seconds,
            "train step s": train_seconds,
            "train img/s": args.train_batch * len(views) / train_seconds}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 timed iteration, eval batch 2, train batch 1/view")
    parser.add_argument("--methods", nargs="+", default=["irl", "agw"], choices=methods.names())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 3, quick 1)")
    parser.add_argument("--eval-batch", type=int, default=None, help="images per eval batch (default 8, quick 2)")
    parser.add_argument("--train-batch", type=int, default=None,
                        help="images per view and train step (default 2, quick 1)")
    args = parser.parse_args(argv)
    args.iters = args.iters or (1 if args.quick else 3)
    args.eval_batch = args.eval_batch or (2 if args.quick else 8)
    args.train_batch = args.train_batch or (1 if args.quick else 2)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for arch, h, w in CONFIGS:
        for method in args.methods:
            for channels_last in (False, True):
                rows.append(bench_one(method, arch, h, w, channels_last, args, device))
                print(f"done {method} {arch} {h}x{w} {rows[-1]['memory']}", file=sys.stderr, flush=True)
    title = (f"device {device}, {torch.get_num_threads()} threads, eval batch {args.eval_batch}, "
             f"train batch {args.train_batch}/view, {args.iters} timed iteration(s)")
    print(format_table(rows, ["method", "arch", "size", "memory", "eval img/s", "train step s", "train img/s"],
                       title=title))


if __name__ == "__main__":
    main()
