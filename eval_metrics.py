"""Re-identification metrics of the AGW family (REFERENCE section 3), vectorised.

`eval_sysu`, `eval_regdb` and `eval_llcm` keep the official names, signatures and results
(CMC as float32, mAP, mINP) but process whole blocks of queries with array operations instead of a
Python loop per query. Pure numpy; of ours it imports only similarity.py (ground floor).

A query's Rank-k, AP and INP depend only on where its true matches are ranked, and the
de-duplicated CMC only on how many other identities come before the first one, so float matrices
are not argsorted: each query's match distances are binary-searched in its row sorted by value alone,
in float32, with the items beyond its last match flattened to one value (_rank_by_match_distances).
That ranking is unambiguous except when a true match is as far as another kept gallery item (in
float32), or a match distance is NaN; those queries alone get the official full argsort, so the
results equal the official loop's in every case (ties included).

Differences from the official code, all documented quirks of REFERENCE section 12:
* Q-23: ties are ordered by numpy's default argsort as in the official code; `stable_sort=True`
  breaks them by gallery index instead (reproducible across numpy versions and CPUs). Either way,
  only ties between a true match and another kept item can change a result, and only the queries
  that have one are argsorted.
* Q-28: a de-duplicated CMC row with fewer than `max_rank` distinct identities is padded with its
  last value (the official code crashes), so the returned CMC always has `max_rank` entries
  (`min(max_rank, num_gallery)`).
* Bad arguments (shapes, no valid query) raise ValueError instead of printing / asserting.
"""
import numpy as np

import similarity
from similarity import STANDARD_FUSIONS

# Rows per block = this // num_gallery (evened out to at most 1.5x that, _evaluate); keeps every
# [rows, num_gallery] temporary at <= 6 MB, and a float32 block within the cache across the passes
# over it. Interleaved runs at the SYSU and LLCM sizes: 2**20 and 2**21 alike within noise, 2**18
# 7-14% slower.
_BLOCK_ELEMENTS = 1 << 19


def eval_sysu(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, *, stable_sort=False):
    """SYSU-MM01 metric: queries from camera 3 ignore gallery camera 2; identity de-duplicated CMC.

    Returns (cmc float32 [max_rank], mAP, mINP); rank-k of the CMC means "the true identity is
    among the first k distinct identities of the ranking" (REFERENCE 3.2).
    """
    return _per_query("sysu", distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                      stable_sort=stable_sort).summary(max_rank)


def eval_llcm(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20, *, stable_sort=False):
    """LLCM metric: gallery items with the query's pid and camera number are ignored;
    identity de-duplicated CMC like eval_sysu (REFERENCE 3.3). Returns (cmc, mAP, mINP)."""
    return _per_query("llcm", distmat, q_pids, g_pids, q_camids, g_camids, max_rank,
                      stable_sort=stable_sort).summary(max_rank)


def eval_regdb(distmat, q_pids, g_pids, max_rank=20, *, stable_sort=False):
    """RegDB metric: nothing removed (query and gallery cameras differ), standard CMC
    (REFERENCE 3.1). Returns (cmc, mAP, mINP)."""
    return _per_query("regdb", distmat, q_pids, g_pids, None, None, max_rank,
                      stable_sort=stable_sort).summary(max_rank)


# The metrics with gallery-removal rules, which also de-duplicate identities in the CMC (REFERENCE 3.2-3.3);
# the RegDB metric has neither.
_DEDUPLICATING_METRICS = frozenset({"sysu", "llcm"})
_KNOWN_METRICS = _DEDUPLICATING_METRICS | {"regdb"}
# CMC length of evaluate_protocol's results, as the official test scripts print them.
_MAX_RANK = 20


