"""Evaluate a trained model with the official SYSU-MM01, RegDB and LLCM test protocols (REFERENCE 2, 9).

    python test.py --dataset sysu --mode all --resume runs/sysu_irl_p4_n6_lr_0.1_seed_0_best.pth --gpu 0
    python test.py --dataset regdb --tvsearch True --resume 'runs/regdb_irl_p4_n6_lr_0.1_seed_0_trial_{trial}_best.pth'
    python test.py --dataset llcm --resume llcm_IRL_p4_n6_lr_0.1_seed_0_best.t      # official checkpoint

Features are extracted once per checkpoint (query set, and every gallery image any trial uses); each
gallery trial then only re-ranks. Prints Rank-1/5/10/20, mAP and mINP per feature / similarity mode as
mean and std over the trials and writes every per-trial number to a JSON file.
"""
import argparse
import os
import sys

import numpy as np

import data_loader
import data_manager
import eval_metrics
import model as models
import utils

# Classifier sizes of the released models (REFERENCE 9): a mismatch usually means the wrong checkpoint.
OFFICIAL_NUM_CLASSES = {"sysu": 395, "regdb": 206, "llcm": 713}
METHOD_IMG_SIZE = {"irl": (384, 192), "agw": (288, 144)}
DEFAULT_MODES = {"sysu": ("bn", "pool"), "regdb": ("bn", "pool"), "llcm": ("sum", "weighted", "pool", "bn")}
MODE_LABELS = {"bn": "bn (FC)", "pool": "pool", "sum": "sum (pool+bn)", "weighted": "weighted (0.1/0.9)"}
RANKS = (1, 5, 10, 20)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", choices=tuple(data_manager.DEFAULT_DATA_PATHS), default="sysu")
    add("--data-path", dest="data_path", help="dataset root (default ./dataset/<SYSU-MM01|RegDB|LLCM>/)")
    add("--resume", required=True,
        help="checkpoint to evaluate (ours or official); for RegDB without --trial a pattern containing "
             "{trial}, e.g. 'runs/regdb_trial{trial}_best.pth'")
    add("--model_path", default="", help="folder prepended to --resume when --resume is a bare file name "
                                         "that does not exist as given (official style)")
    add("--mode", choices=("all", "indoor"), default="all", help="SYSU search mode")
    add("--shots", type=int, default=1, help="gallery images per (identity, camera): 1 = single-shot "
                                             "(official), 10 = multi-shot (SYSU/LLCM)")
    add("--trial", type=int, help="RegDB: evaluate split 1..10 only; SYSU/LLCM: only gallery seed k")
    add("--num-trials", dest="num_trials", type=int, default=10, help="gallery trials / RegDB splits (10)")
    add("--tvsearch", nargs="?", const=True, default=False, type=utils.str2bool,
        help="RegDB thermal->visible (accepts the bare flag or True/False, Q-26)")
    add("--direction", choices=("ir2vis", "vis2ir"), help="LLCM search direction (default ir2vis, IRL README)")
    add("--deen-transposed", dest="deen_transposed", action="store_true",
        help="LLCM vis2ir only: DEEN's transposed computation (REFERENCE 10.3)")
    add("--modes", nargs="+", choices=eval_metrics.SIMILARITY_MODES,
        help="similarities to report (default: LLCM sum weighted pool bn; SYSU/RegDB bn pool)")
    add("--method", choices=tuple(METHOD_IMG_SIZE), help="model of an official checkpoint (default irl); "
                                                        "ours store it")
    add("--arch", choices=("resnet50", "resnet18", "resnet34"), help="backbone of an official checkpoint "
                                                                     "(default resnet50)")
    add("--img_h", type=int, help="input height of an official checkpoint (IRL 384, AGW 288)")
    add("--img_w", type=int, help="input width of an official checkpoint (IRL 192, AGW 144)")
    add("--num-classes", dest="num_classes", type=int, help="expected classifier size (checked)")
    add("--allow-cross-dataset", dest="allow_cross_dataset", action="store_true",
        help="evaluate a checkpoint trained on another dataset (skips the dataset / class-count check)")
    add("--test-batch", dest="test_batch", type=int, default=64, help="extraction batch size")
    add("--workers", type=int, default=utils.default_workers(), help="loader processes (default 4, at most "
                                                                     "the CPU count)")
    add("--gpu", default="0", help="CUDA device index")
    add("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    add("--output", help="results JSON (default: next to the checkpoint, or in --log_path)")
    add("--log_path", help="folder for the results JSON when --output is not given")
    add("--save-features", dest="save_features", metavar="NPZ", help="write query/gallery features here")
    return p


# --------------------------------------------------------------------------------------------------
# Arguments -> protocol jobs
# --------------------------------------------------------------------------------------------------

def check_args(args):
    if args.tvsearch and args.dataset != "regdb":
        raise utils.ConfigError("--tvsearch applies to --dataset regdb only")
    if args.direction and args.dataset != "llcm":
        raise utils.ConfigError("--direction applies to --dataset llcm only")
    if args.deen_transposed and (args.dataset != "llcm" or args.direction != "vis2ir"):
        raise utils.ConfigError("--deen-transposed applies to --dataset llcm --direction vis2ir only")
    if args.shots < 1 or (args.dataset == "regdb" and args.shots != 1):
        raise utils.ConfigError(f"--shots {args.shots}: must be >= 1, and 1 for RegDB (all test images are used)")
    if args.num_trials < 1:
        raise utils.ConfigError(f"--num-trials must be >= 1, got {args.num_trials}")
    if args.dataset == "regdb" and args.trial is not None and not 1 <= args.trial <= 10:
        raise utils.ConfigError(f"--trial must be in 1..10 for RegDB, got {args.trial}")
    if "{trial}" in args.resume and args.dataset != "regdb":
        raise utils.ConfigError("a {trial} pattern in --resume is for RegDB (one checkpoint per split)")


def checkpoint_path(args, trial=None):
    path = args.resume.replace("{trial}", str(trial)) if trial is not None else args.resume
    if not os.path.exists(path) and args.model_path:
        path = os.path.join(args.model_path, path)     # official: <model_path><resume>
    try:
        return utils.check_checkpoint_path(path)
    except utils.CheckpointError as exc:
        raise utils.CheckpointError(f"{exc}" + (f" (RegDB split {trial})" if trial is not None else "")) from None


def trained_split(ckpt, path, args):
    """The RegDB split a checkpoint of ours was trained on; official checkpoints do not record it."""
    config = ckpt.get("config") or {}
    if config.get("dataset") == "regdb" and config.get("trial") is not None:
        return int(config["trial"])
    if config.get("dataset") not in (None, "regdb") and not args.allow_cross_dataset:
        raise utils.CheckpointError(dataset_mismatch(path, config["dataset"], args.dataset))
    raise utils.ConfigError(f"RegDB evaluates {args.num_trials} splits, each with its own checkpoint, and {path} does "
                            f"not record its split: give --resume a pattern containing {{trial}} (e.g. "
                            f"'runs/regdb_..._trial_{{trial}}_best.pth') or pick one split with --trial")


def protocol_jobs(args, data_path):
    """[(protocol, checkpoint path, checkpoint if already loaded else None)]: one per RegDB split,
    otherwise one with all gallery trials."""
    if args.dataset == "regdb":
        if args.trial is None and "{trial}" not in args.resume:     # one checkpoint: read it once
            path = checkpoint_path(args)
            ckpt = utils.load_torch_file(path)
            split = trained_split(ckpt, path, args)
            return [(data_manager.regdb_protocol(data_path, split, tvsearch=args.tvsearch), path, ckpt)]
        splits = [args.trial] if args.trial is not None else list(range(1, args.num_trials + 1))
        paths = [checkpoint_path(args, t) for t in splits]     # every checkpoint must exist up front
        return [(data_manager.regdb_protocol(data_path, t, tvsearch=args.tvsearch), path, None)
                for t, path in zip(splits, paths)]
    trials = [args.trial] if args.trial is not None else list(range(args.num_trials))
    if args.dataset == "sysu":
        protocol = data_manager.sysu_protocol(data_path, mode=args.mode, trials=trials, shots=args.shots)
    else:
        protocol = data_manager.llcm_protocol(data_path, direction=args.direction or "ir2vis", trials=trials,
                                              shots=args.shots, deen_transposed=args.deen_transposed)
    return [(protocol, checkpoint_path(args), None)]


# --------------------------------------------------------------------------------------------------
# Checkpoint -> model
# --------------------------------------------------------------------------------------------------

def dataset_mismatch(path, trained_on, dataset):
    return f"{path} was trained on {trained_on}, not {dataset} (pass --allow-cross-dataset to evaluate it anyway)"


def model_settings(ckpt, path, args, trial=None):
    """(method, arch, img_h, img_w, num_classes, source) of a checkpoint, checked against the flags."""
    if ckpt.get("format") == models.CHECKPOINT_FORMAT:
        cfg = ckpt["config"]
        if cfg.get("dataset") != args.dataset and not args.allow_cross_dataset:
            raise utils.CheckpointError(dataset_mismatch(path, cfg.get("dataset"), args.dataset))
        if trial is not None and cfg.get("dataset") == "regdb" and int(cfg.get("trial", trial)) != trial:
            raise utils.CheckpointError(f"{path} was trained on RegDB split {cfg.get('trial')}, "
                                        f"but is used for split {trial}")
        settings = {k: cfg[k] for k in ("method", "arch", "img_h", "img_w", "num_classes")}
        clashes = [f"--{k} {getattr(args, k)} (checkpoint: {settings[k]})"
                   for k in ("method", "arch", "img_h", "img_w", "num_classes")
                   if getattr(args, k) is not None and getattr(args, k) != settings[k]]
        if clashes:
            raise utils.CheckpointError(f"{path} does not match the flags: {', '.join(clashes)}")
        return {**settings, "source": "vireid checkpoint"}
    state = ckpt.get("net")
    if not isinstance(state, dict) or "classifier.weight" not in state:
        raise utils.CheckpointError(f"{path} is neither a {models.CHECKPOINT_FORMAT} checkpoint nor an official one "
                                    f"(dict with 'net' holding classifier.weight)")
    method = args.method or "irl"
    num_classes = int(state["classifier.weight"].shape[0])
    expected = args.num_classes or (None if args.allow_cross_dataset else OFFICIAL_NUM_CLASSES[args.dataset])
    if expected is not None and num_classes != expected:
        raise utils.CheckpointError(f"{path} has {num_classes} classes but {expected} were expected for "
                                    f"{args.dataset}: wrong checkpoint for this dataset? (--num-classes N or "
                                    f"--allow-cross-dataset to evaluate it anyway)")
    img_h, img_w = METHOD_IMG_SIZE[method]
    return {"method": method, "arch": args.arch or "resnet50", "img_h": args.img_h or img_h,
            "img_w": args.img_w or img_w, "num_classes": num_classes, "source": "official checkpoint"}


def load_model(ckpt, path, args, device, trial=None):
    settings = model_settings(ckpt, path, args, trial)
    net = models.build_model(settings["method"], settings["num_classes"], settings["arch"], settings["img_h"],
                             settings["img_w"], pretrained=None)
    models.load_checkpoint(net, ckpt, source=path)
    return net.to(device).eval(), settings


# --------------------------------------------------------------------------------------------------
# Features and metrics
# --------------------------------------------------------------------------------------------------

def extract(net, paths, pids, modal, settings, args, device):
    loader = data_loader.make_test_loader(list(paths), np.asarray(pids), settings["img_h"], settings["img_w"],
                                          args.test_batch, args.workers)
    pool, bn = models.extract_features(net, loader, modal, device, progress=True)
    return {"pool": pool, "bn": bn}


def padded_cmc(cmc, length=max(RANKS)):
    """CMC extended to `length` ranks with its last value (the metrics stop at the gallery size)."""
    return list(cmc) + [cmc[-1]] * (length - len(cmc))


def summarise(per_trial):
    """Mean and population std over trials of the CMC curve (padded to 20 ranks), mAP and mINP."""
    def reduce(results, fn):
        return {"cmc": fn([padded_cmc(r["cmc"]) for r in results], axis=0).tolist(),
                "mAP": float(fn([r["mAP"] for r in results])), "mINP": float(fn([r["mINP"] for r in results]))}
    return ({m: reduce(r, np.mean) for m, r in per_trial.items()},
            {m: reduce(r, np.std) for m, r in per_trial.items()})


def results_table(mean, std, modes, title):
    def cell(m, s):
        return f"{100 * m:.2f} ± {100 * s:.2f}"
    rows = []
    for mode in modes:
        row = {"feature": MODE_LABELS[mode]}
        for r in RANKS:
            row[f"Rank-{r}"] = cell(mean[mode]["cmc"][r - 1], std[mode]["cmc"][r - 1])
        row["mAP"] = cell(mean[mode]["mAP"], std[mode]["mAP"])
        row["mINP"] = cell(mean[mode]["mINP"], std[mode]["mINP"])
        rows.append(row)
    return utils.format_table(rows, ["feature"] + [f"Rank-{r}" for r in RANKS] + ["mAP", "mINP"], title=title)


def save_features(path, protocol, query, gallery):
    arrays = {"protocol": np.array(protocol.name),
              "query_pool": query["pool"].astype(np.float32), "query_bn": query["bn"].astype(np.float32),
              "query_pids": np.asarray(protocol.query_pids), "query_cams": np.asarray(protocol.query_cams),
              "query_paths": np.array(protocol.query_paths, dtype=str), "query_modal": np.array(protocol.query_modal),
              "gallery_pool": gallery["pool"].astype(np.float32), "gallery_bn": gallery["bn"].astype(np.float32),
              "gallery_pids": np.asarray(protocol.gallery_pids), "gallery_cams": np.asarray(protocol.gallery_cams),
              "gallery_paths": np.array(protocol.gallery_paths, dtype=str),
              "gallery_modal": np.array(protocol.gallery_modal), "trials": np.asarray(protocol.trials, dtype=np.int64),
              "transpose": np.array(bool(protocol.transpose))}
    if len({len(t) for t in protocol.trial_indices}) == 1:
        arrays["gallery_trial_indices"] = np.stack(protocol.trial_indices).astype(np.int64)
    else:
        for t, idx in zip(protocol.trials, protocol.trial_indices):
            arrays[f"gallery_trial{t}_indices"] = np.asarray(idx, dtype=np.int64)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez(path, **arrays)


def per_trial_path(path, trial, many):
    if not many:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_trial{trial}{ext or '.npz'}"


def protocol_name(args):
    if args.dataset == "sysu":
        return f"sysu-{args.mode}-" + ("single" if args.shots == 1 else f"multi{args.shots}")
    if args.dataset == "regdb":
        return "regdb-" + ("t2v" if args.tvsearch else "v2t")
    return (f"llcm-{args.direction or 'ir2vis'}-" + ("single" if args.shots == 1 else f"multi{args.shots}")
            + ("-deen" if args.deen_transposed else ""))


def output_path(args, first_checkpoint):
    if args.output:
        return args.output
    stem = os.path.splitext(os.path.basename(args.resume.replace("{trial}", "all")))[0]
    folder = args.log_path or os.path.dirname(os.path.abspath(first_checkpoint))
    return os.path.join(folder, f"{stem}_{protocol_name(args)}.json")


def run_test(args):
    check_args(args)
    log = utils.setup_logger("test")
    device = utils.resolve_device(args.device, args.gpu, logger=log)
    data_path = args.data_path or data_manager.DEFAULT_DATA_PATHS[args.dataset]
    modes = tuple(args.modes or DEFAULT_MODES[args.dataset])
    jobs = protocol_jobs(args, data_path)
    per_trial = {mode: [] for mode in modes}
    checkpoints, settings, protocol_info = {}, None, None
    for protocol, path, ckpt in jobs:
        split = protocol.trials[0] if args.dataset == "regdb" else None
        net, settings = load_model(utils.load_torch_file(path) if ckpt is None else ckpt, path, args, device, split)
        log.info(f"{protocol.name}: {path} ({settings['source']}: {settings['method']} {settings['arch']} "
                 f"{settings['img_h']}x{settings['img_w']}, {settings['num_classes']} classes)")
        protocol = protocol.used_gallery_only()
        if len(protocol.trial_indices) > 1 and all(np.array_equal(protocol.trial_indices[0], t)
                                                   for t in protocol.trial_indices[1:]):
            log.info(f"note: every gallery trial of {protocol.name} holds the same images (--shots {args.shots} "
                     f"covers every (identity, camera) folder), so the {len(protocol.trials)} trials are identical "
                     f"and their std is 0")
        query = extract(net, protocol.query_paths, protocol.query_pids, protocol.query_modal, settings, args, device)
        gallery = extract(net, protocol.gallery_paths, protocol.gallery_pids, protocol.gallery_modal, settings,
                          args, device)
        for message in eval_metrics.non_finite_warnings(query, gallery):
            log.warning(message)
        result = eval_metrics.evaluate_protocol(query, gallery, protocol, modes=modes)
        for mode in modes:
            per_trial[mode].extend(result["per_trial"][mode])
        for entry in result["per_trial"][modes[0]]:
            log.info(f"  trial {entry['trial']}: {MODE_LABELS[modes[0]]} Rank-1 {100 * entry['cmc'][0]:.2f}% "
                     f"mAP {100 * entry['mAP']:.2f}% mINP {100 * entry['mINP']:.2f}%")
        checkpoints["all" if split is None else str(split)] = path
        if protocol_info is None:
            first = protocol.trial_indices[0]
            protocol_info = {"num_query": len(protocol.query_paths), "num_gallery": len(first),
                             "num_gallery_ids": int(len(np.unique(np.asarray(protocol.gallery_pids)[first])))}
        if args.save_features:
            save_features(per_trial_path(args.save_features, split, len(jobs) > 1), protocol, query, gallery)
    mean, std = summarise(per_trial)
    trials = [entry["trial"] for entry in per_trial[modes[0]]]
    title = (f"{protocol_name(args)}: mean ± std over {len(trials)} "
             f"{'split' if args.dataset == 'regdb' else 'gallery trial'}{'s' if len(trials) > 1 else ''} (%)")
    log.info("\n" + results_table(mean, std, modes, title))
    summary = {"dataset": args.dataset, "data_path": data_path,
               "protocol": {"name": protocol_name(args), "mode": args.mode if args.dataset == "sysu" else None,
                            "shots": args.shots, "tvsearch": bool(args.tvsearch) if args.dataset == "regdb" else None,
                            "direction": (args.direction or "ir2vis") if args.dataset == "llcm" else None,
                            "deen_transposed": args.deen_transposed, "trials": trials, "modes": list(modes),
                            **protocol_info},
               "model": settings, "checkpoints": checkpoints,
               "per_trial": per_trial, "mean": mean, "std": std}
    out = output_path(args, jobs[0][1])
    utils.save_json_atomic(summary, out)
    log.info(f"Results written to {out}")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run_test(args)
    except (data_manager.DatasetError, utils.CheckpointError, utils.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
