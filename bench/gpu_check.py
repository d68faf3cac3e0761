"""The prepared device check: train.py's CUDA paths on a synthetic SYSU-MM01 tree, written to one JSON.

    python bench/gpu_check.py [--out gpu_check.json] [--tiny] [--workers 8]

On a CUDA machine (under 8 minutes on one GPU):
  1. speed: IRL ResNet-50 384x192 and AGW ResNet-50 288x144, fp16 AMP, 10 warm-up steps then 30 timed steps,
     contiguous vs channels-last vs channels-last + --compile: training images/s (view images, as train.py's
     progress lines count them), evaluation images/s, peak GPU memory allocated by the run (above what was
     allocated before it);
  2. ddp: a one-node torchrun job (NCCL, DDP) of one process against an uninterrupted 2-epoch run in one plain
     process on the same batches (their epoch losses must match; the weights' distance is reported), and, with
     two GPUs or more, a two-process job whose ranks must end with identical parameters;
  3. resume: the same 2-epoch run killed (SIGKILL) one step into epoch 1 and resumed from its epoch-0
     checkpoint, against the uninterrupted run: weights compared tensor by tensor (--deterministic);
  4. everything in one JSON (--out), written again after every check (a run stopped by a time limit keeps what
     it measured), and a table on stdout. A check that raises is recorded with its error and the others run.
Without CUDA (or with --tiny) the same steps run tiny, fp32 and without --compile, so that a CPU-only CI proves
the script runs: ResNet-18 at 32x16 on an 8-identity tree, 1 warm-up and 2 timed steps, gloo DDP with one and
with two processes. There the ranks and the killed run are forked from this process, with the environment
torchrun gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...), instead of started by torchrun: a new
interpreter costs about 4.5 CPU-seconds of imports, which would be most of the tiny run. Exit status 1 if a
check fails.
"""
import argparse
import gc
import itertools
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pre_process_sysu  # noqa: E402
import utils  # noqa: E402
from tools import make_synthetic  # noqa: E402

LAST_SUFFIX = "_last.pth"
# The tiny tree: 6 training + 2 validation identities with one image per camera folder, so that an epoch of
# 4 identities x 2 images is 3 steps; 4 test identities.
TINY_TREE = dict(train_ids=6, val_ids=2, test_ids=4, images=(1, 1))
# (warm-up steps, timed steps) of a speed run.
SPEED_STEPS = {True: (1, 2), False: (10, 30)}
RANK_WORKER = "--rank-worker"


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
    root = make_synthetic.make_sysu(os.path.join(base, "data"), **(dict(size="test", **TINY_TREE) if tiny else
                                                                   dict(size="demo")))
    for img_h, img_w in sorted(sizes):
        code = pre_process_sysu.main(["--data-path", root, "--img-h", str(img_h), "--img-w", str(img_w),
                                      "--workers", str(workers)])
        if code:
            raise SystemExit(f"error: pre_process_sysu.py failed for {img_h}x{img_w}")
    return root


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FirstSteps:
    """The run's loader cut to its first `steps` batches of each epoch (the epoch's plan is drawn in full)."""

    def __init__(self, loader, steps):
        self.loader, self.sampler, self.steps = loader, loader.sampler, steps

    def __len__(self):
        return min(self.steps, len(self.loader))

    def __iter__(self):
        return itertools.islice(iter(self.loader), len(self))