def _per_query(metric, distmat, q_pids, g_pids, q_cams, g_cams, max_rank, *, stable_sort):
    """The per-query _Results of `metric` ("sysu", "regdb", "llcm"; RegDB ignores the cameras)."""
    if metric not in _KNOWN_METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(_KNOWN_METRICS)}")
    distmat, q_pids, g_pids, q_cams, g_cams = _check_inputs(distmat, q_pids, g_pids, q_cams, g_cams, max_rank)
    dedup_cmc = metric in _DEDUPLICATING_METRICS
    removed = _Removal(metric, q_pids, q_cams, g_pids, g_cams) if dedup_cmc else None
    return _evaluate(distmat, q_pids, g_pids, removed, dedup_cmc=dedup_cmc, stable_sort=stable_sort)


def removed_gallery(metric, q_pids, q_cams, g_pids, g_cams):
    """bool [num_q, num_g]: the gallery items `metric` ignores for each query (REFERENCE 3.1-3.3).

    sysu: gallery camera 2 for queries from camera 3 (same indoor scene); llcm: same pid and same camera;
    any other metric (regdb): nothing.
    """
    q_pids, q_cams, g_pids, g_cams = (np.asarray(a) for a in (q_pids, q_cams, g_pids, g_cams))
    removed = _removed(metric, q_pids[:, None], q_cams[:, None], g_pids[None, :], g_cams[None, :])
    return np.broadcast_to(removed, (len(q_pids), len(g_pids))).copy()


# SYSU-MM01 (REFERENCE 3.2): queries from this camera ignore every gallery image of that one.
_SYSU_QUERY_CAMERA, _SYSU_IGNORED_GALLERY_CAMERA = 3, 2


def _removed(metric, q_pids, q_cams, g_pids, g_cams):
    """The removal rules of removed_gallery, element by element with numpy broadcasting, so the same
    rule serves whole [queries, gallery] blocks and lists of (query, gallery) pairs."""
    if metric == "sysu":
        return (q_cams == _SYSU_QUERY_CAMERA) & (g_cams == _SYSU_IGNORED_GALLERY_CAMERA)
    if metric == "llcm":
        return (q_pids == g_pids) & (q_cams == g_cams)
    return np.zeros(np.broadcast_shapes(np.shape(q_pids), np.shape(g_pids)), dtype=bool)


# Rules that only ever remove gallery items of the query's own identity (test_eval_metrics checks
# this): the ranking without an argsort sets those items aside anyway, so it need not evaluate the
# rule over whole rows.
_OWN_IDENTITY_ONLY_RULES = frozenset({"llcm"})


class NoValidQueryError(ValueError):
    """No query has a kept true match: the metrics are undefined (not 0)."""


class _Removal:
    """removed(q_index, g_index) -> bool: whether gallery items are ignored for queries, for index
    arrays that broadcast together."""

    def __init__(self, metric, q_pids, q_cams, g_pids, g_cams):
        if metric != "sysu" and metric not in _OWN_IDENTITY_ONLY_RULES:
            raise ValueError(f"no gallery-removal rule for metric {metric!r}")
        self.metric, self.q_pids, self.q_cams, self.g_pids, self.g_cams = (
            metric, q_pids, q_cams, g_pids, g_cams)

    def __call__(self, q_index, g_index):
        return _removed(self.metric, self.q_pids[q_index], self.q_cams[q_index],
                        self.g_pids[g_index], self.g_cams[g_index])

    def other_identity_cells(self, q_index):
        """The cells of other identities the rule removes for the queries q_index, as a product
        (positions in q_index, gallery columns): every such pair is removed and no other cell of
        another identity (SYSU removes one gallery camera for one query camera); None for rules
        that remove none. Setting a product aside costs a fraction of a [queries, gallery] mask."""
        if self.metric in _OWN_IDENTITY_ONLY_RULES:
            return None
        return (np.flatnonzero(self.q_cams[q_index] == _SYSU_QUERY_CAMERA),
                np.flatnonzero(self.g_cams == _SYSU_IGNORED_GALLERY_CAMERA))


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


