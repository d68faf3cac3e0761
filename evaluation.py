"""Evaluation shared by train.py (every few epochs) and test.py: features of a protocol's images, the
metrics over its trials, the summary over trials, the results table and the features file.

Features are extracted once per protocol (the query set, and every gallery image some trial uses); each
gallery trial then only re-ranks (eval_metrics.evaluate_protocol).
"""
import os

import numpy as np

import data_loader
import eval_metrics
import model as models
import utils

MODE_LABELS = {"bn": "bn (FC)", "pool": "pool", "sum": "sum (pool+bn)", "weighted": "weighted (0.1/0.9)"}
RANKS = (1, 5, 10, 20)


def extract(net, paths, pids, modal, img_h, img_w, batch_size, workers, device, *, flip=False, progress=True):
    """{"pool", "bn"}: float64 L2-normalised features of the images at `paths` through the stems of `modal`."""
    loader = data_loader.make_test_loader(list(paths), np.asarray(pids), img_h, img_w, batch_size, workers)
    pool, bn = models.extract_features(net, loader, modal, device, flip=flip, progress=progress)
    return {"pool": pool, "bn": bn}


def evaluate(net, protocol, img_h, img_w, batch_size, workers, device, modes, *, flip=False, progress=True,
             warn=None):
    """(result of eval_metrics.evaluate_protocol, query features, gallery features) of `protocol`, whose
    gallery should hold only the images its trials use (TestProtocol.used_gallery_only). `warn(line)`
    receives one line per side whose features are not finite."""
    sides = {}
    for side, paths, pids, modal in (("query", protocol.query_paths, protocol.query_pids, protocol.query_modal),
                                     ("gallery", protocol.gallery_paths, protocol.gallery_pids, protocol.gallery_modal)):
        sides[side] = extract(net, paths, pids, modal, img_h, img_w, batch_size, workers, device, flip=flip,
                              progress=progress)
    for message in eval_metrics.non_finite_warnings(sides["query"], sides["gallery"]):
        if warn is not None:
            warn(message)
    result = eval_metrics.evaluate_protocol(sides["query"], sides["gallery"], protocol, modes=modes)
    return result, sides["query"], sides["gallery"]


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


def results_table(mean, std, modes, title, labels=MODE_LABELS):
    """Rank-1/5/10/20, mAP and mINP as 'mean ± std' in %, one row per similarity mode."""
    def cell(m, s):
        return f"{100 * m:.2f} ± {100 * s:.2f}"
    rows = []
    for mode in modes:
        row = {"feature": labels[mode]}
        for r in RANKS:
            row[f"Rank-{r}"] = cell(mean[mode]["cmc"][r - 1], std[mode]["cmc"][r - 1])
        row["mAP"] = cell(mean[mode]["mAP"], std[mode]["mAP"])
        row["mINP"] = cell(mean[mode]["mINP"], std[mode]["mINP"])
        rows.append(row)
    return utils.format_table(rows, ["feature"] + [f"Rank-{r}" for r in RANKS] + ["mAP", "mINP"], title=title)


def save_features(path, protocol, query, gallery):
    """The protocol's features, labels, cameras, paths and trial galleries as one .npz (tools/visualize.py)."""
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