def speed_run(root, base, method, flags, variant, common, steps):
    """Train the warm-up steps and then the timed steps in this process; time one evaluation."""
    extra = {"contiguous": ["--no-channels-last"], "channels-last": ["--channels-last"],
             "channels-last + compile": ["--channels-last", "--compile"]}[variant]
    folder = os.path.join(base, "speed", f"{method}-{variant.replace(' ', '')}")
    args = train_script.build_parser().parse_args(
        ["--dataset", "sysu", "--data-path", root, "--method", method, *flags, *common, *extra,
         "--epochs", "2", "--log-every", "1000000", "--model_path", folder, "--log_path", folder])
    gc.collect()            # the previous speed run's network and optimizer, before this run's memory is counted
    cuda = common[common.index("--device") + 1] == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    run, _ = train_script.setup_run(args)
    device = run.device
    warm_up, timed = steps
    loader = run.loader
    run.loader = FirstSteps(loader, warm_up)
    train_script.train_one_epoch(run, 0)                  # warm-up: cuDNN autotuning, compilation
    run.loader = FirstSteps(loader, timed)
    synchronize(device)
    start = time.perf_counter()
    stats = train_script.train_one_epoch(run, 1)
    synchronize(device)
    train_seconds = time.perf_counter() - start
    step_images = run.config["batch_size"] * run.config["num_pos"] * len(run.method.view_modalities)
    start = time.perf_counter()
    train_script.evaluate(run)          # extracts every query and gallery image of the protocol once
    synchronize(device)
    eval_seconds = time.perf_counter() - start
    eval_images = len(run.protocol.query_paths) + len(run.protocol.gallery_paths)
    return {"method": method, "variant": variant, "steps": stats["batches"],
            "train_img_s": round(stats["batches"] * step_images / train_seconds, 1),
            "eval_img_s": round(eval_images / eval_seconds, 1),
            "peak_gpu_mib": round((torch.cuda.max_memory_allocated() - baseline) / 2 ** 20) if cuda else None,
            "compiled": hasattr(run.net, "_orig_mod")}


# --------------------------------------------------------------------------------------------------
# train.py in other processes: torchrun ranks and the run that is killed
# --------------------------------------------------------------------------------------------------

def rank_worker(prefix, kill_in_epoch, train_args):
    """train.py's main in this process (a torchrun rank, or a plain process without RANK), then this rank's
    parameters saved to <prefix><rank>.pt for the comparison of the replicas. With `kill_in_epoch` >= 0 the
    process SIGKILLs itself after the first training step of that epoch: deterministically after the previous
    epoch's checkpoint, and before anything of this epoch is saved."""
    runs = []
    setup_run, train_one_epoch = train_script.setup_run, train_script.train_one_epoch

    def recording_setup_run(args):
        run, rng = setup_run(args)
        runs.append(run)
        return run, rng

    def dying_train_one_epoch(run, epoch):
        if epoch != kill_in_epoch:
            return train_one_epoch(run, epoch)
        run.loader = FirstSteps(run.loader, 1)
        train_one_epoch(run, epoch)
        os.kill(os.getpid(), signal.SIGKILL)

    train_script.setup_run, train_script.train_one_epoch = recording_setup_run, dying_train_one_epoch
    code = train_script.main(train_args)
    if code == 0:
        torch.save({name: p.detach().cpu() for name, p in runs[0].bare_net.named_parameters()},
                   f"{prefix}{os.environ.get('RANK', '0')}.pt")
    return code


def _forked_rank(log_path, env, prefix, kill_in_epoch, train_args):
    os.environ.update(env)
    torch.set_num_threads(1)          # GNU OpenMP's thread pool does not survive fork(); one thread needs none
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    sys.exit(rank_worker(prefix, kill_in_epoch, train_args))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launched:
    """train.py started in other processes: `ranks` torchrun ranks (0: one plain process, not distributed)."""

    def __init__(self, train_args, log_path, prefix, *, ranks=0, kill_in_epoch=-1, fork=False):
        self.log_path = log_path
        worker_args = [prefix, str(kill_in_epoch), *train_args]
        if fork:
            context = multiprocessing.get_context("fork")
            port = free_port()
            envs = [dict(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)) for r in range(ranks)] or [{}]
            self.processes = [context.Process(target=_forked_rank, args=(f"{log_path}.{i}", env, prefix,
                                                                         kill_in_epoch, train_args))
                              for i, env in enumerate(envs)]
            for process in self.processes:
                process.start()
            self.logs = [f"{log_path}.{i}" for i in range(len(envs))]
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(ranks)] if ranks else [sys.executable]
            env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
            with open(log_path, "w") as log:
                self.processes = [subprocess.Popen([*launcher, os.path.abspath(__file__), RANK_WORKER, *worker_args],
                                                   cwd=os.path.dirname(log_path), stdout=log, stderr=subprocess.STDOUT,
                                                   env=env)]
            self.logs = [log_path]

    def wait(self):
        """The exit status of each process."""
        codes = []
        for process in self.processes:
            if isinstance(process, subprocess.Popen):
                codes.append(process.wait())
            else:
                process.join()
                codes.append(process.exitcode)
        return codes

    def log_tail(self):
        tails = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                tails.append(f"--- {path}\n{f.read()[-2000:]}")
        return "\n".join(tails)


