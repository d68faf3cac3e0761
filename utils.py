"""Ground-floor helpers: errors, seeding, the identity sampler, checkpoints, logging, LR schedules.

Imports nothing of ours (see the floor rules in DEVELOPERS.md / the team contract).
"""
import argparse
import bisect
import functools
import json
import logging
import logging.handlers
import math
import os
import random
import sys
import tempfile

import numpy as np
import torch
from torch.utils.data import Sampler


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe or does not fit the model."""


class ConfigError(ValueError):
    """Invalid user configuration (arguments, sizes, method names)."""


# --------------------------------------------------------------------------------------------------
# Seeding and argument parsing
# --------------------------------------------------------------------------------------------------

def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed every RNG the training uses (REFERENCE 8.1): torch, python `random`, numpy legacy, CUDA."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


_TRUE_WORDS = {"true", "t", "yes", "y", "1", "on"}
_FALSE_WORDS = {"false", "f", "no", "n", "0", "off"}


def str2bool(v) -> bool:
    """argparse type for boolean flags written as `--flag True` (the official README style, Q-26)."""
    if isinstance(v, bool):
        return v
    word = str(v).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, yes/no, 1/0), got {v!r}")


# --------------------------------------------------------------------------------------------------
# Training sampler (REFERENCE 4)
# --------------------------------------------------------------------------------------------------

def GenIdx(train_color_label, train_thermal_label):
    """Per-class position lists for each modality, classes in ascending order (REFERENCE 4.1)."""
    def positions(labels):
        labels = np.asarray(labels)
        return [np.flatnonzero(labels == c) for c in np.unique(labels)]
    return positions(train_color_label), positions(train_thermal_label)


def _validate_sampler_args(color_labels, thermal_labels, color_pos, thermal_pos, num_pos, batch_size,
                           num_replicas, rank):
    """Raise ConfigError for inputs the official sampler silently mishandles (Q-06) or crashes on."""
    if int(num_pos) < 1:
        raise ConfigError(f"IdentitySampler: num_pos must be >= 1, got {num_pos}")
    if int(batch_size) < 1:
        raise ConfigError(f"IdentitySampler: batchSize (identities per batch) must be >= 1, got {batch_size}")
    if len(color_labels) == 0 or len(thermal_labels) == 0:
        raise ConfigError("IdentitySampler: empty training labels (no RGB or no IR images)")
    rgb_ids, ir_ids = np.unique(color_labels), np.unique(thermal_labels)
    num_ids = len(rgb_ids)
    if not np.array_equal(rgb_ids, np.arange(num_ids)):
        raise ConfigError("IdentitySampler: RGB labels must be contiguous 0..K-1 (relabel the training set); "
                          f"got {num_ids} distinct labels in range {rgb_ids.min()}..{rgb_ids.max()}")
    if not np.array_equal(ir_ids, rgb_ids):
        missing = sorted(set(rgb_ids.tolist()) ^ set(ir_ids.tolist()))[:10]
        raise ConfigError("IdentitySampler: RGB and IR training sets must hold the same identities "
                          f"0..{num_ids - 1}; labels present in only one modality: {missing}")
    if len(color_pos) != num_ids or len(thermal_pos) != num_ids:
        raise ConfigError(f"IdentitySampler: color_pos/thermal_pos must have one entry per identity ({num_ids}); "
                          f"got {len(color_pos)}/{len(thermal_pos)} (build them with GenIdx)")
    if int(batch_size) > num_ids:
        raise ConfigError(f"IdentitySampler: batchSize={batch_size} identities per batch but the training set "
                          f"has only {num_ids} identities")
    if int(num_replicas) < 1:
        raise ConfigError(f"IdentitySampler: num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= int(rank) < int(num_replicas):
        raise ConfigError(f"IdentitySampler: rank must be in 0..{int(num_replicas) - 1}, got {rank}")


class IdentitySampler(Sampler):
    """Batches of `batchSize` identities x `num_pos` images each, paired RGB/IR (REFERENCE 4.2).

    The plan is drawn from the numpy legacy global RNG in the official call order (one identity draw per
    batch, then per identity an RGB draw followed by an IR draw; images WITH replacement, Q-09), so with
    the same `np.random.seed` the official `index1`/`index2` are reproduced. Construct one per epoch.

    The plan has `num_batches = floor(N/(B*P)) + 1` batches (Q-08: the official code runs that many).
    `__len__` is the number of positions this sampler actually yields (num_batches*B*P for one process).
    This differs by design from the official `len()` = N, which made the log print floor(N/(B*P)) batches.

    Distributed training: every rank builds the same plan from the same seeded RNG; rank r takes the whole
    batches r, r+W, r+2W, ... (W = num_replicas), truncated to `num_batches // W` batches per rank so all
    ranks run the same number of steps. Yielded positions index `index1`/`index2` (the full plan), so the
    dataset's cIndex/tIndex are set to the full plan on every rank. Use the DataLoader with
    `batch_size = B*P`, no shuffle.
    `epoch` is accepted for signature compatibility and unused (as in the official code).
    """

    def __init__(self, train_color_label, train_thermal_label, color_pos, thermal_pos,
                 num_pos, batchSize, epoch=None, *, num_replicas=1, rank=0):
        _validate_sampler_args(train_color_label, train_thermal_label, color_pos, thermal_pos,
                               num_pos, batchSize, num_replicas, rank)
        self.num_pos, self.batch_size = int(num_pos), int(batchSize)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.N = max(len(train_color_label), len(train_thermal_label))
        self.num_batches = self.N // (self.batch_size * self.num_pos) + 1
        self.index1, self.index2 = self._draw_plan(np.unique(train_color_label), color_pos, thermal_pos)
        self.batches_per_rank = self.num_batches // self.num_replicas
        if self.batches_per_rank == 0:
            raise ConfigError(f"IdentitySampler: the epoch plan has {self.num_batches} batches, fewer than "
                              f"num_replicas={self.num_replicas}; use fewer processes or smaller batches")

    def _draw_plan(self, ids, color_pos, thermal_pos):
        rgb, ir = [], []
        for _ in range(self.num_batches):
            batch_ids = np.random.choice(ids, self.batch_size, replace=False)
            for pid in batch_ids:
                rgb.append(np.random.choice(color_pos[pid], self.num_pos))
                ir.append(np.random.choice(thermal_pos[pid], self.num_pos))
        return np.concatenate(rgb), np.concatenate(ir)

    def rank_batches(self):
        """Indices of the plan's batches this rank runs, in order."""
        return np.arange(self.rank, self.batches_per_rank * self.num_replicas, self.num_replicas)

    def __iter__(self):
        batch_len = self.batch_size * self.num_pos
        starts = self.rank_batches() * batch_len
        positions = (starts[:, None] + np.arange(batch_len)[None, :]).reshape(-1)
        return iter(positions.tolist())

    def __len__(self):
        return self.batches_per_rank * self.batch_size * self.num_pos


