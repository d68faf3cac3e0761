"""Evaluate a trained model with the official SYSU-MM01, RegDB and LLCM test protocols (REFERENCE 2, 9).

    python test.py --dataset sysu --mode all --resume runs/sysu_irl_p4_n6_lr_0.1_seed_0_best.pth --gpu 0
    python test.py --dataset regdb --tvsearch True --resume 'runs/regdb_irl_p4_n6_lr_0.1_seed_0_trial_{trial}_best.pth'
    python test.py --dataset llcm --resume llcm_IRL_p4_n6_lr_0.1_seed_0_best.t      # official checkpoint
    python test.py --dataset sysu --resume ckpt.pth --rerank --by-camera --save-features f.npz
    python test.py --features f.npz --rerank tsme --modes sum     # re-evaluate saved features, no model/images

Features are extracted once per checkpoint (query set, and every gallery image any trial uses); each
gallery trial then only re-ranks. Prints Rank-1/5/10/20, mAP and mINP per feature / similarity mode as
mean and std over the trials and writes every per-trial number to a JSON file.

--rerank: k-reciprocal re-ranking of each trial's query and gallery together (labelled "re-ranked").
--by-camera: the metrics per gallery camera (each trial's gallery restricted to that camera, the protocol's
removal rules kept) and per query camera (that camera's queries against the whole gallery).
--features: re-evaluate a --save-features file with any modes, re-ranking or --by-camera; it reproduces the
numbers of the run that saved it exactly.
"""
import argparse
import os
import sys

import numpy as np

import data_manager
import evaluation
import methods
import model as models
import similarity
import utils