def run_to_end(launched, what):
    codes = launched.wait()
    if any(codes):
        raise RuntimeError(f"{what} exited {codes}:\n{launched.log_tail()}")


def train_here(args, what):
    code = train_script.main(args)
    if code:
        raise RuntimeError(f"{what}: train.py {' '.join(args)} exited {code}")


def short_run_args(root, base, folder, flags, common, epochs):
    out = os.path.join(base, folder)
    flags = [f for f in flags if f != "--amp"]          # fp32: the comparisons are of fp32 runs
    return ["--dataset", "sysu", "--data-path", root, "--method", "agw", *flags, *common, "--deterministic",
            "--epochs", str(epochs), "--eval-every", "100", "--model_path", out, "--log_path", out]


def metrics(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith("_metrics.jsonl")]
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f]


def last_checkpoint(folder):
    (name,) = [n for n in os.listdir(folder) if n.endswith(LAST_SUFFIX)]
    return os.path.join(folder, name)


def straight_run(root, base, flags, common):
    """The uninterrupted 2-epoch run in this process: the reference of the DDP and resume checks."""
    train_here(short_run_args(root, base, "straight", flags, common, 2), "the uninterrupted run")
    folder = os.path.join(base, "straight")
    return [record["loss"] for record in metrics(folder)], utils.load_torch_file(last_checkpoint(folder))["model"]


def compare_weights(reference, other):
    differ = [k for k in reference if not torch.equal(reference[k], other[k])]
    worst = max((float((reference[k].double() - other[k].double()).abs().max()) for k in differ), default=0.0)
    return differ, worst


def ddp_check(root, base, flags, common, world_sizes, fork, straight):
    """DDP jobs of each world size against the uninterrupted run in one plain process: a 1-process job trains
    on the same batches, so its epoch losses must match; the ranks of a larger job (whose batches differ) must
    end with identical parameters."""
    straight_losses, straight_weights = straight
    jobs = []
    for world_size in world_sizes:
        folder = f"ddp-{world_size}"
        prefix = os.path.join(base, f"{folder}-rank")
        epochs = 2 if world_size == 1 else 1
        launched = Launched(short_run_args(root, base, folder, flags, common, epochs),
                            os.path.join(base, f"{folder}.log"), prefix, ranks=world_size, fork=fork)
        run_to_end(launched, f"the {world_size}-process DDP job")
        losses = [record["loss"] for record in metrics(os.path.join(base, folder))]
        ranks = [torch.load(f"{prefix}{r}.pt") for r in range(world_size)]
        differing = sorted({name for params in ranks[1:] for name in params if not torch.equal(params[name], ranks[0][name])})
        job = {"world_size": world_size, "epochs": epochs, "losses": losses, "ranks_differing_tensors": len(differing)}
        if world_size == 1:
            job["relative_difference_to_single"] = max(abs(a - b) / max(abs(b), 1e-12)
                                                       for a, b in zip(losses, straight_losses, strict=True))
            _, job["max_weight_difference_to_single"] = compare_weights(
                straight_weights, utils.load_torch_file(last_checkpoint(os.path.join(base, folder)))["model"])
        job["ok"] = not differing and job.get("relative_difference_to_single", 0.0) < 1e-4
        jobs.append(job)
    return {"backend": "nccl" if "cuda" in common else "gloo", "launcher": "fork" if fork else "torchrun",
            "single_losses": straight_losses, "jobs": jobs, "ok": all(job["ok"] for job in jobs)}


def resume_check(root, base, flags, common, fork, straight):
    """A run SIGKILLed one step into epoch 1 and resumed from its epoch-0 checkpoint, against the uninterrupted
    run: every weight tensor must be equal."""
    args = short_run_args(root, base, "resumed", flags, common, 2)
    folder = os.path.join(base, "resumed")
    killed = Launched(args, os.path.join(base, "killed.log"), os.path.join(base, "killed-rank"), kill_in_epoch=1,
                      fork=fork)
    codes = killed.wait()
    if codes != [-signal.SIGKILL]:
        raise RuntimeError(f"the run to kill exited {codes} instead of being killed:\n{killed.log_tail()}")
    killed_after = utils.load_torch_file(last_checkpoint(folder))["epoch"]
    train_here(["--resume", last_checkpoint(folder)], "the resumed run")
    straight_weights = straight[1]
    differ, worst = compare_weights(straight_weights, utils.load_torch_file(last_checkpoint(folder))["model"])
    return {"killed_after_epoch": killed_after, "tensors": len(straight_weights), "tensors_differing": len(differ),
            "max_abs_difference": worst, "ok": not differ and killed_after == 0}