class RunSampler(Sampler):
    """The identity sampler of a whole run, for a DataLoader (and its workers) built once per run.

    `set_epoch(epoch)` draws the epoch's plan exactly as constructing an `IdentitySampler` does (numpy's
    global RNG, official order), then one int64 from torch's global RNG as the epoch's worker seed, where a
    DataLoader built per epoch drew its base seed: the random streams advance as they did with one loader
    per epoch. It yields `(rgb index, ir index, worker seed)` items for `PlannedPairs`, so workers that
    live across epochs receive each epoch's plan with the items instead of holding a stale copy of it.
    """

    def __init__(self, train_color_label, train_thermal_label, color_pos, thermal_pos, num_pos, batchSize, *,
                 num_replicas=1, rank=0):
        _validate_sampler_args(train_color_label, train_thermal_label, color_pos, thermal_pos,
                               num_pos, batchSize, num_replicas, rank)
        self.plan_args = (train_color_label, train_thermal_label, color_pos, thermal_pos, num_pos, batchSize)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.plan, self.worker_seed = None, None

    def set_epoch(self, epoch):
        self.plan = IdentitySampler(*self.plan_args, epoch, num_replicas=self.num_replicas, rank=self.rank)
        self.worker_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        return self.plan

    def __iter__(self):
        if self.plan is None:
            raise RuntimeError("RunSampler: call set_epoch(epoch) before each epoch")
        for position in self.plan:
            yield int(self.plan.index1[position]), int(self.plan.index2[position]), self.worker_seed

    def __len__(self):
        if self.plan is None:
            raise RuntimeError("RunSampler: call set_epoch(epoch) before each epoch")
        return len(self.plan)