class _Results:
    """Per-query AP, INP, validity and 0-based CMC hit position, filled block by block."""

    def __init__(self, num_q, num_g):
        self.num_g = num_g
        self.ap = np.zeros(num_q)
        self.inp = np.zeros(num_q)
        self.valid = np.zeros(num_q, dtype=bool)
        # num_g = never a hit (invalid queries; they are left out of the CMC anyway).
        self.hit_rank = np.full(num_q, num_g, dtype=np.int64)

    def record(self, rows, q_row, kept_pos, distinct_before=None):
        """Store the queries `rows` from the kept-list positions of their kept true matches.

        q_row / kept_pos: one entry per kept match, sorted by row then position. distinct_before: per
        row, distinct identities ranked before the first kept match (de-duplicated CMC), or None
        for the standard CMC, whose hit is the first match's position.
        """
        ap, inp, valid, first = _ap_inp(q_row, kept_pos, len(rows))
        hit_rank = np.full(len(rows), self.num_g, dtype=np.int64)
        hit_rank[valid] = kept_pos[first] if distinct_before is None else distinct_before[valid]
        self.ap[rows], self.inp[rows], self.valid[rows], self.hit_rank[rows] = ap, inp, valid, hit_rank

    def summary(self, max_rank, queries=None):
        """(cmc float32 [min(max_rank, num_g)], mAP, mINP) over the valid queries, or over the valid ones
        among `queries` (a bool mask)."""
        max_rank = min(max_rank, self.num_g)
        valid = self.valid if queries is None else self.valid & queries
        num_valid = int(valid.sum())
        if num_valid == 0:
            raise NoValidQueryError("no valid query: no query identity appears among its kept gallery items")
        hits = np.bincount(np.minimum(self.hit_rank[valid], max_rank), minlength=max_rank + 1)
        cmc = np.cumsum(hits[:max_rank]).astype(np.float32) / np.float32(num_valid)
        return cmc, np.mean(self.ap[valid]), np.mean(self.inp[valid])


def _evaluate(distmat, q_pids, g_pids, removed, *, dedup_cmc, stable_sort):
    """Shared body of the three metrics, one block of queries at a time; returns the _Results.

    removed: a _Removal (or None: keep everything). Per query only the kept-list
    positions of its kept true matches matter (AP, INP, standard CMC) and, for the de-duplicated
    CMC, the number of distinct kept identities ranked before its first kept match.

    Float matrices go through _rank_by_match_distances, which finds these numbers by searching the
    query's few match distances in its row sorted by value, without argsorting it. It hands back the
    queries whose order depends on how ties are broken, which get the full argsort with the requested
    kind, like integer matrices (Q-23): results are those of the official loop in every case.
    """
    num_q, num_g = distmat.shape
    results = _Results(num_q, num_g)
    identities = _GalleryIdentities(g_pids)
    q_identity = identities.index_of(q_pids)
    block = max(1, _BLOCK_ELEMENTS // num_g)
    # Blocks of equal size, at most 1.5x the nominal one: a small last block would cost a block's fixed
    # overhead for a few rows (the SYSU size: two blocks of 1,902 rows, not 1,741 + 1,741 + 321).
    block = -(-num_q // max(1, round(num_q / block)))
    if distmat.dtype.kind == "f":
        # Contiguous blocks, so that cells can be read through flat indices (much faster than
        # 2-D fancy indexing); a no-op for the usual C-ordered matrix.
        full_sort = [_rank_by_match_distances(np.ascontiguousarray(distmat[start:start + block]),
                                              np.arange(start, min(start + block, num_q)),
                                              q_identity, identities, removed, dedup_cmc, results)
                     for start in range(0, num_q, block)]
        full_sort = np.concatenate(full_sort)
    else:
        full_sort = np.arange(num_q)
    for start in range(0, len(full_sort), block):
        _rank_by_full_sort(distmat, full_sort[start:start + block], q_pids, g_pids, removed,
                           identities if dedup_cmc else None, stable_sort, results)
    return results


class _GalleryIdentities:
    """The gallery columns grouped by identity: columns[starts[i]:starts[i] + sizes[i]] hold
    identity values[i] (ascending), and of_column[j] is the identity index of column j."""

    def __init__(self, g_pids):
        self.columns = np.argsort(g_pids, kind="stable")
        sorted_pids = g_pids[self.columns]
        self.starts = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1]])
        self.sizes = np.diff(np.r_[self.starts, len(g_pids)])
        self.values = sorted_pids[self.starts]
        self.of_column = np.empty(len(g_pids), dtype=np.intp)
        self.of_column[self.columns] = np.repeat(np.arange(len(self.starts)), self.sizes)

    def index_of(self, pids):
        """Identity index of each pid, -1 for pids absent from the gallery."""
        index = np.minimum(np.searchsorted(self.values, pids), len(self.values) - 1)
        return np.where(self.values[index] == pids, index, -1)


