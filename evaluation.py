"""Evaluation shared by train.py (every few epochs) and test.py: features of a protocol's images, the
metrics over its trials, the summary over trials, the results table and the features file.

Features are extracted once per protocol (the query set, and every gallery image some trial uses); each
gallery trial then only re-ranks (eval_metrics.evaluate_protocol).
"""
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import torch

import data_loader
import eval_metrics
import model as models
import rerank
import similarity
import utils

RANKS = (1, 5, 10, 20)


def extract(net, paths, pids, modal, img_h, img_w, batch_size, workers, device, *, flip=False, channels_last=False,
            progress=True):
    """{feature name: float64 L2-normalised features} of the images at `paths` through the stems of `modal`
    (model.extract_features)."""
    loader = data_loader.make_test_loader(list(paths), np.asarray(pids), img_h, img_w, batch_size, workers,
                                          pin_memory=torch.device(device).type == "cuda")
    return models.extract_features(net, loader, modal, device, flip=flip, channels_last=channels_last,
                                   progress=progress)


def evaluate(net, protocol, img_h, img_w, batch_size, workers, device, modes, *, fusions=similarity.STANDARD_FUSIONS,
             flip=False, channels_last=False, progress=True, warn=None, distance=similarity.negative_similarity,
             by_camera=False):
    """(result of eval_metrics.evaluate_protocol, query features, gallery features) of `protocol`, whose
    gallery should hold only the images its trials use (TestProtocol.used_gallery_only). `warn(line)`
    receives one line per side whose features are not finite. modes, fusions, distance, by_camera: see
    eval_metrics.evaluate_protocol (the method's `similarity_modes()` are its fusions; reranked_distance
    re-ranks)."""
    sides = {}
    for side, paths, pids, modal in (("query", protocol.query_paths, protocol.query_pids, protocol.query_modal),
                                     ("gallery", protocol.gallery_paths, protocol.gallery_pids, protocol.gallery_modal)):
        sides[side] = extract(net, paths, pids, modal, img_h, img_w, batch_size, workers, device, flip=flip,
                              channels_last=channels_last, progress=progress)
    result = evaluate_features(sides["query"], sides["gallery"], protocol, modes, fusions=fusions, warn=warn,
                               distance=distance, by_camera=by_camera)
    return result, sides["query"], sides["gallery"]


def evaluate_features(query, gallery, protocol, modes, *, fusions=similarity.STANDARD_FUSIONS, warn=None,
                      distance=similarity.negative_similarity, by_camera=False):
    """eval_metrics.evaluate_protocol of extracted or saved features; `warn(line)` receives one line per side
    whose features are not finite."""
    for message in eval_metrics.non_finite_warnings(query, gallery):
        if warn is not None:
            warn(message)
    return eval_metrics.evaluate_protocol(query, gallery, protocol, modes=modes, fusions=fusions, distance=distance,
                                          by_camera=by_camera)


def reranked_distance(k1, k2, lambda_value):
    """A distance for eval_metrics.evaluate_protocol: k-reciprocal re-ranking (rerank.re_ranking) of each
    trial's rows and columns together, as the standard implementation re-ranks query + gallery jointly,
    from the unit vectors that rank like the similarity (similarity.embedding; ConfigError for fusions that
    have none, such as cross-feature or min/max ones). The embeddings go in as float32: re_ranking squares the
    distances into float32 anyway, and its three input matrices are then half the size (at the LLCM size
    7,000 + 3,500 items: 340 MB instead of 690 MB).

    Only the gallery changes between trials, so each fusion keeps a rerank.ReusingFeatureDistances: the query
    x query distances are computed once per fusion and reused while the query embedding stays the same bit
    for bit (compared at every call, so other features or fusions never get them). At the LLCM size that
    holds about 0.33 GB per one-feature fusion (0.42 GB for pool + bn) for as long as the distance lives."""
    feature_distances = {}                     # {fusion's feature weights: rerank.ReusingFeatureDistances}

    def distance(row_feats, column_feats, fusion):
        weights = fusion.embedding_weights()
        if weights is None:
            raise utils.ConfigError("re-ranking needs one feature per image that ranks like the similarity, and "
                                    "this mode has none (cross-feature, min or max terms): choose another --modes")
        rows, columns = (similarity.embedding({key: np.asarray(feats[key], dtype=np.float32) for key in weights},
                                              fusion)
                         for feats in (row_feats, column_feats))
        if not (np.isfinite(rows).all() and np.isfinite(columns).all()):
            raise utils.ConfigError("re-ranking needs finite features, and some are not (see the warning above): "
                                    "evaluate without --rerank")
        reusing = feature_distances.setdefault(tuple(weights.items()), rerank.ReusingFeatureDistances())
        return rerank.re_ranking(*reusing(rows, columns), k1, k2, lambda_value)
    return distance


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