def seed_like_a_new_worker(base_seed, worker_id):
    """Seed python, torch and numpy as torch's DataLoader seeds a freshly started worker process."""
    from torch.utils.data._utils.worker import _generate_state   # the numpy seed torch's worker loop uses
    random.seed(base_seed + worker_id)
    torch.manual_seed(base_seed + worker_id)
    np.random.seed(_generate_state(base_seed, worker_id))


class PlannedPairs(torch.utils.data.Dataset):
    """A paired training set (data_loader._PairedTrainData: `pair(rgb index, ir index)` gives an item) indexed
    by the items of `RunSampler`: (rgb index, ir index, worker seed). Nothing of the dataset is changed per
    item, so every worker's copy stays as built.

    A worker that meets a new epoch's seed first re-seeds itself as a worker started for that epoch would
    be, so persistent workers draw the same augmentations as the per-epoch workers of the official loop.
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.seeded_with = None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        rgb_index, ir_index, worker_seed = item
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker_seed != self.seeded_with:
            seed_like_a_new_worker(worker_seed, worker.id)
            self.seeded_with = worker_seed
        return self.dataset.pair(rgb_index, ir_index)


# --------------------------------------------------------------------------------------------------
# Logging and devices
# --------------------------------------------------------------------------------------------------

_OWN_HANDLER = "_vireid_handler"


def setup_logger(name, log_file=None, rank=0, *, defer_file=False) -> logging.Logger:
    """Logger writing to stdout and (optionally) a file; calling it again replaces its own handlers.

    Ranks > 0 of a distributed run only log warnings and errors, and never to the file. With
    `defer_file=True` the file (and its folder) is created only by `open_log_file`, which first writes
    the records logged so far: a run that stops while still checking its inputs leaves nothing behind.
    """
    logger = logging.getLogger(name)
    for handler in [h for h in logger.handlers if getattr(h, _OWN_HANDLER, False)]:
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and rank == 0:
        if defer_file:
            pending = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
            pending.log_file = log_file
            handlers.append(pending)
        else:
            handlers.append(_file_handler(log_file))
    for handler in handlers:
        _adopt(logger, handler)
    return logger


def open_log_file(logger) -> None:
    """Create the deferred log file of `setup_logger(..., defer_file=True)` with the records so far."""
    for pending in [h for h in logger.handlers if isinstance(h, logging.handlers.MemoryHandler)]:
        file_handler = _file_handler(pending.log_file)
        pending.setTarget(file_handler)
        pending.flush()
        logger.removeHandler(pending)
        pending.close()
        _adopt(logger, file_handler)


def _file_handler(log_file):
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    return logging.FileHandler(log_file, encoding="utf-8")


def _adopt(logger, handler):
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    setattr(handler, _OWN_HANDLER, True)
    logger.addHandler(handler)


def default_workers(preferred=4) -> int:
    """Loader worker processes: `preferred`, but never more than the CPUs this process may use (more only
    make torch warn and the workers compete for the same cores)."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(preferred, available))