def _rank_by_match_distances(block, rows, q_identity, identities, removed, dedup_cmc, results):
    """Rank a float block of queries without argsorting their rows; returns the rows it could not settle.

    For a query whose kept true matches have the sorted distances T_0 <= ... <= T_k-1, match j sits
    at kept-list position j + (kept other-identity items closer than T_j), and the de-duplicated CMC
    hit is the number of other identities with a kept item closer than T_0. Each T_j is
    binary-searched in the query's row sorted by value (_sorted_rows: matches, removed and
    own-identity items set aside). These counts equal the argsort positions unless an other-identity
    item is exactly as far as a match (then its order is a tie-break) or a match distance is NaN
    (argsort puts NaN last); such rows are returned for the full sort. Equal match distances need no
    tie-break: the matches fill the same positions in either order.

    Wider floats are compared and sorted as float32 (twice as fast): rounding keeps the order (x < y
    implies f32(x) <= f32(y)), so an item strictly below a rounded match distance is strictly below
    the match, and one strictly above is above. Only equality is ambiguous, and it counts as a tie
    (the row is argsorted), so the results stay exact; beyond float32's range values round to +-inf
    or zero, again a tie at worst.
    """
    num_rows, num_g = block.shape
    q_id = q_identity[rows]
    own_row, own_col = _own_identity_cells(q_id, identities)
    kept = ~removed(rows[own_row], own_col) if removed is not None else slice(None)
    pair_row, pair_dist, num_kept = _match_distances_by_row(block, own_row[kept], own_col[kept])
    first_pair = np.cumsum(num_kept) - num_kept
    match_number = np.arange(len(pair_row)) - first_pair[pair_row]
    unsettled = np.bincount(pair_row, weights=np.isnan(pair_dist), minlength=num_rows) > 0
    has_match = (num_kept > 0) & ~unsettled
    nearest = np.full(num_rows, np.nan, dtype=block.dtype)     # NaN: compares false, nothing closer
    farthest = nearest.copy()
    nearest[has_match] = pair_dist[first_pair[has_match]]
    farthest[has_match] = pair_dist[first_pair[has_match] + num_kept[has_match] - 1]
    rank_dtype = np.float32 if block.dtype.itemsize > 4 else block.dtype
    with np.errstate(over="ignore", under="ignore"):         # to +-inf or zero: ties at worst
        values = block.astype(rank_dtype)                     # a copy, sorted in place below
        nearest, farthest, searched = (a.astype(rank_dtype) for a in (nearest, farthest, pair_dist))
    removed_others = removed.other_identity_cells(rows) if removed is not None else None
    distinct_before = _sorted_rows(values, own_row, own_col, removed_others, nearest, farthest,
                                   identities if dedup_cmc else None)
    closer, tied = _search_sorted_rows(values, pair_row, searched)
    unsettled[pair_row[tied]] = True
    results.record(rows, pair_row, closer + match_number, distinct_before)
    return rows[unsettled]