def _percent_cell(mean, std):
    """'mean ± std' of two fractions in %, or '-' without a mean (a camera with no valid query)."""
    return "-" if mean is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def results_table(mean, std, modes, title, labels=similarity.STANDARD_LABELS):
    """Rank-1/5/10/20, mAP and mINP as 'mean ± std' in %, one row per similarity mode."""
    rows = []
    for mode in modes:
        row = {"feature": labels[mode]}
        for r in RANKS:
            row[f"Rank-{r}"] = _percent_cell(mean[mode]["cmc"][r - 1], std[mode]["cmc"][r - 1])
        row["mAP"] = _percent_cell(mean[mode]["mAP"], std[mode]["mAP"])
        row["mINP"] = _percent_cell(mean[mode]["mINP"], std[mode]["mINP"])
        rows.append(row)
    return utils.format_table(rows, ["feature"] + [f"Rank-{r}" for r in RANKS] + ["mAP", "mINP"], title=title)


def rerank_parameters(values):
    """(preset name or None, {k1, k2, lambda_value}) of a list of words: [] = the field preset, [name] = a
    preset of rerank.RERANK_PRESETS, [k1, k2, lambda]; ValueError with a one-line reason otherwise."""
    if len(values) <= 1:
        name = values[0] if values else "field"
        if name not in rerank.RERANK_PRESETS:
            raise ValueError(f"expected a preset ({', '.join(rerank.RERANK_PRESETS)}) or three values k1 k2 lambda")
        return name, dict(rerank.RERANK_PRESETS[name])
    if len(values) != 3:
        raise ValueError("expected a preset or three values k1 k2 lambda")
    try:
        k1, k2, lambda_value = int(values[0]), int(values[1]), float(values[2])
    except ValueError:
        raise ValueError("k1 and k2 must be integers, lambda a number") from None
    if k1 < 1 or k2 < 1 or not 0 <= lambda_value <= 1:
        raise ValueError("k1, k2 must be >= 1 and lambda in [0, 1]")
    parameters = {"k1": k1, "k2": k2, "lambda_value": lambda_value}
    return next((name for name, preset in rerank.RERANK_PRESETS.items() if preset == parameters), None), parameters


