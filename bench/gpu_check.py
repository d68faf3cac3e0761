"""The prepared device check: train.py's CUDA paths on a synthetic SYSU-MM01 tree, written to one JSON.

    python bench/gpu_check.py [--out gpu_check.json] [--tiny] [--workers 8]

On a CUDA machine (under 8 minutes on one GPU):
  1. speed: IRL ResNet-50 384x192 and AGW ResNet-50 288x144, fp16 AMP, one warm-up epoch then one timed epoch
     (a few dozen steps), contiguous vs channels-last vs channels-last + --compile: training images/s (view
     images, as train.py's progress lines count them), evaluation images/s, peak GPU memory;
  2. ddp: the same short run through torchrun (one node, NCCL, DDP) and as one plain process, on the same
     batches: their epoch losses must match;
  3. resume: a 2-epoch run killed once epoch 0 is saved and resumed, against an uninterrupted one: weights
     compared tensor by tensor (--deterministic);
  4. everything in one JSON (--out), and a table on stdout.
Without CUDA (or with --tiny) the same steps run tiny (ResNet-18, 32x16, the small synthetic tree, no
--compile), so that a CPU-only CI proves the script runs. Exit status 1 if a check fails.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import evaluation  # noqa: E402
import pre_process_sysu  # noqa: E402
import utils  # noqa: E402
from tools import make_synthetic  # noqa: E402

LAST_SUFFIX = "_last.pth"


def load_train_script():
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_script = load_train_script()


def settings(tiny, device):
    """{method: flags} of the speed runs and the common flags of every run. fp16 AMP on CUDA only: CPU bf16
    autocast is emulated on most CPUs and would time the emulation."""
    if tiny:
        size = ["--arch", "resnet18", "--img_h", "32", "--img_w", "16", "--no-pretrained", "--batch-size", "4",
                "--num_pos", "2", "--lr", "0.001"]
        return {"irl": size, "agw": size}, ["--device", device]
    return ({"irl": ["--img_h", "384", "--img_w", "192", "--amp"], "agw": ["--img_h", "288", "--img_w", "144", "--amp"]},
            ["--device", device, "--no-pretrained"])


def make_tree(base, tiny, sizes, workers):
    root = make_synthetic.make_sysu(os.path.join(base, "data"), size="test" if tiny else "demo")
    for img_h, img_w in sorted(sizes):
        code = pre_process_sysu.main(["--data-path", root, "--img-h", str(img_h), "--img-w", str(img_w),
                                      "--workers", str(workers)])
        if code:
            raise SystemExit(f"error: pre_process_sysu.py failed for {img_h}x{img_w}")
    return root


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def speed_run(root, base, method, flags, variant, common):
    """Train one warm-up and one timed epoch in this process; time one evaluation."""
    extra = {"contiguous": ["--no-channels-last"], "channels-last": ["--channels-last"],
             "channels-last + compile": ["--channels-last", "--compile"]}[variant]
    folder = os.path.join(base, "speed", f"{method}-{variant.replace(' ', '')}")
    args = train_script.build_parser().parse_args(
        ["--dataset", "sysu", "--data-path", root, "--method", method, *flags, *common, *extra,
         "--epochs", "2", "--log-every", "1000000", "--model_path", folder, "--log_path", folder])
    run, _ = train_script.setup_run(args)
    device = run.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_script.train_one_epoch(run, 0)                  # warm-up: cuDNN autotuning, compilation
    synchronize(device)
    start = time.perf_counter()
    stats = train_script.train_one_epoch(run, 1)
    synchronize(device)
    train_seconds = time.perf_counter() - start
    step_images = run.config["batch_size"] * run.config["num_pos"] * len(run.method.view_modalities)
    counted = []
    extract = evaluation.extract

    def counting_extract(net, paths, *rest, **kw):
        counted.append(len(paths))
        return extract(net, paths, *rest, **kw)

    evaluation.extract = counting_extract
    try:
        start = time.perf_counter()
        train_script.evaluate(run)
        synchronize(device)
        eval_seconds = time.perf_counter() - start
    finally:
        evaluation.extract = extract
    return {"method": method, "variant": variant, "steps": stats["batches"],
            "train_img_s": round(stats["batches"] * step_images / train_seconds, 1),
            "eval_img_s": round(sum(counted) / eval_seconds, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2 ** 20) if device.type == "cuda" else None,
            "compiled": hasattr(run.net, "_orig_mod")}


def script(args, cwd, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if torchrun else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([*launcher, os.path.join(ROOT, "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"train.py {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def short_run_args(root, base, folder, flags, common, epochs):
    out = os.path.join(base, folder)
    flags = [f for f in flags if f != "--amp"]          # fp32: the comparisons are of fp32 runs
    return ["--dataset", "sysu", "--data-path", root, "--method", "agw", *flags, *common, "--deterministic", "--epochs", str(epochs), "--eval-every", "100", "--model_path", out, "--log_path", out]


def metrics(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith("_metrics.jsonl")]
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def last_checkpoint(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith(LAST_SUFFIX)]
    return os.path.join(folder, name)


def ddp_check(root, base, flags, common):
    script(short_run_args(root, base, "ddp-single", flags, common, 1), base)
    script(short_run_args(root, base, "ddp-torchrun", flags, common, 1), base, torchrun=True)
    a, b = metrics(os.path.join(base, "ddp-single"))[0], metrics(os.path.join(base, "ddp-torchrun"))[0]
    relative = abs(a["loss"] - b["loss"]) / max(abs(a["loss"]), 1e-12)
    return {"single_loss": a["loss"], "torchrun_loss": b["loss"], "relative_difference": relative,
            "backend": "nccl" if "cuda" in common else "gloo", "ok": relative < 1e-4}


def resume_check(root, base, flags, common):
    script(short_run_args(root, base, "straight", flags, common, 2), base)
    args = short_run_args(root, base, "resumed", flags, common, 2)
    last = os.path.join(base, "resumed")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (os.path.isdir(last) and any(n.endswith(LAST_SUFFIX) for n in os.listdir(last))):
            time.sleep(0.02)
        proc.kill()
    finally:
        proc.wait()
    killed_after = utils.load_torch_file(last_checkpoint(last))["epoch"]
    script(["--resume", last_checkpoint(last)], base)
    straight = utils.load_torch_file(last_checkpoint(os.path.join(base, "straight")))["model"]
    resumed = utils.load_torch_file(last_checkpoint(last))["model"]
    differ = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    worst = max((float((straight[k].double() - resumed[k].double()).abs().max()) for k in differ), default=0.0)
    return {"killed_after_epoch": killed_after, "tensors": len(straight), "tensors_differing": len(differ),
            "max_abs_difference": worst, "ok": not differ}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check.json")
    p.add_argument("--tiny", action="store_true", help="the tiny CPU version (automatic without CUDA)")
    p.add_argument("--workers", type=int, default=utils.default_workers(8), help="loader and preprocessing workers")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    tiny = args.tiny or not cuda
    device = "cuda" if cuda else "cpu"
    speed_flags, common = settings(tiny, device)
    common = [*common, "--workers", str(args.workers)]
    variants = ["contiguous", "channels-last"] + ([] if tiny else ["channels-last + compile"])
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "tiny": tiny, "torch": torch.__version__}
    started = time.time()
    with tempfile.TemporaryDirectory() as base:
        sizes = {(int(f[f.index("--img_h") + 1]), int(f[f.index("--img_w") + 1])) for f in speed_flags.values()}
        root = make_tree(base, tiny, sizes, args.workers)
        report["speed"] = [speed_run(root, base, method, flags, variant, common)
                           for method, flags in speed_flags.items() for variant in variants]
        report["ddp"] = ddp_check(root, base, speed_flags["agw"], common)
        report["resume"] = resume_check(root, base, speed_flags["agw"], common)
    report["seconds"] = round(time.time() - started, 1)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(utils.format_table(report["speed"], ["method", "variant", "steps", "train_img_s", "eval_img_s",
                                               "peak_gpu_mib", "compiled"],
                             title=f"Speed on {report['device']} ({'tiny, fp32' if tiny else 'full size, fp16 AMP'})"))
    print(f"DDP ({report['ddp']['backend']}, torchrun, 1 process) vs one process, same batches: loss "
          f"{report['ddp']['torchrun_loss']:.6f} vs {report['ddp']['single_loss']:.6f} "
          f"(relative difference {report['ddp']['relative_difference']:.2e}): {'ok' if report['ddp']['ok'] else 'FAILED'}")
    r = report["resume"]
    print(f"Killed after epoch {r['killed_after_epoch']} and resumed: {r['tensors_differing']} of {r['tensors']} "
          f"tensors differ (max {r['max_abs_difference']:.3g}): {'ok' if r['ok'] else 'FAILED'}")
    print(f"{report['seconds']} s; JSON: {args.out}")
    return 0 if report["ddp"]["ok"] and r["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
