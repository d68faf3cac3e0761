"""Re-identification metrics of the AGW family (REFERENCE section 3), vectorised.

`eval_sysu`, `eval_regdb` and `eval_llcm` keep the official names, signatures and results
(CMC as float32, mAP, mINP) but process whole blocks of queries with array operations instead of a
Python loop per query. Pure numpy; imports nothing of ours (ground floor).

Differences from the official code, all documented quirks of REFERENCE section 12:
* Q-23: ties are ordered by numpy's default argsort as in the official code; `stable_sort=True`
  breaks them by gallery index instead (reproducible across numpy versions and CPUs).
* Q-28: a de-duplicated CMC row with fewer than `max_rank` distinct identities is padded with its
  last value (the official code crashes), so the returned CMC always has `max_rank` entries
  (`min(max_rank, num_gallery)`).
* Bad arguments (shapes, no valid query) raise ValueError instead of printing / asserting.
"""
import numpy as np

# Rows per block = this // num_gallery; keeps every [rows, num_gallery] temporary at <= 16 MB.
_BLOCK_ELEMENTS = 1 << 21

SIMILARITY_MODES = ("pool", "bn", "sum", "weighted")


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, *, stable_sort=False):
    """SYSU-MM01 metric: queries from camera 3 ignore gallery camera 2; identity de-duplicated CMC.

    Returns (cmc float32 [max_rank], mAP, mINP); rank-k of the CMC means "the true identity is
    among the first k distinct identities of the ranking" (REFERENCE 3.2).
    """
    return _eval_dedup("sysu", distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort)


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, *, stable_sort=False):
    """LLCM metric: gallery items with the query's pid and camera number are ignored;
    identity de-duplicated CMC like eval_sysu (REFERENCE 3.3). Returns (cmc, mAP, mINP)."""
    return _eval_dedup("llcm", distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort)


def _eval_dedup(metric, distmat, q_pids, g_pids, q_camids, g_camids, max_rank, stable_sort):
    """Shared body of eval_sysu / eval_llcm: `metric` picks the gallery-removal rule."""
    distmat, q_pids, g_pids, q_camids, g_camids = _check_inputs(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank)

    def removed(rows):
        return removed_gallery(metric, q_pids[rows], q_camids[rows], g_pids, g_camids)

    return _evaluate(distmat, q_pids, g_pids, removed, max_rank, dedup_cmc=True,
                     stable_sort=stable_sort)


def eval_regdb(distmat, q_pids, g_pids, max_rank=20, *, stable_sort=False):
    """RegDB metric: nothing removed (query and gallery cameras differ), standard CMC
    (REFERENCE 3.1). Returns (cmc, mAP, mINP)."""
    distmat, q_pids, g_pids, _, _ = _check_inputs(distmat, q_pids, g_pids, None, None, max_rank)
    return _evaluate(distmat, q_pids, g_pids, None, max_rank, dedup_cmc=False,
                     stable_sort=stable_sort)


def removed_gallery(metric, q_pids, q_cams, g_pids, g_cams):
    """bool [num_q, num_g]: the gallery items `metric` ignores for each query (REFERENCE 3.1-3.3).

    sysu: gallery camera 2 for queries from camera 3 (same indoor scene); llcm: same pid and same camera;
    any other metric (regdb): nothing.
    """
    q_pids, q_cams, g_pids, g_cams = (np.asarray(a) for a in (q_pids, q_cams, g_pids, g_cams))
    if metric == "sysu":
        return (q_cams == 3)[:, None] & (g_cams == 2)[None, :]
    if metric == "llcm":
        return (q_pids[:, None] == g_pids[None, :]) & (q_cams[:, None] == g_cams[None, :])
    return np.zeros((len(q_pids), len(g_pids)), dtype=bool)