def save_features(path, protocol, query, gallery, options=None):
    """The protocol's features (every name the network gives: `query_<name>`, `gallery_<name>`), labels,
    cameras, paths and trial galleries as one .npz (tools/visualize.py, test.py --features). Features stay
    float64, as evaluated, so that re-evaluating them reproduces the numbers exactly. options: JSON-friendly
    settings of the run (protocol options, flip, model, ...)."""
    if list(query) != list(gallery):
        raise ValueError(f"query features {list(query)} and gallery features {list(gallery)} differ")
    arrays = {"protocol": np.array(protocol.name), "metric": np.array(protocol.metric),
              "options": np.array(json.dumps(options or {}, sort_keys=True)),
              "feature_names": np.array(list(query), dtype=str),
              **{f"{side}_{name}": np.asarray(value, dtype=np.float64)
                 for side, feats in (("query", query), ("gallery", gallery)) for name, value in feats.items()},
              "query_pids": np.asarray(protocol.query_pids), "query_cams": np.asarray(protocol.query_cams),
              "query_paths": np.array(protocol.query_paths, dtype=str), "query_modal": np.array(protocol.query_modal),
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


class FeaturesFileError(ValueError):
    """A features file that is missing, unreadable or not written by save_features."""


LABEL_SIDE_KEYS = ("pids", "cams", "paths", "modal")
# Files written before the names were stored hold these.
DEFAULT_FEATURE_NAMES = ("pool", "bn")


def feature_names(data):
    """The feature names of a features file's arrays."""
    return tuple(str(name) for name in data["feature_names"]) if "feature_names" in data else DEFAULT_FEATURE_NAMES


def read_features_file(path):
    """(arrays {key: array} of a save_features npz, gallery indices per trial); FeaturesFileError with one
    line when the file is missing, unreadable or lacks a key."""
    if not os.path.isfile(path):
        raise FeaturesFileError(f"features file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except Exception as exc:  # zipfile/pickle/format errors all mean "not a features npz"
        raise FeaturesFileError(f"cannot read features file {path}: {exc}") from None
    required = [f"{side}_{key}" for side in ("query", "gallery")
                for key in LABEL_SIDE_KEYS + feature_names(data)] + ["trials"]
    missing = [key for key in required if key not in data]
    if missing:
        raise FeaturesFileError(f"{path} lacks key(s) {', '.join(missing)}: not a test.py --save-features file")
    trials = [int(t) for t in np.atleast_1d(data["trials"])]
    if "gallery_trial_indices" in data:
        per_trial = [np.asarray(row, dtype=np.int64) for row in np.atleast_2d(data["gallery_trial_indices"])]
    else:
        keys = sorted((int(m.group(1)), key) for key in data
                      if (m := re.fullmatch(r"gallery_trial(\d+)_indices", key)))
        per_trial = [np.asarray(data[key], dtype=np.int64) for _, key in keys]
    if len(per_trial) != len(trials):
        raise FeaturesFileError(f"{path}: {len(per_trial)} gallery trial index arrays for {len(trials)} trials")
    return data, per_trial


def load_features(path):
    """(protocol, query features, gallery features, options) of a save_features npz, for
    eval_metrics.evaluate_protocol without the model or the images. The protocol is a namespace with
    TestProtocol's fields; files written before the metric and options were stored are refused."""
    data, trial_indices = read_features_file(path)
    missing = [key for key in ("metric", "options") if key not in data]
    if missing:
        raise FeaturesFileError(f"{path} lacks {' and '.join(missing)} (written by an older test.py): run "
                                f"test.py --save-features again to re-evaluate it")
    protocol = SimpleNamespace(
        name=str(data["protocol"]), metric=str(data["metric"]), trials=[int(t) for t in np.atleast_1d(data["trials"])],
        trial_indices=trial_indices, transpose=bool(data.get("transpose", False)),
        **{f"{side}_{key}": data[f"{side}_{key}"] for side in ("query", "gallery")
           for key in ("pids", "cams", "paths", "modal")})
    features = [{name: data[f"{side}_{name}"] for name in feature_names(data)} for side in ("query", "gallery")]
    return protocol, features[0], features[1], json.loads(str(data["options"]))


# --------------------------------------------------------------------------------------------------
# Per-camera results
# --------------------------------------------------------------------------------------------------

CAMERA_METRICS = ("Rank-1", "mAP", "mINP")


def summarise_by_camera(by_camera):
    """Per mode, side and camera: mean and population std over the trials where the camera had a valid
    query, of Rank-1, mAP and mINP, with those trials; and per mode and side the gap between the best and
    the worst camera's mean. by_camera: the "by_camera" entry of eval_metrics.evaluate_protocol."""
    summary = {}
    for mode, trials in by_camera.items():
        summary[mode] = {}
        for side in ("gallery", "query"):
            cams = sorted({cam for trial in trials for cam in trial[side]})
            per_cam = {}
            for cam in cams:
                results = [(trial["trial"], trial[side][cam]) for trial in trials if trial[side].get(cam)]
                values = {"Rank-1": [r["cmc"][0] for _, r in results], "mAP": [r["mAP"] for _, r in results],
                          "mINP": [r["mINP"] for _, r in results]}
                per_cam[cam] = {"trials": [t for t, _ in results],
                                "mean": {k: float(np.mean(v)) if v else None for k, v in values.items()},
                                "std": {k: float(np.std(v)) if v else None for k, v in values.items()}}
            summary[mode][side] = {"cameras": per_cam, "gap": _camera_gap(per_cam)}
    return summary


def _camera_gap(per_cam):
    """Per metric: best and worst camera by mean, and their difference (None with fewer than 2 cameras)."""
    gaps = {}
    for name in CAMERA_METRICS:
        means = {cam: r["mean"][name] for cam, r in per_cam.items() if r["mean"][name] is not None}
        if len(means) < 2:
            gaps[name] = None
            continue
        best, worst = max(means, key=means.get), min(means, key=means.get)
        gaps[name] = {"best": best, "worst": worst, "gap": means[best] - means[worst]}
    return gaps


def camera_label(cam, low_light):
    return f"cam{cam}" + (" (low-light)" if cam in low_light else "")


def by_camera_table(summary, modes, title, labels=similarity.STANDARD_LABELS, low_light=()):
    """Rank-1, mAP and mINP (mean ± std in %) per similarity mode, side and camera, and per side the gap
    between the best and the worst camera. Sides with one camera are left out (they repeat the overall
    numbers)."""
    rows = []
    for mode in modes:
        for side in ("gallery", "query"):
            cameras = summary[mode][side]["cameras"]
            if len(cameras) < 2:
                continue
            for cam, r in cameras.items():
                rows.append({"feature": labels[mode], "side": side, "camera": camera_label(cam, low_light),
                             **{k: _percent_cell(r["mean"][k], r["std"][k]) for k in CAMERA_METRICS},
                             "trials": len(r["trials"])})
            gap = summary[mode][side]["gap"]
            rows.append({"feature": labels[mode], "side": side, "camera": "gap best-worst",
                         **{k: "-" if gap[k] is None else
                            f"{100 * gap[k]['gap']:.2f} (cam{gap[k]['best']}-cam{gap[k]['worst']})"
                            for k in CAMERA_METRICS}})
    return utils.format_table(rows, ["feature", "side", "camera", *CAMERA_METRICS, "trials"], title=title)


def has_several_cameras(protocol):
    """Whether a per-camera breakdown says more than the overall numbers: several cameras on a side."""
    return any(len(np.unique(np.asarray(cams))) > 1 for cams in (protocol.query_cams, protocol.gallery_cams))