def cpu_bf16_support():
    """(native, reason): whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX tiles) in the
    kernels PyTorch dispatches to. Without it, CPU bf16 autocast is emulated and many times slower
    than float32."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = [name for name, present in (("AVX-512 BF16", torch.cpu._is_avx512_bf16_supported()),
                                        ("AMX", torch.cpu._is_amx_tile_supported())) if present]
    if capability.startswith("AVX512") and flags:
        return True, f"this CPU computes bf16 natively ({' and '.join(flags)}, {capability} kernels)"
    missing = "no AVX-512 BF16 or AMX" if not flags else f"PyTorch dispatches {capability} kernels"
    return False, f"this CPU has no native bf16 ({missing}): bf16 would be emulated"


def resolve_device(device=None, gpu=None, *, logger=None) -> torch.device:
    """Pick the torch device: '--device cpu' wins; otherwise CUDA (cuda:<gpu>) when available.

    CUDA requested or implied (device None/'cuda') but unavailable -> one warning line, CPU.
    """
    if device not in (None, "cuda", "cpu"):
        raise ConfigError(f"--device must be 'cuda' or 'cpu', got {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        (logger or logging.getLogger("vireid")).warning("CUDA not available: running on the CPU")
        return torch.device("cpu")
    if gpu is None or str(gpu).strip() == "":
        return torch.device("cuda")
    try:
        index = int(str(gpu).split(",")[0])
    except ValueError:
        raise ConfigError(f"--gpu must be a device index such as 0, got {gpu!r}") from None
    if not 0 <= index < torch.cuda.device_count():
        raise ConfigError(f"--gpu {index}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device(f"cuda:{index}")


def format_table(rows, columns, title=None, *, float_fmt="{:.2f}") -> str:
    """Fixed-width text table: first column left-aligned, the others right-aligned; floats via float_fmt."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return float_fmt.format(float(value))
        return "" if value is None else str(value)

    body = [[cell(row.get(col)) for col in columns] for row in rows]
    widths = [max([len(str(col))] + [len(r[k]) for r in body]) for k, col in enumerate(columns)]

    def line(cells):
        parts = [c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    out = ([title] if title else []) + [line([str(c) for c in columns]), rule] + [line(r) for r in body]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Files: atomic writes and safe checkpoint loading
# --------------------------------------------------------------------------------------------------

def _write_atomic(path, write):
    """Write through `write(file_object)` into a temp file next to `path`, then rename it over `path`.

    A crash never leaves a partial file under the final name, and the temp file is removed on failure.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint_atomic(obj, path) -> None:
    """torch.save `obj` to `path` atomically (temp file in the same directory + os.replace)."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def save_json_atomic(obj, path) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    _write_atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode("utf-8")))


def _numpy_safe_globals():
    """The numpy objects official checkpoints hold ('cmc' float32 array, 'mAP'/'mINP' float64 scalars).

    Names differ between numpy 2.x (numpy._core...) and the numpy 1.x that wrote the official files
    (numpy.core...), so the reconstructors are registered under both full names.
    """
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    dtype_classes = [getattr(np.dtypes, name) for name in ("Float32DType", "Float64DType", "Int64DType")]
    return [np.ndarray, np.dtype] + dtype_classes + [
        (_reconstruct, f"numpy.{core}.multiarray._reconstruct") for core in ("_core", "core")] + [
        (scalar, f"numpy.{core}.multiarray.scalar") for core in ("_core", "core")]


# Words torch's weights-only unpickler uses when it blocks a global/class (vs. a damaged file).
_UNSAFE_MARKERS = ("GLOBAL", "Can only build", "allowlisted", "add_safe_globals")


def _load_failure_reason(exc) -> str:
    """The informative sentence of a torch.load error (the weights-only unpickler adds boilerplate)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    informative = [line for line in lines if not line.startswith(boilerplate)]
    return (informative or ["empty or truncated file"])[0].split(". ")[0]


# A torch.save file starts with a zip header (torch >= 1.6) or a pickle PROTO opcode (legacy format).
_TORCH_FILE_MAGICS = (b"PK\x03\x04", b"\x80")


def check_checkpoint_path(path) -> str:
    """`path` as a string if it names an existing file; CheckpointError saying what it is otherwise."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def load_torch_file(path) -> dict:
    """Load a checkpoint without ever running code from it (weights_only + numpy allow-list, Q-25).

    Tensors are mapped to the CPU. Missing, unreadable, corrupt or unsafe files -> CheckpointError
    naming the path.
    """
    path = check_checkpoint_path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_FILE_MAGICS):
        # Checked up front: torch's unpickler reports such files as e.g. "IndexError: pop from empty list".
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (" +
                              ("empty file)" if not head else "neither a torch zip archive nor a pickle)"))
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError/RuntimeError/EOFError/... for bad files
        detail = _load_failure_reason(exc)
        if any(word in str(exc) for word in _UNSAFE_MARKERS):
            raise CheckpointError(f"refusing to load {path}: it contains objects outside the allowed "
                                  f"tensor/numpy types ({detail})") from None
        raise CheckpointError(f"cannot read checkpoint {path}: corrupt or not a torch file "
                              f"({type(exc).__name__}: {detail})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a checkpoint: expected a dict, found {type(obj).__name__}")
    return obj