def _check_inputs(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """Validate shapes like torchreid's rank.py; returns the arguments as numpy arrays."""
    distmat = np.asarray(distmat)
    if distmat.ndim != 2 or distmat.shape[0] == 0 or distmat.shape[1] == 0:
        raise ValueError(f"distmat must be a non-empty 2-D [num_query, num_gallery] array, "
                         f"got shape {distmat.shape}")
    if distmat.dtype.kind not in "fiu":
        raise ValueError(f"distmat must hold real numbers, got dtype {distmat.dtype}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
    num_q, num_g = distmat.shape
    arrays = []
    for name, values, size in (("q_pids", q_pids, num_q), ("g_pids", g_pids, num_g),
                               ("q_camids", q_camids, num_q), ("g_camids", g_camids, num_g)):
        if values is None:
            arrays.append(None)
            continue
        values = np.asarray(values)
        if values.shape != (size,):
            raise ValueError(f"{name} must have shape ({size},) to match distmat of shape "
                             f"{distmat.shape}, got {values.shape}")
        arrays.append(values)
    return (distmat, *arrays)


def _evaluate(distmat, q_pids, g_pids, removed_fn, max_rank, *, dedup_cmc, stable_sort):
    """Shared body of the three metrics, one block of queries at a time.

    removed_fn(rows) -> bool [len(rows), num_g] gallery items ignored for those queries (or None
    for "keep everything"). Per query we only need the ranked positions of its kept true matches
    (AP, INP, standard CMC) and, for the de-duplicated CMC, the number of distinct kept
    identities ranked before its first kept match.
    """
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    kind = "stable" if stable_sort else None
    ap = np.zeros(num_q)
    inp = np.zeros(num_q)
    valid = np.zeros(num_q, dtype=bool)
    # 0-based CMC position of the first hit (num_g for invalid queries, i.e. never a hit).
    hit_rank = np.full(num_q, num_g, dtype=np.int64)
    pid_columns, pid_starts = _columns_grouped_by_pid(g_pids) if dedup_cmc else (None, None)

    block = max(1, _BLOCK_ELEMENTS // num_g)
    for start in range(0, num_q, block):
        rows = slice(start, min(start + block, num_q))
        order = np.argsort(distmat[rows], axis=1, kind=kind)
        removed = removed_fn(rows) if removed_fn is not None else None
        q_row, raw_pos, kept_pos = _kept_match_positions(order, q_pids[rows], g_pids, removed)
        ap[rows], inp[rows], valid[rows], first = _ap_inp(q_row, kept_pos, len(order))
        block_valid = valid[rows]
        block_hit_rank = hit_rank[rows]                       # a view: writes go to hit_rank
        if dedup_cmc:
            first_raw = np.full(len(order), num_g)
            first_raw[block_valid] = raw_pos[first]
            distinct_before = _distinct_ids_before(order, removed, first_raw, pid_columns,
                                                   pid_starts)
            block_hit_rank[block_valid] = distinct_before[block_valid]
        else:
            block_hit_rank[block_valid] = kept_pos[first]

    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("no valid query: no query identity appears among its kept gallery items")
    hits = np.bincount(np.minimum(hit_rank[valid], max_rank), minlength=max_rank + 1)
    cmc = np.cumsum(hits[:max_rank]).astype(np.float32) / np.float32(num_valid)
    return cmc, np.mean(ap[valid]), np.mean(inp[valid])


def _kept_match_positions(order, q_pids, g_pids, removed):
    """Sparse list of the kept true matches of a block, in ranked order per query.

    Returns (query row, raw ranked position, position in the kept list) of every kept match,
    sorted by row then rank.
    """
    matches = g_pids[order] == q_pids[:, None]
    if removed is None:
        q_row, raw_pos = np.nonzero(matches)
        return q_row, raw_pos, raw_pos
    removed_ranked = np.take_along_axis(removed, order, axis=1)
    q_row, raw_pos = np.nonzero(matches & ~removed_ranked)
    removed_before = np.cumsum(removed_ranked, axis=1, dtype=np.int32)[q_row, raw_pos]
    return q_row, raw_pos, raw_pos - removed_before


def _ap_inp(q_row, kept_pos, num_rows):
    """AP, INP and validity per query (REFERENCE 3, step 7) from the sparse kept matches.

    Also returns, for each valid query, the index of its first kept match in the sparse list.
    """
    num_rel = np.bincount(q_row, minlength=num_rows)
    valid = num_rel > 0
    first_index = np.cumsum(num_rel) - num_rel
    match_number = np.arange(len(q_row)) - first_index[q_row] + 1    # 1-based within the query
    precision = match_number / (kept_pos + 1.0)
    ap = np.zeros(num_rows)
    inp = np.zeros(num_rows)
    ap[valid] = np.bincount(q_row, weights=precision, minlength=num_rows)[valid] / num_rel[valid]
    last_kept = kept_pos[first_index[valid] + num_rel[valid] - 1]
    inp[valid] = num_rel[valid] / (last_kept + 1.0)
    return ap, inp, valid, first_index[valid]


def _columns_grouped_by_pid(g_pids):
    """Gallery column order that groups equal pids, and the start of each group."""
    columns = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[columns]
    starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
    return columns, starts


def _distinct_ids_before(order, removed, first_raw, pid_columns, pid_starts):
    """Per query: number of distinct kept gallery pids ranked before its first kept match.

    This is the 0-based position of the true identity in the official de-duplicated ranked pid
    list. rank[i, j] = ranked position of gallery j; the best kept rank of each pid is a
    minimum over that pid's columns (np.minimum.reduceat over pid-grouped columns).
    """
    num_rows, num_g = order.shape
    rank = np.empty(order.shape, dtype=np.int32)
    np.put_along_axis(rank, order, np.arange(num_g, dtype=np.int32)[None, :], axis=1)
    if removed is not None:
        rank[removed] = num_g
    best_rank_per_pid = np.minimum.reduceat(rank[:, pid_columns], pid_starts, axis=1)
    return np.count_nonzero(best_rank_per_pid < first_raw[:, None], axis=1)


def similarity(qf, gf, mode):
    """Cosine similarity [num_q, num_g] of already L2-normalised features (REFERENCE 2.3, Q-21).

    qf, gf: {"pool": array [N, C], "bn": array [N, C]}. mode: "pool", "bn", "sum" (S_pool + S_bn,
    IRL's LLCM "FC" line) or "weighted" (0.1 S_pool + 0.9 S_bn, IRL's LLCM "POOL" line).
    """
    if mode not in SIMILARITY_MODES:
        raise ValueError(f"unknown similarity mode {mode!r}; expected one of {SIMILARITY_MODES}")
    needed = ("pool", "bn") if mode in ("sum", "weighted") else (mode,)
    for name, feats in (("query", qf), ("gallery", gf)):
        missing = [key for key in needed if key not in feats]
        if missing:
            raise ValueError(f"similarity mode {mode!r} needs {name} features {missing}")
    sims = {key: np.matmul(qf[key], np.transpose(gf[key])) for key in needed}
    if mode == "sum":
        return sims["pool"] + sims["bn"]
    if mode == "weighted":
        return 0.1 * sims["pool"] + 0.9 * sims["bn"]
    return sims[mode]


_METRICS = {"sysu": eval_sysu, "regdb": eval_regdb, "llcm": eval_llcm}


def non_finite_warnings(query_feats, gallery_feats):
    """One warning line per side whose feature rows are not all finite: eval-mode activations of a barely
    trained model can overflow, and their ranking is then arbitrary rather than a result."""
    warnings = []
    for side, feats in (("query", query_feats), ("gallery", gallery_feats)):
        finite = np.logical_and.reduce([np.isfinite(np.asarray(value)).all(axis=1) for value in feats.values()])
        if not finite.all():
            warnings.append(f"warning: {int((~finite).sum())} of {len(finite)} {side} features are not finite "
                            f"(eval-mode overflow, e.g. an undertrained model); their ranking is arbitrary")
    return warnings


def evaluate_protocol(query_feats, gallery_feats, protocol, modes=("bn", "pool")):
    """Evaluate every gallery trial of a test protocol for each similarity mode.

    protocol: duck-typed data_manager.TestProtocol (metric, query_pids, query_cams, gallery_pids,
    gallery_cams, trial_indices, trials, transpose). gallery_feats hold ALL candidate gallery
    images; each trial selects its rows. transpose=True (RegDB tvsearch, DEEN LLCM) ranks the
    query set for every trial-gallery row: distance = -(G_trial . Q^T) with the gallery
    labels/cameras passed as query labels/cameras.
    Returns JSON-friendly {"per_trial": {mode: [{"trial", "cmc", "mAP", "mINP"}, ...]},
    "mean": {mode: {...}}, "std": {mode: {...}}}; std is the population std over trials (0 for
    a single trial).
    """
    name = getattr(protocol, "name", "?")
    metric = _METRICS.get(protocol.metric)
    if metric is None:
        raise ValueError(f"unknown metric {protocol.metric!r} in protocol {name}; "
                         f"expected one of {sorted(_METRICS)}")
    trial_indices, trials = list(protocol.trial_indices), list(protocol.trials)
    if not trial_indices or len(trial_indices) != len(trials):
        raise ValueError(f"protocol {name} needs one trial id per gallery trial, "
                         f"got {len(trials)} ids for {len(trial_indices)} trials")
    transpose = bool(getattr(protocol, "transpose", False))
    query = (np.asarray(protocol.query_pids), np.asarray(protocol.query_cams))
    gallery_pids, gallery_cams = np.asarray(protocol.gallery_pids), np.asarray(protocol.gallery_cams)
    gallery_feats = {key: np.asarray(value) for key, value in gallery_feats.items()}
    per_trial = {mode: [] for mode in modes}
    for trial, indices in zip(trials, trial_indices):
        indices = np.asarray(indices)
        gallery_trial = {key: value[indices] for key, value in gallery_feats.items()}
        gallery = (gallery_pids[indices], gallery_cams[indices])
        rows, columns = (gallery_trial, gallery), (query_feats, query)     # each row ranks the columns
        if not transpose:
            rows, columns = columns, rows
        labels = _metric_labels(protocol.metric, rows[1], columns[1])     # the same for every mode
        for mode in modes:
            cmc, mAP, mINP = metric(-similarity(rows[0], columns[0], mode), *labels)
            per_trial[mode].append({"trial": int(trial), "cmc": [float(v) for v in cmc],
                                    "mAP": float(mAP), "mINP": float(mINP)})
    mean = {mode: _summarise(results, np.mean) for mode, results in per_trial.items()}
    std = {mode: _summarise(results, np.std) for mode, results in per_trial.items()}
    return {"per_trial": per_trial, "mean": mean, "std": std}


def _metric_labels(metric, query, gallery):
    """Positional label arguments of the metric function (eval_regdb takes no cameras)."""
    (q_pids, q_cams), (g_pids, g_cams) = query, gallery
    if metric == "regdb":
        return q_pids, g_pids
    return q_pids, g_pids, q_cams, g_cams


def _summarise(results, reduce):
    """Reduce the per-trial cmc / mAP / mINP over trials (mean or std) to python floats."""
    lengths = {len(result["cmc"]) for result in results}
    if len(lengths) > 1:
        raise ValueError(f"trials have CMC curves of different lengths {sorted(lengths)} "
                         f"(a trial gallery has fewer than max_rank items); cannot average them")
    cmc = reduce(np.array([result["cmc"] for result in results], dtype=np.float64), axis=0)
    return {"cmc": [float(v) for v in cmc],
            "mAP": float(reduce([result["mAP"] for result in results])),
            "mINP": float(reduce([result["mINP"] for result in results]))}
