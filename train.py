"""Train IRL (ACM MM 2025) or the AGW baseline for visible-infrared person re-identification.

    python train.py --dataset sysu --gpu 0                       # official IRL recipe (REFERENCE 8, 11.1)
    python train.py --dataset regdb --trial 3 --method agw       # AGW baseline, RegDB split 3
    torchrun --nproc_per_node 2 train.py --dataset llcm          # DistributedDataParallel

Flags left unset take the chosen method's official defaults; the effective configuration is printed
at start. Checkpoints (`<suffix>_last.pth` every epoch, `<suffix>_best.pth`, `<suffix>_epoch_<e>.pth`)
hold everything needed for `--resume PATH` to continue exactly where a run stopped.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import data_loader
import data_manager
import evaluation
import method_base
import methods
import progress
import model as models
import resnet
import utils


# Each method's official recipe is its table entry's `defaults` (methods.py); these fill the rest.
COMMON_DEFAULTS = dict(dataset="sysu", method="irl", arch="resnet50", optim="SGD", backbone_lr_mult=0.1, trial=1,
                       seed=0, save_epoch=20, test_batch=64, workers=utils.default_workers(), mode="all",
                       log_every=50, model_path="result/", log_path="result/", gpu="0", device=None, pretrained=True,
                       val=False, channels_last=None, compile=False, deterministic=False, grad_checkpoint=False)
# A resumed run must keep these; anything else (paths, workers, device, ...) may change.
RESUME_LOCKED = ("dataset", "method", "arch", "img_h", "img_w", "batch_size", "num_pos", "lr", "epochs",
                 "loss_tri", "margin", "lr_scheduler", "warmup_epochs", "milestones", "optim", "backbone_lr_mult",
                 "seed", "trial", "val", "mode")
SELECTION_RULES = {
    False: "test-set selection (Q-22): Rank-1 of the method's selection similarity on the trial-0 test gallery",
    True: "validation selection (--val): Rank-1 of the method's selection similarity on held-out training identities",
}


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# --------------------------------------------------------------------------------------------------
# Command line and configuration
# --------------------------------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    # Official flags (names as in the IRL repository). Defaults of None are filled per method.
    add("--dataset", choices=tuple(data_manager.DEFAULT_DATA_PATHS), help="sysu | regdb | llcm (default sysu)")
    add("--lr", type=float, help="base LR of the heads; the backbone uses --backbone-lr-mult x this (default 0.1)")
    add("--optim", help="optimizer; only SGD is implemented (Q-18)")
    add("--batch-size", dest="batch_size", type=int, help="identities per batch B (IRL 6, AGW 8)")
    add("--num_pos", type=int, help="images per identity and modality P (default 4)")
    add("--img_h", type=int, help="input height (IRL 384, AGW 288)")
    add("--img_w", type=int, help="input width (IRL 192, AGW 144)")
    add("--trial", type=int, help="RegDB split 1..10 (default 1)")
    add("--seed", type=int, help="random seed (default 0)")
    add("--gpu", help="CUDA device index (default 0)")
    add("--resume", help="continue from this checkpoint (our <suffix>_last.pth)")
    add("--model_path", help="checkpoint folder (default result/)")
    add("--log_path", help="log folder (default result/)")
    add("--save_epoch", type=int, help="periodic checkpoint every N epochs (default 20)")
    add("--test-batch", dest="test_batch", type=int, help="evaluation batch size (default 64)")
    add("--workers", type=int, help="data loader workers (default 4, at most the CPU count)")
    add("--margin", type=float, help="OriTriplet margin (IRL 0.7, AGW 0.3); QCT uses 0.7 fixed, WRT none")
    add("--loss_tri", choices=tuple(method_base.METRIC_LOSSES), help="metric loss (IRL QCT, AGW WRT)")
    add("--lr_scheduler", choices=utils.LR_MODES + tuple(utils.FIXED_LR_SCHEDULES),
        help="IRL step (warmup + x0.1), AGW agw")
    add("--mode", choices=("all", "indoor"), help="SYSU search mode used for evaluation (default all)")
    # Extensions.
    add("--data-path", dest="data_path", help="dataset root (default ./dataset/SYSU-MM01/, ./dataset/RegDB/, "
                                              "./dataset/LLCM/)")
    add("--method", choices=methods.names(), help=f"{' | '.join(methods.names())} (default irl)")
    add("--arch", choices=("resnet50", "resnet18", "resnet34"), help="backbone (default resnet50)")
    add("--epochs", type=int, help="total epochs (IRL 150, AGW 81)")
    add("--warmup-epochs", dest="warmup_epochs", type=int, help="LR warmup epochs of the IRL schedule (10)")
    add("--milestones", type=int, nargs="+", help="x0.1 LR steps of the IRL step schedule (25 90 120)")
    add("--backbone-lr-mult", dest="backbone_lr_mult", type=float,
        help="backbone LR = this x --lr (official 0.1, for ImageNet-initialised backbones; the quick start keeps "
             "it from scratch too: with 1.0 at lr 0.1 and no warmup its training collapsed to chance)")
    add("--pretrained", metavar="PATH", help="ImageNet weights file (default: torchvision cache)")
    add("--no-pretrained", dest="pretrained", action="store_const", const=False,
        help="random initialisation (no ImageNet weights)")
    add("--eval-every", dest="eval_every", type=int, help="evaluate after epochs e>0 with e %% N == 0 "
                                                         "and after the last epoch (IRL 1, AGW 2)")
    add("--amp", action=argparse.BooleanOptionalAction,
        help="mixed precision: fp16 autocast + GradScaler on CUDA, bf16 autocast on the CPU (default: IRL on "
             "CUDA only, as the official code; AGW off)")
    add("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    add("--log-every", dest="log_every", type=int,
        help="a progress line every N training steps, on terminals and in logs alike (default 50)")
    add("--val", action="store_true", default=None,
        help="select the best checkpoint on held-out training identities instead of the test set")
    # Speed on GPUs.
    add("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
        help="channels-last memory format for training and evaluation (default: on CUDA only)")
    add("--compile", action="store_true", default=None,
        help="torch.compile the training network (falls back to eager with one warning where unavailable)")
    add("--grad-checkpoint", dest="grad_checkpoint", action=argparse.BooleanOptionalAction,
        help="activation checkpointing: much less activation memory for about one more forward pass (default off)")
    add("--deterministic", action="store_true", default=None,
        help="deterministic cuDNN kernels (no cudnn.benchmark autotuning): slower, repeatable on GPUs")
    # Options of single methods (their table entries' train_options).
    for name in methods.names():
        for key, (choices, text) in methods.get(name).train_options.items():
            add(f"--{key.replace('_', '-')}", dest=key, choices=choices, help=f"{name} only: {text}")
    return p


def method_option_keys():
    """Config keys of every method's train_options."""
    return tuple(key for name in methods.names() for key in methods.get(name).train_options)