def _sorted_rows(values, own_row, own_col, removed_others, nearest, farthest, identities):
    """Sort each row of `values` in place, with own-identity cells (matches and removed own items) and
    removed cells of other identities (removed_others: (rows, columns) whose product is removed, or
    None) set to NaN (sorted last, below and equal to nothing) and the cells beyond the row's
    last match (`farthest`) set to the value just past it; rows without one (NaN) become all NaN.
    Returns, per row, the number of distinct identities with a kept item closer than its first match
    (`nearest`), or None without `identities`.

    A cell past the last match is past every match and equal to none, so it counts the same as its
    true value, and equal values sort fast (numpy's vectorised quicksort): float32 rows of 3,500 with
    half their cells equal sorted in half the time, with 84% equal in a fifth (micro-benchmark), for
    one np.minimum pass.
    """
    num_rows, num_g = values.shape
    with np.errstate(under="ignore"):                        # next after zero: a subnormal
        just_past_reach = np.nextafter(farthest, np.inf)
    np.minimum(values, just_past_reach[:, None], out=values)
    if removed_others is not None:
        values[np.ix_(*removed_others)] = np.nan
    values.reshape(-1)[own_row * num_g + own_col] = np.nan
    distinct_before = None
    if identities is not None:
        before_row, before_col = np.divmod(np.flatnonzero(values < nearest[:, None]), num_g)
        distinct_before = _distinct_per_row(before_row, before_col, num_rows, identities)
    values.sort(axis=1)
    return distinct_before