def attempt(check, *args):
    """check(*args), or {"ok": False, "error": the exception's text} when it raises: on a machine lent for
    minutes, one failing check (a torch.compile error, an NCCL set-up) must not lose the others' results."""
    try:
        return check(*args)
    except Exception as exc:                     # noqa: BLE001 (any failure is a result to report)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}


def first_line(text):
    return (text.strip().splitlines() or [""])[0]


def print_report(report, out):
    tiny = report["tiny"]
    measured = [row for row in report["speed"] if row["ok"]]
    print(utils.format_table(measured, ["method", "variant", "steps", "train_img_s", "eval_img_s", "peak_gpu_mib",
                                        "compiled"],
                             title=f"Speed on {report['device']} ({'tiny, fp32' if tiny else 'full size, fp16 AMP'})"))
    for row in report["speed"]:
        if not row["ok"]:
            print(f"{row['method']} {row['variant']}: FAILED ({first_line(row['error'])})")
    ddp = report["ddp"]
    for job in ddp.get("jobs", []):
        against = (f" vs one process {', '.join(f'{v:.6f}' for v in ddp['single_losses'])} (relative difference "
                   f"{job['relative_difference_to_single']:.2e}, weights {job['max_weight_difference_to_single']:.2g} "
                   f"apart)" if job["world_size"] == 1 else "")
        print(f"DDP ({ddp['backend']}, {ddp['launcher']}, {job['world_size']} process"
              f"{'es' if job['world_size'] > 1 else ''}): epoch losses {', '.join(f'{v:.6f}' for v in job['losses'])}"
              f"{against}; tensors differing between ranks: {job['ranks_differing_tensors']}: "
              f"{'ok' if job['ok'] else 'FAILED'}")
    if "error" in ddp:
        print(f"DDP: FAILED ({first_line(ddp['error'])})")
    r = report["resume"]
    if "error" in r:
        print(f"Kill and resume: FAILED ({first_line(r['error'])})")
    else:
        print(f"Killed after epoch {r['killed_after_epoch']} and resumed: {r['tensors_differing']} of {r['tensors']} "
              f"tensors differ (max {r['max_abs_difference']:.3g}): {'ok' if r['ok'] else 'FAILED'}")
    print(f"{report['seconds']} s; JSON: {out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [RANK_WORKER]:                 # a process started by Launched (torchrun's or a plain one)
        prefix, kill_in_epoch, *train_args = argv[1:]
        return rank_worker(prefix, int(kill_in_epoch), train_args)
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
    # NCCL allows one rank per GPU; a process that has used CUDA cannot fork, so GPU jobs start through torchrun.
    fork = device == "cpu"
    world_sizes = [1, 2] if fork or torch.cuda.device_count() >= 2 else [1]
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "tiny": tiny, "torch": torch.__version__,
              "speed": []}
    started = time.time()

    def save():
        """The JSON so far, after every check: a run stopped by a time limit still leaves its results."""
        report["seconds"] = round(time.time() - started, 1)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)

    with tempfile.TemporaryDirectory() as base:
        sizes = {(int(f[f.index("--img_h") + 1]), int(f[f.index("--img_w") + 1])) for f in speed_flags.values()}
        root = make_tree(base, tiny, sizes, args.workers)
        for method, flags in speed_flags.items():
            for variant in variants:
                report["speed"].append({"method": method, "variant": variant, "ok": True, **attempt(
                    speed_run, root, base, method, flags, variant, common, SPEED_STEPS[tiny])})
                save()
        straight = attempt(lambda: {"ok": True, "run": straight_run(root, base, speed_flags["agw"], common)})
        if straight["ok"]:
            report["ddp"] = attempt(ddp_check, root, base, speed_flags["agw"], common, world_sizes, fork,
                                    straight["run"])
            save()
            report["resume"] = attempt(resume_check, root, base, speed_flags["agw"], common, fork, straight["run"])
        else:
            report["ddp"] = report["resume"] = {"ok": False, "error": f"the uninterrupted reference run: "
                                                                      f"{straight['error']}"}
    save()
    print_report(report, args.out)
    return 0 if all(row["ok"] for row in report["speed"]) and report["ddp"]["ok"] and report["resume"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