def resume_locked_keys():
    """What a resumed or overwritten run must share: RESUME_LOCKED and every method's own options."""
    return RESUME_LOCKED + method_option_keys()


def resolve_config(args, saved=None):
    """Effective config: explicit flag > resumed checkpoint > method default > common default.

    Returns (config, sources) where sources[key] says where each value came from.
    """
    given = {k: v for k, v in vars(args).items() if v is not None and k != "resume"}
    if saved:
        clashes = [f"{k}={saved.get(k)!r} (checkpoint) vs {given[k]!r} (flag)"
                   for k in resume_locked_keys() if k in given and k in saved and _differs(given[k], saved[k])]
        if clashes:
            raise utils.ConfigError(f"cannot resume {args.resume}: it was trained with a different "
                                    f"configuration: {'; '.join(clashes)}")
    method = given.get("method") or (saved or {}).get("method") or COMMON_DEFAULTS["method"]
    foreign = [key for key in method_option_keys() if key in given and key not in methods.get(method).train_options]
    if foreign:
        raise utils.ConfigError(f"--{foreign[0].replace('_', '-')} is an option of another method, not of {method}")
    config, sources = {}, {}
    recipe = methods.get(method).defaults
    layers = [("flag", given), ("checkpoint", saved or {}), (f"{method} default", recipe),
              ("default", COMMON_DEFAULTS)]
    for key in list(vars(args)) + list(recipe):
        if key in config or key == "resume":
            continue
        for source, values in layers:
            if values.get(key) is not None:
                config[key], sources[key] = values[key], source
                break
        else:
            config[key], sources[key] = None, "default"
    if config["data_path"] is None:
        config["data_path"], sources["data_path"] = data_manager.DEFAULT_DATA_PATHS[config["dataset"]], "default"
    config["resume"] = args.resume
    validate_config(config)
    if config["lr_scheduler"] in utils.FIXED_LR_SCHEDULES and "flag" in (sources["warmup_epochs"],
                                                                         sources["milestones"]):
        name = config["lr_scheduler"]
        steps = ", ".join(f"x{0.1 ** (i + 1):g} at {epoch}"
                          for i, epoch in enumerate(utils.FIXED_LR_MILESTONES[name]))
        raise utils.ConfigError(f"--warmup-epochs/--milestones shape the IRL schedules; the {name.upper()} schedule "
                                f"(--lr_scheduler {name}) is fixed: warmup 10, {steps}. "
                                f"For a custom schedule add --lr_scheduler step (warmup, then x0.1 at each milestone)")
    return config, sources