def _own_identity_cells(q_id, identities):
    """(block row, gallery column) of every gallery item of each query's own identity, by row."""
    sizes = np.where(q_id >= 0, identities.sizes[q_id], 0)
    own_row = np.repeat(np.arange(len(q_id)), sizes)
    within = np.arange(len(own_row)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    return own_row, identities.columns[identities.starts[q_id[own_row]] + within]


def _match_distances_by_row(block, pair_row, pair_col):
    """The distances of the cells (pair_row, pair_col), given grouped by row, sorted within each row (NaN
    last); returns (row of each, the distances, cells per row). Rows hold few cells, so sorting a NaN-padded
    [rows, most cells] array is much cheaper than lexsort on the list."""
    num_rows = block.shape[0]
    count = np.bincount(pair_row, minlength=num_rows)
    within = np.arange(len(pair_row)) - (np.cumsum(count) - count)[pair_row]
    padded = np.full((num_rows, max(1, int(count.max(initial=0)))), np.nan, dtype=block.dtype)
    padded[pair_row, within] = block.reshape(-1)[pair_row * block.shape[1] + pair_col]
    padded.sort(axis=1)
    # A real NaN distance sorts among the padding, but inside its row's first `count` entries all the same.
    return pair_row, padded[np.arange(padded.shape[1]) < count[:, None]], count


def _search_sorted_rows(sorted_rows, row, value):
    """Per value: (entries of sorted_rows[row] strictly below it, whether one equals it), by one
    vectorised branch-free binary search: every round halves the step and moves each value's count
    forward where the entry just past it is still below the value."""
    num_g = sorted_rows.shape[1]
    flat = sorted_rows.reshape(-1)
    before_row = row * num_g - 1          # the probe-th entry of a row: before_row + probe
    below = np.zeros(len(value), dtype=np.intp)
    step = 1 << (num_g.bit_length() - 1)
    while step:
        probe = below + step
        # Probes past the row's end read its last entry and are ignored.
        entry = flat[before_row + np.minimum(probe, num_g)]
        below += step * ((probe <= num_g) & (entry < value))
        step >>= 1
    tied = np.zeros(len(value), dtype=bool)
    inside = np.flatnonzero(below < num_g)
    tied[inside] = flat[before_row[inside] + 1 + below[inside]] == value[inside]
    return below, tied


def _distinct_per_row(row, column, num_rows, identities):
    """Number of distinct gallery identities per row among (row, gallery column) pairs: a
    [rows, identities] table of flags is cheaper than np.unique on the pairs (the gallery has few
    identities)."""
    seen = np.zeros((num_rows, len(identities.values)), dtype=np.uint8)
    seen[row, identities.of_column[column]] = 1
    return np.add.reduce(seen, axis=1, dtype=np.intp)


def _rank_by_full_sort(distmat, rows, q_pids, g_pids, removed, identities, stable_sort, results):
    """The queries `rows` ranked by a full argsort of their rows, ties ordered by the sort kind
    (Q-23). identities: _GalleryIdentities for the de-duplicated CMC, None for the standard one."""
    if len(rows) == 0:
        return
    order = np.argsort(distmat[rows], axis=1, kind="stable" if stable_sort else None)
    removed_rows = None
    if removed is not None:
        removed_rows = removed(rows[:, None], np.arange(distmat.shape[1])[None, :])
    q_row, raw_pos, kept_pos = _kept_match_positions(order, q_pids[rows], g_pids, removed_rows)
    distinct_before = None
    if identities is not None:
        first_raw = np.full(len(rows), distmat.shape[1])
        num_rel = np.bincount(q_row, minlength=len(rows))
        has_match = num_rel > 0
        first_raw[has_match] = raw_pos[(np.cumsum(num_rel) - num_rel)[has_match]]
        distinct_before = _distinct_ids_before(order, removed_rows, first_raw, identities)
    results.record(rows, q_row, kept_pos, distinct_before)


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


def _distinct_ids_before(order, removed, first_raw, identities):
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
    best_rank_per_pid = np.minimum.reduceat(rank[:, identities.columns], identities.starts, axis=1)
    return np.count_nonzero(best_rank_per_pid < first_raw[:, None], axis=1)


def evaluate_by_camera(distmat, q_pids, g_pids, q_cams, g_cams, metric, max_rank=20):
    """Rank-k / mAP / mINP per camera of one distance matrix under `metric` ("sysu", "regdb", "llcm").

    Per ranked (gallery) camera c: the columns are restricted to the gallery items of camera c, and every
    query is ranked among them alone, with the metric's own removal rules (SYSU: cam-3 queries still ignore
    cam 2, so the cam-2 gallery is judged on cam-6 queries only); queries without a kept true match there
    are left out, as in the metric. Per probe (query) camera c: the rows of camera c against the whole
    gallery. Returns {"gallery": {cam: (cmc, mAP, mINP) or None}, "query": {cam: ... or None}}, with
    None for a camera with no valid query (its numbers are undefined, not 0).
    """
    distmat = np.asarray(distmat)
    labels = tuple(np.asarray(a) for a in (q_pids, g_pids, q_cams, g_cams))
    return _by_camera(distmat, *labels, metric, max_rank,
                      _per_query(metric, distmat, *labels, max_rank, stable_sort=False))


def _by_camera(distmat, q_pids, g_pids, q_cams, g_cams, metric, max_rank, per_query):
    """evaluate_by_camera, given the metric's per-query _Results of the whole matrix: a query's numbers do not
    depend on the other queries, so those of a query camera are a subset of them, not a new ranking."""
    def summary_or_none(results, queries=None):
        try:
            return results.summary(max_rank, queries)
        except NoValidQueryError:
            return None

    def gallery_camera(cam):
        columns = np.flatnonzero(g_cams == cam)
        return summary_or_none(_per_query(metric, distmat[:, columns], q_pids, g_pids[columns], q_cams,
                                          g_cams[columns], max_rank, stable_sort=False))

    return {"gallery": {int(cam): gallery_camera(cam) for cam in np.unique(g_cams)},
            "query": {int(cam): summary_or_none(per_query, q_cams == cam) for cam in np.unique(q_cams)}}


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


def evaluate_protocol(query_feats, gallery_feats, protocol, modes=("bn", "pool"), *, fusions=STANDARD_FUSIONS,
                      distance=similarity.negative_similarity, by_camera=False):
    """Evaluate every gallery trial of a test protocol for each similarity mode.

    protocol: duck-typed data_manager.TestProtocol (metric, query_pids, query_cams, gallery_pids,
    gallery_cams, trial_indices, trials, transpose). gallery_feats hold ALL candidate gallery
    images; each trial selects its rows. transpose=True (RegDB tvsearch, DEEN LLCM) ranks the
    query set for every trial-gallery row: distance = -(G_trial . Q^T) with the gallery
    labels/cameras passed as query labels/cameras.
    modes: names of `fusions` ({name: similarity.Fusion}; the standard ones by default, a method adds its
    own), whose terms name the query feature first; a transposed protocol swaps them.
    distance(row_feats, column_feats, fusion) -> [rows, columns] distances (smaller = closer), e.g. a
    re-ranked one; by default minus the similarity.
    Returns JSON-friendly {"per_trial": {mode: [{"trial", "cmc", "mAP", "mINP"}, ...]},
    "mean": {mode: {...}}, "std": {mode: {...}}}; std is the population std over trials (0 for
    a single trial). by_camera=True adds "by_camera": {mode: [{"trial", "gallery": {cam: {"cmc", "mAP",
    "mINP"} or None}, "query": {...}}, ...]} (evaluate_by_camera of each trial; "gallery" and "query" are
    the protocol's sides, also when transposed).
    """
    name = getattr(protocol, "name", "?")
    if protocol.metric not in _KNOWN_METRICS:
        raise ValueError(f"unknown metric {protocol.metric!r} in protocol {name}; "
                         f"expected one of {sorted(_KNOWN_METRICS)}")
    trial_indices, trials = list(protocol.trial_indices), list(protocol.trials)
    if not trial_indices or len(trial_indices) != len(trials):
        raise ValueError(f"protocol {name} needs one trial id per gallery trial, "
                         f"got {len(trials)} ids for {len(trial_indices)} trials")
    transpose = bool(getattr(protocol, "transpose", False))
    unknown = [mode for mode in modes if mode not in fusions]
    if unknown:
        raise ValueError(f"unknown similarity mode(s) {unknown}; expected some of {', '.join(fusions)}")
    oriented = {mode: fusions[mode].transposed() if transpose else fusions[mode] for mode in modes}
    query = (np.asarray(protocol.query_pids), np.asarray(protocol.query_cams))
    gallery_pids, gallery_cams = np.asarray(protocol.gallery_pids), np.asarray(protocol.gallery_cams)
    gallery_feats = {key: np.asarray(value) for key, value in gallery_feats.items()}
    per_trial = {mode: [] for mode in modes}
    cameras = {mode: [] for mode in modes}
    for trial, indices in zip(trials, trial_indices):
        indices = np.asarray(indices)
        gallery_trial = {key: value[indices] for key, value in gallery_feats.items()}
        gallery = (gallery_pids[indices], gallery_cams[indices])
        rows, columns = (gallery_trial, gallery), (query_feats, query)     # each row ranks the columns
        if not transpose:
            rows, columns = columns, rows
        labels = (rows[1][0], columns[1][0], rows[1][1], columns[1][1])   # pids, pids, cameras, cameras
        for mode in modes:
            distmat = np.asarray(distance(rows[0], columns[0], oriented[mode]))
            per_query = _per_query(protocol.metric, distmat, *labels, _MAX_RANK, stable_sort=False)
            per_trial[mode].append({"trial": int(trial), **_result(per_query.summary(_MAX_RANK))})
            if by_camera:
                sides = _by_camera(distmat, *labels, protocol.metric, _MAX_RANK, per_query)
                ranked, probe = ("query", "gallery") if transpose else ("gallery", "query")
                cameras[mode].append({"trial": int(trial),
                                      **{side: {cam: None if r is None else _result(r)
                                                for cam, r in sides[role].items()}
                                         for side, role in ((ranked, "gallery"), (probe, "query"))}})
    mean = {mode: _summarise(results, np.mean) for mode, results in per_trial.items()}
    std = {mode: _summarise(results, np.std) for mode, results in per_trial.items()}
    return {"per_trial": per_trial, "mean": mean, "std": std, **({"by_camera": cameras} if by_camera else {})}


def _result(metric_output):
    """(cmc, mAP, mINP) of a metric as JSON-friendly floats."""
    cmc, mAP, mINP = metric_output
    return {"cmc": [float(v) for v in cmc], "mAP": float(mAP), "mINP": float(mINP)}


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