# --------------------------------------------------------------------------------------------------
# Learning-rate schedules (REFERENCE 8.3)
# --------------------------------------------------------------------------------------------------

LR_MODES = ("step", "exp", "linear", "poly", "cosine")


def lr_factor(epoch, mode="step", *, milestones=(25, 90, 120), gamma=0.1, warmup_epochs=10,
              warmup_factor=0.1, total_epochs=150, power=0.9) -> float:
    """Multiplier of each group's base LR at 0-based `epoch` (official LRSchedulerWithWarmup, target_lr=0).

    Linear warmup from `warmup_factor` over `warmup_epochs`, then: step = gamma**(#milestones <= epoch);
    with r = (epoch - warmup)/(total - warmup): exp = power**r, linear = 1 - r, poly = power**(1 - r),
    cosine = (1 + cos(pi r)) / 2.
    """
    if mode not in LR_MODES:
        raise ConfigError(f"unknown LR schedule mode {mode!r}; choose from {', '.join(LR_MODES)}")
    if epoch < warmup_epochs:
        alpha = epoch / warmup_epochs
        return warmup_factor * (1 - alpha) + alpha
    if mode == "step":
        return gamma ** bisect.bisect_right(list(milestones), epoch)
    ratio = (epoch - warmup_epochs) / (total_epochs - warmup_epochs)
    if mode == "exp":
        return power ** ratio
    if mode == "linear":
        return 1 - ratio
    if mode == "poly":
        return power ** (1 - ratio)
    return 0.5 * (1 + math.cos(math.pi * ratio))


# Schedules of a fixed shape (no warmup/milestone flags), by --lr_scheduler name: the AGW repository's, DEEN
# train.py's and IFALNet train.py's: warmup (e+1)/10 for 10 epochs, then 1, x0.1 from the first milestone, x0.01
# from the second, x0.001 from the third (DEEN's x0.001 branch from epoch 120 is unreachable, METHODS.md 1.3;
# IFALNet's is reached at 90, METHODS.md 2.5).
FIXED_LR_MILESTONES = {"agw": (20, 50), "deen": (20, 80), "ifalnet": (20, 60, 90)}


def warmup_then_decade_steps(epoch, milestones) -> float:
    """The AGW-family schedule factor at 0-based `epoch` (REFERENCE 8.3), up to three milestones."""
    if epoch < 10:
        return (epoch + 1) / 10
    return (1.0, 0.1, 0.01, 0.001)[bisect.bisect_right(list(milestones), epoch)]   # literals, as the originals


# epoch -> factor of each fixed schedule (partials pickle plainly into the scheduler's state).
FIXED_LR_SCHEDULES = {name: functools.partial(warmup_then_decade_steps, milestones=milestones)
                      for name, milestones in FIXED_LR_MILESTONES.items()}


def make_lr_scheduler(optimizer, factor_fn) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `factor_fn(epoch)`; the constructor applies epoch 0, step() once per epoch END.

    Pass a picklable callable (a module-level function or functools.partial) so state_dict() is plain.
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=factor_fn)