def _differs(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return not math.isclose(float(a), float(b))
    return a != b


def validate_config(config):
    if str(config["optim"]).upper() != "SGD":
        raise utils.ConfigError(f"--optim {config['optim']}: only SGD is implemented (the official Adam "
                                f"variants crash, Q-18)")
    for key in ("batch_size", "num_pos", "epochs", "eval_every", "save_epoch", "test_batch", "log_every"):
        if int(config[key]) < 1:
            raise utils.ConfigError(f"{key} must be >= 1, got {config[key]}")
    if int(config["workers"]) < 0:
        raise utils.ConfigError(f"--workers must be >= 0, got {config['workers']}")
    splits = data_manager.DATASETS[config["dataset"]].num_splits
    if splits and not 1 <= int(config["trial"]) <= splits:
        raise utils.ConfigError(f"--trial must be in 1..{splits} for {data_manager.DATASETS[config['dataset']].name}, "
                                f"got {config['trial']}")


def run_suffix(config):
    """File-name stem like the official one, e.g. sysu_irl_p4_n6_lr_0.1_seed_0 (+ _val, + _trial_<t>)."""
    suffix = (f"{config['dataset']}_{config['method']}_p{config['num_pos']}_n{config['batch_size']}"
              f"_lr_{config['lr']}_seed_{config['seed']}")
    if config["val"]:
        suffix += "_val"
    if data_manager.DATASETS[config["dataset"]].num_splits:
        suffix += f"_trial_{config['trial']}"
    return suffix


def config_table(config, sources):
    rows = [{"setting": k, "value": json.dumps(config[k]) if isinstance(config[k], list) else config[k],
             "source": sources.get(k, "derived")} for k in sorted(config)]
    return utils.format_table(rows, ["setting", "value", "source"], title="Effective configuration",
                              float_fmt="{:g}")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

class TrainData:
    """The training dataset plus the sampler inputs (labels and per-identity positions)."""

    def __init__(self, dataset, rgb_labels, ir_labels, rgb_keep=None, ir_keep=None):
        self.dataset = dataset
        # Training identities, relabelled 0..K-1 (identity unless --val held some out).
        rgb_keep = np.arange(len(rgb_labels)) if rgb_keep is None else rgb_keep
        ir_keep = np.arange(len(ir_labels)) if ir_keep is None else ir_keep
        kept_ids = np.unique(np.asarray(rgb_labels)[rgb_keep])
        self.label_map = np.full(int(max(np.max(rgb_labels), np.max(ir_labels))) + 1, -1, dtype=np.int64)
        self.label_map[kept_ids] = np.arange(len(kept_ids))
        self.rgb_labels = self.label_map[np.asarray(rgb_labels)[rgb_keep]]
        self.ir_labels = self.label_map[np.asarray(ir_labels)[ir_keep]]
        color_pos, thermal_pos = utils.GenIdx(self.rgb_labels, self.ir_labels)
        self.color_pos = [rgb_keep[p] for p in color_pos]      # positions into the full arrays
        self.thermal_pos = [ir_keep[p] for p in thermal_pos]
        self.num_classes = len(kept_ids)


def build_train_data(config):
    """Training set and (for --val) the held-out identities' evaluation protocol."""
    root, dataset = config["data_path"], config["dataset"]
    data_manager.check_dataset_root(dataset, root)
    views = methods.get(config["method"]).train_views(config["img_h"], config["img_w"], dataset=dataset)
    trainset = data_loader.training_set(dataset, root, views, config["img_h"], config["img_w"], trial=config["trial"])
    rgb_labels = np.asarray(trainset.train_color_label)
    ir_labels = np.asarray(trainset.train_thermal_label)
    if not config["val"]:
        return TrainData(trainset, rgb_labels, ir_labels), None
    val_labels = data_manager.held_out_labels(dataset, root, rgb_labels)
    rgb_keep = np.flatnonzero(~np.isin(rgb_labels, val_labels))
    ir_keep = np.flatnonzero(~np.isin(ir_labels, val_labels))
    if len(np.unique(rgb_labels[rgb_keep])) < config["batch_size"]:
        raise utils.ConfigError(f"--val leaves {len(np.unique(rgb_labels[rgb_keep]))} training identities, "
                                f"fewer than --batch-size {config['batch_size']}")
    return (TrainData(trainset, rgb_labels, ir_labels, rgb_keep, ir_keep),
            data_manager.validation_protocol(dataset, root, val_labels, split=config["trial"]))


# --------------------------------------------------------------------------------------------------
# Model, optimisation, losses
# --------------------------------------------------------------------------------------------------

def pretrained_arg(config, resuming):
    """What build_model loads: nothing when a checkpoint overwrites every weight."""
    if resuming or config["pretrained"] is False:
        return None
    return config["pretrained"]


def lr_schedule(config):
    if config["lr_scheduler"] in utils.FIXED_LR_SCHEDULES:
        return utils.FIXED_LR_SCHEDULES[config["lr_scheduler"]]
    return functools.partial(utils.lr_factor, mode=config["lr_scheduler"], milestones=tuple(config["milestones"]),
                             warmup_epochs=config["warmup_epochs"], total_epochs=config["epochs"])


def training_loss(run, outputs, labels):
    """{term name: scalar tensor} of the method's training loss; the loss is their sum."""
    return run.criterion(outputs, labels)


# --------------------------------------------------------------------------------------------------
# RNG state (plain Python/torch types only, so checkpoints load with weights_only=True)
# --------------------------------------------------------------------------------------------------

def capture_rng_state():
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain(obj):
    """numpy scalars/arrays -> Python floats/lists (checkpoints and JSON hold no numpy objects)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------------------------------
# Devices, AMP and distributed helpers
# --------------------------------------------------------------------------------------------------

AMP_NAMES = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}


def autocast_dtype(amp, device, log=None):
    """Autocast dtype for the `amp` setting: True = on any device (fp16 + GradScaler on CUDA, bf16 on the
    CPU, which needs no scaler), "cuda" = on CUDA only (the IRL default), False = off.

    bf16 on a CPU without native bf16 is emulated and many times slower than fp32: an explicit --amp is
    obeyed there, with one warning saying so.
    """
    if amp is True or (amp == "cuda" and device.type == "cuda"):
        if device.type == "cuda":
            return torch.float16
        native, reason = utils.cpu_bf16_support()
        if not native and log is not None:
            log.warning(f"warning: --amp on this CPU: {reason}, {EMULATED_BF16_SLOWDOWN} than fp32 "
                        f"(drop --amp to train in fp32)")
        return torch.bfloat16
    return None


# Measured on a 2-core AMD EPYC with AVX2 only: one IRL resnet18 128x64 training step (4 views x 8 images)
# took 176 s in emulated bf16 against 11.4 s in fp32.
EMULATED_BF16_SLOWDOWN = "measured about 15x slower"


def init_distributed(config, log):
    """(world_size, rank, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPUs.
    A torchrun job of one process is distributed too (DDP over one rank), so one GPU runs the NCCL path."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ:
        return 1, 0, utils.resolve_device(config["device"], config["gpu"], logger=log)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = utils.resolve_device(config["device"], local_rank, logger=log)
    if device.type == "cuda":
        # The rank's GPU first, and named to NCCL: its communicator is bound to that GPU at once, instead of
        # each collective (barrier first) guessing the device from the current one.
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return world_size, rank, device


def max_over_ranks(tensor, distributed):
    """`tensor` reduced in place to its element-wise maximum over all processes. The collective runs on the
    tensor's own device, which must be the run's device: NCCL rejects CPU tensors."""
    if distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def compile_unavailable_reason(device):
    """Why torch.compile cannot run on `device` here, or None when it can."""
    import shutil
    import torch._dynamo
    if not torch._dynamo.is_dynamo_supported():
        return f"TorchDynamo does not support Python {sys.version.split()[0]}"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "Triton is not installed"
    compilers = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    return None if any(c and shutil.which(c) for c in compilers) else "no C++ compiler found for CPU kernels"


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------

class Run:
    """Everything one training run holds (built once, mutated epoch by epoch)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


class EpochMeters:
    """Sums of the loss terms and of the correct predictions, kept on the device, and the first step whose
    loss was not finite: updating them never waits for the device; `read` does, once.
    """

    def __init__(self, device):
        self.device = device
        self.sums = {}                    # name -> float64 tensor: sum over images (loss, terms, acc)
        self.images = 0
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, step, total, terms, logits, labels):
        n = labels.numel()
        total = total.detach().double()
        named = {"loss": total * n, **{name: value.detach().double() * n for name, value in terms.items()},
                 "acc": (logits.detach().argmax(1) == labels).sum().double()}
        for name, value in named.items():
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.images += n
        first = torch.logical_and(~torch.isfinite(total), self.first_bad_step < 0)
        self.first_bad_step = torch.where(first, step, self.first_bad_step)
        self.first_bad_loss = torch.where(first, total, self.first_bad_loss)

    def read(self, distributed):
        """({name: average over the images so far}, first non-finite step on this process or -1, its loss,
        whether any process has met a non-finite loss): one device synchronisation, one all-reduce."""
        any_bad = max_over_ranks((self.first_bad_step >= 0).to(torch.int64).reshape(1), distributed)
        values = torch.cat([torch.stack(list(self.sums.values())), self.first_bad_loss.reshape(1),
                            self.first_bad_step.double().reshape(1), any_bad.double()]).tolist()
        averages = {name: value / self.images for name, value in zip(self.sums, values)}
        return averages, int(values[-2]), values[-3], bool(values[-1])


def mixed_precision(run):
    """The autocast context of the run's AMP setting (none without AMP: no device-type lookup at all)."""
    if run.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=run.device.type, dtype=run.amp_dtype)


def build_train_loader(run):
    """The training DataLoader of the whole run: its workers persist across epochs and get each epoch's
    plan with the items (utils.RunSampler, utils.PlannedPairs); pinned memory on CUDA."""
    cfg, data = run.config, run.data
    sampler = utils.RunSampler(data.rgb_labels, data.ir_labels, data.color_pos, data.thermal_pos, cfg["num_pos"],
                               cfg["batch_size"], num_replicas=run.world_size, rank=run.rank)
    # The loader's own base-seed draw goes to a private generator: RunSampler.set_epoch draws the
    # worker seed from the global RNG instead, once per epoch, as a per-epoch loader did.
    return DataLoader(utils.PlannedPairs(data.dataset), batch_size=cfg["batch_size"] * cfg["num_pos"],
                      sampler=sampler, num_workers=cfg["workers"], drop_last=True,
                      pin_memory=run.device.type == "cuda", persistent_workers=cfg["workers"] > 0,
                      generator=torch.Generator())


def train_one_epoch(run, epoch):
    """One epoch without host synchronisation between the --log-every checkpoints of the step loop: the
    meters stay on the device, and a non-finite loss is seen at the next log step (at most --log-every - 1
    updates later, and always before the epoch's checkpoint is written)."""
    cfg, loader = run.config, run.loader
    loader.sampler.set_epoch(epoch)
    label_map = torch.from_numpy(run.data.label_map).to(run.device)
    meters = EpochMeters(run.device)
    run.net.train()
    lr = group_lrs(run.optimizer)
    # Progress bar with ETA on an interactive terminal; a line every --log-every steps everywhere.
    bar = tqdm(loader, desc=f"epoch {epoch}/{cfg['epochs'] - 1}", leave=False, dynamic_ncols=True,
               disable=run.rank != 0 or not sys.stderr.isatty())
    start = time.time()
    for step, batch in enumerate(bar):
        *views, l_rgb, l_ir = batch
        l_rgb = label_map[l_rgb.to(run.device, non_blocking=True).long()]
        l_ir = label_map[l_ir.to(run.device, non_blocking=True).long()]
        labels = run.method.train_labels(l_rgb, l_ir)
        views = [v.to(run.device, non_blocking=True, memory_format=run.memory_format) for v in views]
        with mixed_precision(run):
            outputs = run.method.forward_train(run.net, views)
            terms = training_loss(run, outputs, labels)
            total = sum(terms.values())
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(total).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        meters.update(step, total, terms, run.method.classification_logits(outputs), labels)
        if (step + 1) % cfg["log_every"] == 0 or step + 1 == len(loader):
            averages, bad_step, bad_loss, any_bad = meters.read(run.distributed)
            if any_bad:
                where = (f"is {bad_loss} at epoch {epoch}, batch {bad_step}" if bad_step >= 0 else
                         f"became non-finite on another process by epoch {epoch}, batch {step}")
                raise NonFiniteLossError(f"training loss {where}: stopped without saving; last good "
                                         f"checkpoint: {run.last_good or 'none yet'}")
            bar.set_postfix(loss=f"{averages['loss']:.3f}", acc=f"{100 * averages['acc']:.1f}%")
            if run.rank == 0:
                run.log.info(step_line(run, epoch, step + 1, len(loader), averages, meters.images,
                                       time.time() - start))
    bar.close()
    loss, acc = averages.pop("loss"), averages.pop("acc")
    return {"lr": lr["backbone"], "lr_groups": lr, "loss": loss, "acc": acc, "loss_terms": averages,
            "batches": len(loader)}


def loss_terms_text(terms):
    return ", ".join(f"{name} {value:.4f}" for name, value in terms.items())


def group_lrs(optimizer):
    """Current LR of each named parameter group (backbone, then the heads: bottleneck, classifier, ...)."""
    return {group["name"]: group["lr"] for group in optimizer.param_groups}


def heads_lr(lr_groups):
    """The LR of the head groups (model.param_groups gives every head the same one; MMN has eight heads)."""
    return next(lr for name, lr in lr_groups.items() if name != "backbone")


def step_line(run, epoch, step, steps, averages, images, elapsed):
    """One progress line: position, running losses and accuracy, throughput, ETA of the epoch and the run."""
    cfg = run.config
    epoch_eta = elapsed / step * (steps - step)
    run_eta = epoch_eta + elapsed / step * steps * (cfg["epochs"] - 1 - epoch)
    terms = {name: value for name, value in averages.items() if name not in ("loss", "acc")}
    return (f"epoch {epoch}/{cfg['epochs'] - 1} step {step}/{steps}: loss {averages['loss']:.4f} "
            f"({loss_terms_text(terms)}) acc {100 * averages['acc']:.2f}%, "
            f"{images * run.world_size / elapsed:.1f} img/s, "
            f"ETA epoch {progress.format_seconds(epoch_eta)}, run {progress.format_seconds(run_eta)} (training only)")


def fused_sgd(scaler):
    """SGD's `fused` setting: fused with an fp16 GradScaler, which then hands it its inf/NaN flag on the device
    (unfused, scaler.step reads the flag on the host every step); the default (None) otherwise, which keeps CPU
    runs bitwise as before."""
    return True if scaler.is_enabled() else None


def evaluated_modes(method):
    """The similarities train.py evaluates: the method's selection mode, then BN and pool."""
    return tuple(dict.fromkeys((method.selection_mode, "bn", "pool")))


def evaluate(run):
    cfg = run.config
    result, _, _ = evaluation.evaluate(run.bare_net, run.protocol, cfg["img_h"], cfg["img_w"], cfg["test_batch"],
                                       cfg["workers"], run.device, evaluated_modes(run.method),
                                       fusions=run.method.similarity_modes(), channels_last=cfg["channels_last"],
                                       progress=False, warn=run.log.warning)
    return plain(result)


def summary_line(result, method):
    parts = []
    labels = method.mode_labels()
    for mode in evaluated_modes(method):
        m = result["mean"][mode]
        label = labels[mode]
        rank10 = m["cmc"][min(10, len(m["cmc"])) - 1]   # galleries under 10 images have shorter CMCs
        parts.append(f"{label}: Rank-1 {100 * m['cmc'][0]:.2f}% Rank-10 {100 * rank10:.2f}% "
                     f"mAP {100 * m['mAP']:.2f}% mINP {100 * m['mINP']:.2f}%")
    return " | ".join(parts)


def checkpoint_state(run, epoch, metrics):
    return {"format": models.CHECKPOINT_FORMAT, "model": run.bare_net.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "epoch": epoch, "best_metric": run.best_metric,
            "best_epoch": run.best_epoch, "rng": capture_rng_state(), "config": saved_config(run), "metrics": metrics}


def saved_config(run):
    """The config a checkpoint stores: --channels-last as asked, not as resolved for this run's device (its
    default depends on the device), so that a run resumed on another device resolves it anew."""
    if run.sources["channels_last"] == "default":
        return dict(run.config, channels_last=None)
    return dict(run.config)


def due_for_evaluation(cfg, epoch):
    return (epoch > 0 and epoch % cfg["eval_every"] == 0) or epoch == cfg["epochs"] - 1


def end_of_epoch(run, epoch, stats):
    """Evaluate (rank 0), then save best / periodic / last checkpoints and the metrics line."""
    cfg, log = run.config, run.log
    record = {"epoch": epoch, **stats, "eval": None, "selection": SELECTION_RULES[cfg["val"]]}
    if due_for_evaluation(cfg, epoch):
        start = time.time()
        result = evaluate(run)
        record["eval"] = {mode: result["mean"][mode] for mode in evaluated_modes(run.method)}
        record["eval_seconds"] = round(time.time() - start, 2)
        log.info(f"Eval epoch {epoch} on {run.protocol.name}: {summary_line(result, run.method)}")
        rank1 = result["mean"][run.method.selection_mode]["cmc"][0]
        if rank1 > run.best_metric:      # first evaluation always sets a best
            run.best_metric, run.best_epoch = rank1, epoch
            utils.save_checkpoint_atomic(checkpoint_state(run, epoch, record), run.paths["best"])
            log.info(f"New best checkpoint (epoch {epoch}, {selection_label(run.method)} Rank-1 {100 * rank1:.2f}%; "
                     f"{SELECTION_RULES[cfg['val']]}): {run.paths['best']}")
    record.update(best_metric=run.best_metric, best_epoch=run.best_epoch)
    state = checkpoint_state(run, epoch, record)
    if epoch > 0 and epoch % cfg["save_epoch"] == 0:
        utils.save_checkpoint_atomic(state, os.path.join(cfg["model_path"], f"{run.suffix}_epoch_{epoch}.pth"))
    utils.save_checkpoint_atomic(state, run.paths["last"])
    run.last_good = run.paths["last"]
    with open(run.paths["metrics"], "a", encoding="utf-8") as f:
        f.write(json.dumps(plain(record)) + "\n")
    if run.tb is not None:
        for key in ("loss", "lr", "acc"):
            run.tb.add_scalar(key, stats[key], epoch)
        for name, value in stats["loss_terms"].items():
            run.tb.add_scalar(f"loss_{name}", value, epoch)
        for mode in (record["eval"] or {}):
            run.tb.add_scalar(f"rank1_{mode}", record["eval"][mode]["cmc"][0], epoch)
            run.tb.add_scalar(f"mAP_{mode}", record["eval"][mode]["mAP"], epoch)


def truncate_metrics(path, last_epoch):
    """Drop metric lines of epochs after `last_epoch` (written before a run was killed)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= last_epoch]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def tensorboard_writer(log_path, suffix):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:     # optional dependency
        return None
    return SummaryWriter(os.path.join(log_path, "tensorboard", suffix))


def load_resume_checkpoint(path, model_path):
    """Our training checkpoint; a bare file name is also looked up in --model_path (official style)."""
    if not os.path.exists(path) and model_path and os.path.exists(os.path.join(model_path, path)):
        path = os.path.join(model_path, path)
    ckpt = utils.load_torch_file(path)
    if ckpt.get("format") != models.CHECKPOINT_FORMAT:
        raise utils.CheckpointError(f"{path} is not a {models.CHECKPOINT_FORMAT} training checkpoint (official "
                                    f"checkpoints hold only weights: evaluate them with test.py)")
    return path, ckpt


def setup_run(args):
    resume_path, ckpt = (None, None)
    if args.resume:
        resume_path, ckpt = load_resume_checkpoint(args.resume, args.model_path)
        args.resume = resume_path
    config, sources = resolve_config(args, ckpt["config"] if ckpt else None)
    suffix = run_suffix(config)
    paths = {"last": os.path.join(config["model_path"], f"{suffix}_last.pth"),
             "best": os.path.join(config["model_path"], f"{suffix}_best.pth"),
             "log": os.path.join(config["log_path"], f"{suffix}.log"),
             "metrics": os.path.join(config["log_path"], f"{suffix}_metrics.jsonl")}
    # The log file is created once the inputs are checked (open_log_file in train): a run refused here
    # leaves nothing behind.
    log = utils.setup_logger("train", paths["log"], int(os.environ.get("RANK", "0")), defer_file=True)
    if not ckpt:
        refuse_to_overwrite_another_run(paths["last"], config)
    world_size, rank, device = init_distributed(config, log)
    if config["channels_last"] is None:
        config["channels_last"] = device.type == "cuda"
    utils.set_seed(config["seed"], deterministic=bool(config["deterministic"]))
    data, val_protocol = build_train_data(config)
    config["num_classes"] = data.num_classes
    if ckpt and ckpt["config"].get("num_classes") != data.num_classes:
        raise utils.ConfigError(f"cannot resume {resume_path}: it has {ckpt['config'].get('num_classes')} "
                                f"classes but the training set in {config['data_path']} has {data.num_classes}")
    protocol = (val_protocol or data_manager.training_protocol(config["dataset"], config["data_path"],
                                                               mode=config["mode"], split=config["trial"])) \
        if rank == 0 else None
    method = methods.get(config["method"])
    net = method.build_model(data.num_classes, config["arch"], config["img_h"], config["img_w"],
                             pretrained=pretrained_arg(config, ckpt is not None), dataset=config["dataset"],
                             options=config)
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    net = net.to(device, memory_format=memory_format)
    net.set_grad_checkpointing(config["grad_checkpoint"])
    amp_dtype = autocast_dtype(config["amp"], device, log)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    optimizer = torch.optim.SGD(models.param_groups(net, config["lr"], config["backbone_lr_mult"]), lr=config["lr"],
                                momentum=0.9, nesterov=True, weight_decay=5e-4, fused=fused_sgd(scaler))
    scheduler = utils.make_lr_scheduler(optimizer, lr_schedule(config))
    run = Run(config=config, sources=sources, world_size=world_size, distributed=dist.is_initialized(), rank=rank, device=device, suffix=suffix,
              paths=paths, log=log, data=data, protocol=protocol, bare_net=net, net=net, optimizer=optimizer,
              scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype, method=method, criterion=method.build_criterion(config),
              memory_format=memory_format, start_epoch=0, best_metric=-1.0, best_epoch=-1, last_good=None, tb=None)
    run.loader = build_train_loader(run)
    if ckpt:
        restore_training_state(run, ckpt, resume_path)
    if run.distributed:
        run.net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    if config["compile"]:
        reason = compile_unavailable_reason(device)
        if reason:
            log.warning(f"warning: --compile unavailable here ({reason}): training without torch.compile")
        else:
            run.net = torch.compile(run.net)
    return run, (ckpt["rng"] if ckpt else None)    # the rest of the checkpoint is loaded; let it go


def refuse_to_overwrite_another_run(last_path, config):
    """ConfigError when `last_path` holds a run of another configuration: the new run would replace its
    checkpoints and logs, which share the name (the same configuration may be run again)."""
    if not os.path.exists(last_path):
        return
    saved = utils.load_torch_file(last_path).get("config") or {}
    clashes = [f"{key}={saved.get(key)!r} there vs {config[key]!r} now"
               for key in resume_locked_keys() if _differs(config[key], saved.get(key))]
    if clashes:
        raise utils.ConfigError(f"{last_path} belongs to a run with another configuration ({'; '.join(clashes)}), "
                                f"and this run would overwrite its checkpoints and log: choose another "
                                f"--model_path/--log_path, or --resume it")


def restore_training_state(run, ckpt, path):
    try:
        run.bare_net.load_state_dict(ckpt["model"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        for group in run.optimizer.param_groups:      # the saved groups' own setting would replace ours
            group["fused"] = fused_sgd(run.scaler)
        run.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    except (RuntimeError, KeyError, ValueError) as exc:
        raise utils.CheckpointError(f"cannot resume from {path}: {str(exc).splitlines()[0]}") from None
    run.start_epoch = int(ckpt["epoch"]) + 1
    run.best_metric, run.best_epoch = float(ckpt["best_metric"]), int(ckpt["best_epoch"])
    run.last_good = path


def train(args):
    run, resume_rng = setup_run(args)
    cfg, log = run.config, run.log
    if run.rank == 0:
        utils.open_log_file(log)
        os.makedirs(cfg["model_path"], exist_ok=True)
        log.info(config_table(cfg, run.sources))
        cuda_only = " (CUDA only)" if cfg["amp"] == "cuda" and run.amp_dtype is None else ""
        log.info(f"Device: {run.device}, processes: {run.world_size}, AMP: {AMP_NAMES[run.amp_dtype]}{cuda_only}; "
                 f"classes: {cfg['num_classes']}; model selection: {SELECTION_RULES[cfg['val']]}")
        if resume_rng is not None:
            log.info(f"Resuming {run.last_good} after epoch {run.start_epoch - 1} ({best_so_far(run)})")
            truncate_metrics(run.paths["metrics"], run.start_epoch - 1)
        else:
            open(run.paths["metrics"], "w").close()
        run.tb = tensorboard_writer(cfg["log_path"], run.suffix)
    if resume_rng is not None:
        restore_rng_state(resume_rng)     # last: setup consumed RNG identically in both runs
    for epoch in range(run.start_epoch, cfg["epochs"]):
        start = time.time()
        stats = train_one_epoch(run, epoch)
        run.scheduler.step()
        stats["seconds"] = round(time.time() - start, 2)
        if run.rank == 0:
            log.info(f"Epoch {epoch}: lr heads {heads_lr(stats['lr_groups']):g} backbone "
                     f"{stats['lr_groups']['backbone']:g}, loss {stats['loss']:.4f} ({loss_terms_text(stats['loss_terms'])}) "
                     f"acc {100 * stats['acc']:.2f}% "
                     f"[{stats['batches']} batches, {stats['seconds']:.1f}s]")
            end_of_epoch(run, epoch, stats)
        if run.distributed:
            dist.barrier()
    if run.rank == 0:
        trained = cfg["epochs"] - run.start_epoch
        log.info(f"Finished {trained} epoch{'s' if trained != 1 else ''}; {best_so_far(run)} "
                 f"({SELECTION_RULES[cfg['val']]}). Checkpoints: {run.paths['best']}, {run.paths['last']}")
        if run.tb is not None:
            run.tb.close()
    return 0


def best_so_far(run):
    if run.best_epoch < 0:
        return "no evaluation yet"
    return f"best {selection_label(run.method)} Rank-1 {100 * run.best_metric:.2f}% at epoch {run.best_epoch}"


def selection_label(method):
    return method.mode_labels()[method.selection_mode]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    except (data_manager.DatasetError, utils.CheckpointError, utils.ConfigError,
            resnet.PretrainedWeightsError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