DATASETS = data_manager.DATASETS


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", choices=tuple(DATASETS), help="dataset (default sysu; with --features: the file's)")
    add("--data-path", dest="data_path", help="dataset root (default ./dataset/<SYSU-MM01|RegDB|LLCM>/)")
    add("--resume",
        help="checkpoint to evaluate (ours or official); for RegDB without --trial a pattern containing "
             "{trial}, e.g. 'runs/regdb_trial{trial}_best.pth'")
    add("--model_path", default="", help="folder prepended to --resume when --resume is a bare file name "
                                         "that does not exist as given (official style)")
    add("--mode", choices=("all", "indoor"), help="SYSU search mode (default all)")
    add("--shots", type=int, help="gallery images per (identity, camera): 1 = single-shot (official, default), "
                                  "10 = multi-shot (SYSU; LLCM: an extension)")
    add("--trial", type=int, help="RegDB: evaluate split 1..10 only; SYSU/LLCM: only gallery seed k")
    add("--num-trials", dest="num_trials", type=int, default=10, help="gallery trials / RegDB splits (10)")
    add("--tvsearch", nargs="?", const=True, default=False, type=utils.str2bool,
        help="RegDB thermal->visible (accepts the bare flag or True/False, Q-26)")
    add("--direction", choices=("ir2vis", "vis2ir"), help="LLCM search direction (default ir2vis, IRL README)")
    add("--deen-transposed", dest="deen_transposed", action="store_true",
        help="LLCM vis2ir only: DEEN's transposed computation (REFERENCE 10.3)")
    add("--modes", nargs="+", metavar="MODE",
        help="similarities to report: pool, bn, sum, weighted, or the method's own (e.g. MMN's bn_om); default: "
             "the method's official rows (AGW family: bn pool; LLCM: sum weighted pool bn)")
    add("--flip", action="store_true",
        help="flip test-time augmentation, CAJ's rule: features of the image and its mirror image averaged, then "
             "L2-normalised again (labelled 'flip' in the table and the JSON)")
    add("--method", choices=methods.names(), help="method of an official checkpoint (default irl; its official "
                                                  "input size unless --img_h/--img_w); ours store it")
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
    add("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
        help="channels-last memory format for feature extraction (default: on CUDA only; same features)")
    add("--output", help="results JSON (default: next to the checkpoint, or in --log_path)")
    add("--log_path", help="folder for the results JSON when --output is not given")
    add("--save-features", dest="save_features", metavar="NPZ", help="write query/gallery features here")
    add("--features", nargs="+", metavar="NPZ",
        help="re-evaluate features saved by --save-features (one file per RegDB split) instead of a model: any "
             "--modes, --rerank, --by-camera, --tvsearch / --deen-transposed; the protocol is the file's")
    add("--rerank", nargs="*", metavar="K1 K2 LAMBDA",
        help="k-reciprocal re-ranking (Zhong et al. 2017) of each trial's query + gallery jointly: bare flag = "
             "'field' preset (k1 20, k2 6, lambda 0.3), 'tsme' (31 19 0.3), or three values k1 k2 lambda. "
             "Not comparable with numbers published without re-ranking; labelled 're-ranked'")
    add("--by-camera", dest="by_camera", action="store_true",
        help="Rank-1/mAP/mINP per gallery camera (each trial's gallery restricted to that camera, removal rules "
             "kept) and per query camera (its queries against the whole gallery), and the best-worst gap")
    add("--low-light-cams", dest="low_light_cams", nargs="+", type=int, metavar="CAM",
        help="cameras to mark low-light in --by-camera (default: SYSU-MM01 cam3 cam6, its IR cameras in dark "
             "scenes; all nine LLCM cameras, filmed in low light; none for RegDB)")
    return p


# --------------------------------------------------------------------------------------------------
# Arguments -> protocol jobs
# --------------------------------------------------------------------------------------------------

def datasets_with(option):
    return " or ".join(f"--dataset {key}" for key, info in DATASETS.items() if option in info.options)


def rerank_parameters(values):
    """(preset name or None, {k1, k2, lambda_value}) of --rerank's values, or (None, None) without it."""
    if values is None:
        return None, None
    try:
        return evaluation.rerank_parameters(values)
    except ValueError as exc:
        raise utils.ConfigError(f"--rerank {' '.join(values)}: {exc}") from None


def apply_saved_options(args, options, path):
    """Take the protocol of a features file: its dataset, protocol options and flip, refusing flags that
    would need other images or features. --tvsearch and --deen-transposed only transpose the ranking of the
    same features, so they may be added to a run saved without them."""
    saved = options["protocol_options"]
    if args.dataset not in (None, options["dataset"]):
        raise utils.ConfigError(f"{path} holds {options['dataset']} features, not --dataset {args.dataset}")
    for key in ("mode", "shots", "direction"):
        if getattr(args, key) is not None and getattr(args, key) != saved[key]:
            raise utils.ConfigError(f"--{key} {getattr(args, key)}: {path} was saved with {key} {saved[key]}, "
                                    f"and other images cannot be evaluated without the model")
        # protocol_options names LLCM's default direction for every dataset; only LLCM takes the flag
        applies = key != "direction" or key in DATASETS[options["dataset"]].options
        setattr(args, key, saved[key] if applies else None)
    if args.flip and not options["flip"]:
        raise utils.ConfigError(f"--flip: {path} holds features without flip; flip needs the model and images")
    if args.resume or args.save_features or args.trial is not None:
        raise utils.ConfigError("--features replaces the model: --resume, --save-features and --trial do not "
                                "apply (the file holds its trials)")
    args.dataset, args.flip = options["dataset"], options["flip"]


def resolve_defaults(args):
    args.dataset = args.dataset or "sysu"
    args.mode = args.mode or "all"
    args.shots = 1 if args.shots is None else args.shots


def check_args(args):
    if not args.features and not args.resume:
        raise utils.ConfigError("give a checkpoint (--resume) or saved features (--features)")
    info = DATASETS[args.dataset]
    if args.tvsearch and "tvsearch" not in info.options:
        raise utils.ConfigError(f"--tvsearch applies to {datasets_with('tvsearch')} only")
    if args.direction and "direction" not in info.options:
        raise utils.ConfigError(f"--direction applies to {datasets_with('direction')} only")
    if args.deen_transposed and ("deen_transposed" not in info.options or args.direction != "vis2ir"):
        raise utils.ConfigError(f"--deen-transposed applies to {datasets_with('deen_transposed')} "
                                f"--direction vis2ir only")
    if args.shots < 1 or ("shots" not in info.options and args.shots != 1):
        raise utils.ConfigError(f"--shots {args.shots}: must be >= 1, and 1 for {info.name} (all test images "
                                f"are used)")
    if args.num_trials < 1:
        raise utils.ConfigError(f"--num-trials must be >= 1, got {args.num_trials}")
    if info.num_splits and args.trial is not None and not 1 <= args.trial <= info.num_splits:
        raise utils.ConfigError(f"--trial must be in 1..{info.num_splits} for {info.name}, got {args.trial}")
    if args.resume and "{trial}" in args.resume and not info.num_splits:
        raise utils.ConfigError("a {trial} pattern in --resume is for "
                                + ", ".join(i.name for i in DATASETS.values() if i.num_splits)
                                + " (one checkpoint per split)")


def protocol_options(args):
    """The test-protocol keyword arguments of data_manager.evaluation_protocol / protocol_label."""
    return {"mode": args.mode, "shots": args.shots, "tvsearch": bool(args.tvsearch),
            "direction": args.direction or "ir2vis", "deen_transposed": args.deen_transposed}


def checkpoint_path(args, trial=None):
    path = args.resume.replace("{trial}", str(trial)) if trial is not None else args.resume
    if not os.path.exists(path) and args.model_path:
        path = os.path.join(args.model_path, path)     # official: <model_path><resume>
    try:
        return utils.check_checkpoint_path(path)
    except utils.CheckpointError as exc:
        raise utils.CheckpointError(f"{exc}" + (f" (RegDB split {trial})" if trial is not None else "")) from None


def trained_split(ckpt, path, args):
    """The split (RegDB) a checkpoint of ours was trained on; official checkpoints do not record it."""
    config = ckpt.get("config") or {}
    if config.get("dataset") == args.dataset and config.get("trial") is not None:
        return int(config["trial"])
    if config.get("dataset") not in (None, args.dataset) and not args.allow_cross_dataset:
        raise utils.CheckpointError(dataset_mismatch(path, config["dataset"], args.dataset))
    raise utils.ConfigError(f"{DATASETS[args.dataset].name} evaluates {args.num_trials} splits, each with its own checkpoint, and {path} does "
                            f"not record its split: give --resume a pattern containing {{trial}} (e.g. "
                            f"'runs/regdb_..._trial_{{trial}}_best.pth') or pick one split with --trial")


def protocol_jobs(args, data_path):
    """[(protocol, checkpoint path, checkpoint if already loaded else None, split)]: one per split of a
    dataset with splits (RegDB), otherwise one with all gallery trials (split None)."""
    options = protocol_options(args)
    if DATASETS[args.dataset].num_splits:
        if args.trial is None and "{trial}" not in args.resume:     # one checkpoint: read it once
            path = checkpoint_path(args)
            ckpt = utils.load_torch_file(path)
            split = trained_split(ckpt, path, args)
            return [(data_manager.evaluation_protocol(args.dataset, data_path, split=split, **options), path, ckpt,
                     split)]
        splits = [args.trial] if args.trial is not None else list(range(1, args.num_trials + 1))
        paths = [checkpoint_path(args, t) for t in splits]     # every checkpoint must exist up front
        return [(data_manager.evaluation_protocol(args.dataset, data_path, split=t, **options), path, None, t)
                for t, path in zip(splits, paths)]
    trials = [args.trial] if args.trial is not None else list(range(args.num_trials))
    return [(data_manager.evaluation_protocol(args.dataset, data_path, trials=trials, **options),
             checkpoint_path(args), None, None)]


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
        if trial is not None and cfg.get("dataset") == args.dataset and int(cfg.get("trial", trial)) != trial:
            raise utils.CheckpointError(f"{path} was trained on {DATASETS[args.dataset].name} split "
                                        f"{cfg.get('trial')}, but is used for split {trial}")
        settings = {k: cfg[k] for k in ("method", "arch", "img_h", "img_w", "num_classes")}
        clashes = [f"--{k} {getattr(args, k)} (checkpoint: {settings[k]})"
                   for k in ("method", "arch", "img_h", "img_w", "num_classes")
                   if getattr(args, k) is not None and getattr(args, k) != settings[k]]
        if clashes:
            raise utils.CheckpointError(f"{path} does not match the flags: {', '.join(clashes)}")
        return {**settings, "source": "vireid checkpoint"}
    state = ckpt.get("net")
    method = args.method or "irl"
    classifier = methods.get(method).classifier_key()
    if not isinstance(state, dict) or classifier not in state:
        raise utils.CheckpointError(f"{path} is neither a {models.CHECKPOINT_FORMAT} checkpoint nor an official "
                                    f"{method} one (dict with 'net' holding {classifier}; --method names another)")
    num_classes = int(state[classifier].shape[0])
    expected = args.num_classes or (None if args.allow_cross_dataset else DATASETS[args.dataset].official_num_classes)
    if expected is not None and num_classes != expected:
        raise utils.CheckpointError(f"{path} has {num_classes} classes but {expected} were expected for "
                                    f"{args.dataset}: wrong checkpoint for this dataset? (--num-classes N or "
                                    f"--allow-cross-dataset to evaluate it anyway)")
    recipe = methods.get(method).defaults
    return {"method": method, "arch": args.arch or "resnet50", "img_h": args.img_h or recipe["img_h"],
            "img_w": args.img_w or recipe["img_w"], "num_classes": num_classes, "source": "official checkpoint"}


def load_model(ckpt, path, args, device, trial=None):
    settings = model_settings(ckpt, path, args, trial)
    # The network variant of the dataset it was trained on (DEEN's RegDB variant differs), also across datasets.
    trained_on = (ckpt.get("config") or {}).get("dataset") or args.dataset
    net = methods.get(settings["method"]).build_model(settings["num_classes"], settings["arch"], settings["img_h"],
                                                      settings["img_w"], dataset=trained_on,
                                                      options=ckpt.get("config"))
    models.load_checkpoint(net, ckpt, source=path)
    return net.to(device).eval(), settings


def per_trial_path(path, trial, many):
    if not many:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_trial{trial}{ext or '.npz'}"


def rerank_tag(args):
    """'' without re-ranking; '-rerank' with the field preset, '-rerank-tsme', or '-rerank-<k1>-<k2>-<lambda>'."""
    preset, parameters = rerank_parameters(args.rerank)
    if parameters is None:
        return ""
    if preset == "field":
        return "-rerank"
    return f"-rerank-{preset or '-'.join(str(parameters[k]) for k in ('k1', 'k2', 'lambda_value'))}"


def protocol_name(args):
    return (data_manager.protocol_label(args.dataset, **protocol_options(args)) + ("-flip" if args.flip else "")
            + rerank_tag(args))


def output_path(args, first_source):
    """--output, else <checkpoint or features stem>_<protocol name>.json next to it (or in --log_path)."""
    if args.output:
        return args.output
    source = args.resume.replace("{trial}", "all") if args.resume else first_source
    stem = os.path.splitext(os.path.basename(source))[0]
    folder = args.log_path or os.path.dirname(os.path.abspath(first_source))
    return os.path.join(folder, f"{stem}_{protocol_name(args)}.json")


def saved_protocols(args):
    """(protocol, query features, gallery features, options) of every --features file, after taking the
    saved run's protocol options into args; --tvsearch / --deen-transposed set the transposition."""
    loaded = []
    for path in args.features:
        try:
            protocol, query, gallery, options = evaluation.load_features(path)
        except evaluation.FeaturesFileError as exc:
            raise utils.ConfigError(str(exc)) from None
        apply_saved_options(args, options, path)
        loaded.append((protocol, query, gallery, options))
    saved = loaded[0][3]["protocol_options"]
    args.tvsearch = bool(args.tvsearch or saved["tvsearch"])
    args.deen_transposed = bool(args.deen_transposed or saved["deen_transposed"])
    check_args(args)
    for protocol, _, _, _ in loaded:
        protocol.transpose = bool(args.tvsearch or args.deen_transposed)
    return loaded


def model_evaluations(args, log, data_path, distance):
    """Per protocol job: (protocol, evaluate_protocol result, settings, checkpoint key, source path), from the
    checkpoints' models; writes --save-features files on the way."""
    device = utils.resolve_device(args.device, args.gpu, logger=log)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
    jobs = protocol_jobs(args, data_path)
    modes = None
    for protocol, path, ckpt, split in jobs:
        net, settings = load_model(utils.load_torch_file(path) if ckpt is None else ckpt, path, args, device, split)
        log.info(f"{protocol.name}: {path} ({settings['source']}: {settings['method']} {settings['arch']} "
                 f"{settings['img_h']}x{settings['img_w']}, {settings['num_classes']} classes)")
        method = methods.get(settings["method"])
        modes = modes or method.check_modes(args.modes or method.modes(args.dataset))
        protocol = protocol.used_gallery_only()
        if len(protocol.trial_indices) > 1 and all(np.array_equal(protocol.trial_indices[0], t)
                                                   for t in protocol.trial_indices[1:]):
            log.info(f"note: every gallery trial of {protocol.name} holds the same images (--shots {args.shots} "
                     f"covers every (identity, camera) folder), so the {len(protocol.trials)} trials are identical "
                     f"and their std is 0")
        result, query, gallery = evaluation.evaluate(net, protocol, settings["img_h"], settings["img_w"],
                                                     args.test_batch, args.workers, device, modes,
                                                     fusions=method.similarity_modes(), flip=args.flip,
                                                     channels_last=args.channels_last,
                                                     warn=log.warning, distance=distance, by_camera=args.by_camera)
        key = "all" if split is None else str(split)
        if args.save_features:
            options = {"dataset": args.dataset, "data_path": data_path, "protocol_options": protocol_options(args),
                       "flip": args.flip, "model": settings, "checkpoint": {key: path}}
            evaluation.save_features(per_trial_path(args.save_features, split, len(jobs) > 1), protocol, query,
                                     gallery, options)
        yield protocol, result, settings, key, path, modes


def feature_evaluations(args, log, loaded, distance):
    """Like model_evaluations, from the loaded --features files (saved_protocols): their model settings and
    checkpoints as saved."""
    for path, (protocol, query, gallery, options) in zip(args.features, loaded):
        log.info(f"{protocol.name}: features {path} (saved from {', '.join(options['checkpoint'].values())})")
        method = methods.get(options["model"]["method"])
        modes = method.check_modes(args.modes or method.modes(args.dataset))
        result = evaluation.evaluate_features(query, gallery, protocol, modes, fusions=method.similarity_modes(),
                                              warn=log.warning, distance=distance, by_camera=args.by_camera)
        (key, checkpoint), = options["checkpoint"].items()
        yield protocol, result, options["model"], key, checkpoint, modes


def run_test(args):
    log = utils.setup_logger("test")
    if args.features:
        loaded = saved_protocols(args)
        data_path = loaded[0][3]["data_path"]
    else:
        resolve_defaults(args)
        check_args(args)
        data_path = args.data_path or DATASETS[args.dataset].default_path
    preset, rerank_params = rerank_parameters(args.rerank)
    distance = (similarity.negative_similarity if rerank_params is None
                else evaluation.reranked_distance(**rerank_params))
    if args.features:
        evaluations = feature_evaluations(args, log, loaded, distance)
    else:
        evaluations = model_evaluations(args, log, data_path, distance)
    modes, per_trial, by_camera, checkpoints, settings, protocol_info = None, None, None, {}, None, None
    several_cameras = False
    for protocol, result, settings, key, path, modes in evaluations:
        if per_trial is None:
            per_trial, by_camera = {mode: [] for mode in modes}, {mode: [] for mode in modes}
        for mode in modes:
            per_trial[mode].extend(result["per_trial"][mode])
            if args.by_camera:
                by_camera[mode].extend(result["by_camera"][mode])
        first_label = mode_labels(args, settings)[modes[0]]
        for entry in result["per_trial"][modes[0]]:
            log.info(f"  trial {entry['trial']}: {first_label} Rank-1 {100 * entry['cmc'][0]:.2f}% "
                     f"mAP {100 * entry['mAP']:.2f}% mINP {100 * entry['mINP']:.2f}%")
        checkpoints[key] = path
        several_cameras = several_cameras or evaluation.has_several_cameras(protocol)
        if protocol_info is None:
            first = protocol.trial_indices[0]
            protocol_info = {"num_query": len(protocol.query_pids), "num_gallery": len(first),
                             "num_gallery_ids": int(len(np.unique(np.asarray(protocol.gallery_pids)[first])))}
    info = DATASETS[args.dataset]
    mean, std = evaluation.summarise(per_trial)
    trials = [entry["trial"] for entry in per_trial[modes[0]]]
    title = (f"{protocol_name(args)}: mean ± std over {len(trials)} "
             f"{'split' if info.num_splits else 'gallery trial'}{'s' if len(trials) > 1 else ''} (%)")
    log.info("\n" + evaluation.results_table(mean, std, modes, title, mode_labels(args, settings)))
    options = protocol_options(args)
    summary = {"dataset": args.dataset, "data_path": data_path,
               "protocol": {"name": protocol_name(args),
                            **{key: options[key] if key in info.options else None
                               for key in ("mode", "tvsearch", "direction")},
                            "shots": args.shots, "deen_transposed": args.deen_transposed, "flip": args.flip,
                            "rerank": None if rerank_params is None else {"preset": preset, **rerank_params},
                            "trials": trials, "modes": list(modes), **protocol_info},
               "model": settings, "checkpoints": checkpoints,
               "per_trial": per_trial, "mean": mean, "std": std}
    if args.features:
        summary["features"] = list(args.features)
    if args.by_camera:
        summary["by_camera"] = camera_results(args, info, by_camera, several_cameras, modes, log,
                                              mode_labels(args, settings))
    out = output_path(args, args.features[0] if args.features else checkpoints[next(iter(checkpoints))])
    utils.save_json_atomic(summary, out)
    log.info(f"Results written to {out}")
    return 0


def camera_results(args, info, by_camera, several_cameras, modes, log, labels):
    """The JSON "by_camera" entry, with its table logged; a note instead where every side has one camera."""
    low_light = tuple(args.low_light_cams if args.low_light_cams is not None else info.low_light_cams)
    if not several_cameras:
        note = (f"{info.name} has one camera each way (one query camera, one gallery camera): per-camera "
                f"numbers equal the overall ones, so there is no per-camera table")
        log.info(note)
        return {"note": note, "low_light_cameras": list(low_light)}
    summary = evaluation.summarise_by_camera(by_camera)
    title = f"{protocol_name(args)}: per camera, mean ± std over the trials where the camera has a valid query (%)"
    log.info("\n" + evaluation.by_camera_table(summary, modes, title, labels, low_light))
    return {"low_light_cameras": list(low_light), "summary": summary, "per_trial": by_camera}


def mode_labels(args, settings):
    """Row labels of the similarity modes (the method's own names where it has them, e.g. DEEN's S7/S8); the
    test-time options that change the features are named in them."""
    names = methods.get(settings["method"]).mode_labels()
    return {mode: label + (" + flip" if args.flip else "") + (" + re-ranked" if args.rerank is not None else "")
            for mode, label in names.items()}


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run_test(args)
    except (data_manager.DatasetError, utils.CheckpointError, utils.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
