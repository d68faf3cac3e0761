"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), vectorised and memory-bounded. Pure numpy; imports nothing of ours.

`re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)` has the semantics of the
distance-matrix version used across person re-id repositories:

1. All n = num_query + num_gallery items form one distance matrix D = [[q_q, q_g], [q_g^T, g_g]].
   original = (D ** 2 as float32) / (column maxima), transposed: row i holds column i of D squared,
   divided by its largest value.
2. N(i, k) = the k + 1 items nearest to i in its original row (itself included);
   R(i, k) = {j in N(i, k) : i in N(j, k)}, the k-reciprocal neighbours.
3. R*(i) = R(i, k1), plus R(j, round(k1 / 2)) for every j in R(i, k1) that shares more than 2/3 of
   its members with R(i, k1).
4. V[i, j] = exp(-original[i, j]) over j in R*(i), normalised to sum 1 (0 elsewhere).
5. Local query expansion (k2 > 1): V[i] becomes the mean of V over the first k2 items of i's ranking.
6. Jaccard distance J[i, j] = 1 - S / (2 - S) with S = sum_m min(V[i, m], V[j, m]).
7. final = J * (1 - lambda_value) + original * lambda_value, returned for the query x gallery block.

What differs from that code: ties in a ranking are broken by the lower item index (the standard code
uses numpy's default sort, whose tie order is unspecified), and sums may be accumulated in another
order or in float64 (differences around 1e-7).

How it stays within memory at the LLCM size (7,000 queries x 3,500 gallery, n = 10,500): the n x n
matrices of the standard code (D, `original`, its full argsort, V and its expansion: about 3 GB with
float32 inputs) are never built. `original` is produced one block of rows at a time, only each
row's maximum and its first max(k1 + 1, k2) neighbours are kept, V is a sparse row-compressed
matrix, and the Jaccard distances are accumulated for one block of queries at a time, for the
gallery columns only. bench/bench_rerank.py measured, at that size on 2 CPU cores: 2.3 s and
200 MB allocated at peak with the field preset (the float32 result is 98 MB of it), 2.7 s and
230 MB with TSME's.

Many galleries against one query set (test.py's gallery trials): ReusingFeatureDistances computes the
query x query distances once, where feature_distances computes all three matrices at every call.
"""
import numpy as np

# Named parameter sets: k1, k2 and lambda_value for re_ranking(**RERANK_PRESETS[name]).
RERANK_PRESETS = {
    "field": {"k1": 20, "k2": 6, "lambda_value": 0.3},     # Zhong et al. 2017; re-id repositories
    "tsme": {"k1": 31, "k2": 19, "lambda_value": 0.3},     # TSME's setting
}

# Each block of rows of `original` holds about this many cells (float32: 32 MB, plus a copy as
# large for np.partition); each sparse step handles about this many (row, column) terms at once.
_BLOCK_CELLS = 1 << 23
_BLOCK_TERMS = 1 << 21


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Re-ranked query x gallery distances (float32 [num_query, num_gallery]); see the module doc.

    q_g_dist [num_query, num_gallery], q_q_dist [num_query, num_query], g_g_dist
    [num_gallery, num_gallery]: finite distances (smaller = closer), not squared (step 1 squares
    them). k1, k2: neighbourhood sizes (positive integers); lambda_value in [0, 1]: the weight of
    the original distance.
    """
    matrices = _Distances(q_g_dist, q_q_dist, g_g_dist)
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    real = (int, float, np.integer, np.floating)
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, real) or not 0 <= lambda_value <= 1:
        raise ValueError(f"lambda_value must be a number in [0, 1], got {lambda_value!r}")
    num = matrices.num_items
    neighbours = _nearest_neighbours(matrices, min(max(k1 + 1, k2), num))
    reciprocal = _reciprocal_neighbours(neighbours, k1)
    half_reciprocal = _reciprocal_neighbours(neighbours, int(np.around(k1 / 2.0)))
    expansion = _expanded_sets(reciprocal, half_reciprocal, num)
    weights = _SparseRows.from_pairs(expansion, np.exp(-matrices.original_at(*expansion)), num)
    weights = weights.normalised()
    if k2 != 1:
        weights = _local_query_expansion(weights, neighbours[:, :min(k2, num)])
    return _final_distances(matrices, weights, lambda_value)


def feature_distances(query_features, gallery_features):
    """(q_g_dist, q_q_dist, g_g_dist) for re_ranking from L2-normalised features [N, C].

    Euclidean distances sqrt(2 - 2 cos), so that re_ranking's squaring gives the squared Euclidean
    distance 2 - 2 cos, the distance both common implementations rank by (the one taking features
    computes squared distances itself; the one taking matrices is fed Euclidean distances).
    Computed in the features' floating type (float32 stays float32: the matrices are large); a
    self-distance is exactly 0.
    """
    query, gallery = _unit_features(query_features, gallery_features)
    return _euclidean(query, gallery), _euclidean(query), _euclidean(gallery)


class ReusingFeatureDistances:
    """feature_distances that remembers each side's last features and their distances to themselves, and
    reuses those while that side's features stay the same bit for bit (compared, not assumed: features
    changed in place are seen). Evaluating gallery trials against one query set then computes the
    query x query matrix once (7,000 x 7,000 at the LLCM size, about a third of a trial). It holds per
    side a copy of the features and their self-distances (at the LLCM size with 2048-d float32
    features: 57 + 196 MB for the queries, 28 + 49 MB for the gallery). The remembered matrices are
    returned read-only."""

    def __init__(self):
        self._last = {"query": None, "gallery": None}          # side -> (features, self-distances)

    def __call__(self, query_features, gallery_features):
        query, gallery = _unit_features(query_features, gallery_features)
        return (_euclidean(query, gallery), self._self_distances("query", query),
                self._self_distances("gallery", gallery))

    def _self_distances(self, side, features):
        if self._last[side] is not None and _same_bits(self._last[side][0], features):
            return self._last[side][1]
        self._last[side] = None                                # the old pair goes before the new one is made
        distances = _euclidean(features)
        distances.flags.writeable = False
        self._last[side] = (features.copy(), distances)
        return distances


def _same_bits(a, b):
    """Whether two finite float arrays hold the same bits (== alone takes -0.0 for 0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
            and np.array_equal(np.signbit(a), np.signbit(b)))


def _unit_features(query_features, gallery_features):
    """The two feature arrays, checked (non-empty, 2-D, real, finite, L2-normalised, one size) and cast to
    their common floating type (float32 stays float32: the distance matrices are large)."""
    features = []
    for name, values in (("query_features", query_features), ("gallery_features", gallery_features)):
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[0] == 0 or values.dtype.kind not in "fiu":
            raise ValueError(f"{name} must be a non-empty 2-D array of real numbers [N, C], "
                             f"got shape {values.shape} and dtype {values.dtype}")
        if not np.isfinite(values).all():
            raise ValueError(f"{name} holds non-finite values")
        norms = np.linalg.norm(values, axis=1)
        if np.abs(norms - 1).max() > 1e-3:
            raise ValueError(f"{name} must be L2-normalised (row norms 1), got norms from "
                             f"{norms.min():.4g} to {norms.max():.4g}")
        features.append(values)
    query, gallery = features
    if query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query and gallery features differ in size: {query.shape[1]} vs "
                         f"{gallery.shape[1]}")
    dtype = np.result_type(query.dtype, gallery.dtype, np.float32)
    return query.astype(dtype, copy=False), gallery.astype(dtype, copy=False)


def _euclidean(a, b=None):
    """Euclidean distances sqrt(2 - 2 cos) from the unit rows of a to those of b [len(a), len(b)], or
    among the rows of a (b None; then the diagonal is exactly 0), in a's type."""
    # In place on the product: one [len(a), len(b)] buffer (at the LLCM size the query x query one alone
    # is 196 MB in float32). -2x + 2 rounds exactly like 2 - 2x (scaling by 2 is exact).
    dtype = a.dtype
    squared = a @ (a if b is None else b).T
    squared *= dtype.type(-2)
    squared += dtype.type(2)
    np.maximum(squared, 0, out=squared)
    if b is None:
        np.fill_diagonal(squared, 0)
    return np.sqrt(squared, out=squared)


class _Distances:
    """The three input matrices, read as the rows of `original` (step 1) without building D."""

    def __init__(self, q_g_dist, q_q_dist, g_g_dist):
        q_g, q_q, g_g = (np.asarray(m) for m in (q_g_dist, q_q_dist, g_g_dist))
        for name, matrix in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
            if matrix.ndim != 2 or matrix.dtype.kind not in "fiu":
                raise ValueError(f"{name} must be a 2-D array of real numbers, got shape "
                                 f"{matrix.shape} and dtype {matrix.dtype}")
        num_q, num_g = q_g.shape
        if num_q == 0 or num_g == 0:
            raise ValueError(f"q_g_dist must be non-empty, got shape {q_g.shape}")
        for name, matrix, shape in (("q_q_dist", q_q, (num_q, num_q)), ("g_g_dist", g_g, (num_g, num_g))):
            if matrix.shape != shape:
                raise ValueError(f"{name} must have shape {shape} to match q_g_dist {q_g.shape}, "
                                 f"got {matrix.shape}")
        for name, matrix in (("q_g_dist", q_g), ("q_q_dist", q_q), ("g_g_dist", g_g)):
            if not np.isfinite(matrix).all():
                raise ValueError(f"{name} holds non-finite values")
        # Squared in D's type, as the standard code does (np.concatenate promotes the three);
        # integers in float64, float16 in float32.
        self.dtype = np.result_type(q_g, q_q, g_g, np.float32 if q_g.dtype.kind == "f" else np.float64)
        self.q_g, self.q_q, self.g_g = q_g, q_q, g_g
        self.num_query, self.num_gallery = num_q, num_g
        self.num_items = num_q + num_g
        self.row_max = None                                    # set by _nearest_neighbours

    def row_blocks(self, rows_per_block):
        """(first, stop) row ranges of original, none straddling the query / gallery boundary."""
        for first_part, stop_part in ((0, self.num_query), (self.num_query, self.num_items)):
            for first in range(first_part, stop_part, rows_per_block):
                yield first, min(first + rows_per_block, stop_part)

    def squared_rows(self, first, stop):
        """float32 [stop - first, n]: column i of D, squared, for items i in [first, stop)."""
        num_q = self.num_query
        rows = np.empty((stop - first, self.num_items), dtype=self.dtype)
        if stop <= num_q:
            rows[:, :num_q] = self.q_q[:, first:stop].T
            rows[:, num_q:] = self.q_g[first:stop]
        else:
            rows[:, :num_q] = self.q_g[:, first - num_q:stop - num_q].T
            rows[:, num_q:] = self.g_g[:, first - num_q:stop - num_q].T
        np.square(rows, out=rows)
        return rows.astype(np.float32, copy=False)

    def original_at(self, item, other):
        """original[item, other] for arrays of pairs: D[other, item] squared, over item's row max."""
        num_q = self.num_query
        values = np.empty(len(item), dtype=self.dtype)
        item_q, other_q = item < num_q, other < num_q
        for where, matrix, row, column in (
                (item_q & other_q, self.q_q, other, item),
                (item_q & ~other_q, self.q_g, item, other - num_q),
                (~item_q & other_q, self.q_g, other, item - num_q),
                (~item_q & ~other_q, self.g_g, other - num_q, item - num_q)):
            values[where] = matrix[row[where], column[where]]
        return np.square(values).astype(np.float32) / self.row_max[item]


def _nearest_neighbours(matrices, count):
    """int [n, count]: each item's `count` nearest items in its original row, nearest first, ties by
    lower index. Also stores each row's maximum (step 1's normaliser) in matrices.row_max."""
    num = matrices.num_items
    neighbours = np.empty((num, count), dtype=np.intp)
    matrices.row_max = np.empty(num, dtype=np.float32)
    for first, stop in matrices.row_blocks(max(1, _BLOCK_CELLS // num)):
        rows = matrices.squared_rows(first, stop)
        row_max = rows.max(axis=1)
        if not (row_max > 0).all():
            item = first + int(np.flatnonzero(~(row_max > 0))[0])
            raise ValueError(f"item {item} (0-based over queries then gallery) is at distance 0 from "
                             f"every item; its distances cannot be normalised")
        matrices.row_max[first:stop] = row_max
        rows /= row_max[:, None]
        neighbours[first:stop] = _smallest(rows, count)
    return neighbours


def _smallest(rows, count):
    """Column indices of the `count` smallest entries of each row, ascending by (value, column).

    np.partition finds each row's count-th smallest value t; the entries below t all belong, and of
    those equal to t, the lowest columns fill the rest (np.argpartition would pick among equal
    values arbitrarily).
    """
    num_rows, width = rows.shape
    threshold = np.partition(rows, count - 1, axis=1)[:, count - 1:count]
    chosen = rows < threshold
    at_threshold = rows == threshold
    wanted = count - np.add.reduce(chosen.view(np.uint8), axis=1, dtype=np.intp)
    tied = np.add.reduce(at_threshold.view(np.uint8), axis=1, dtype=np.intp) > wanted
    chosen |= at_threshold
    if tied.any():
        # Keep only the first `wanted` equal entries of those rows.
        rank_among_equal = np.cumsum(at_threshold[tied], axis=1)
        chosen[tied] &= ~at_threshold[tied] | (rank_among_equal <= wanted[tied][:, None])
    columns = (np.flatnonzero(chosen) % width).reshape(num_rows, count)   # ascending per row
    order = np.argsort(np.take_along_axis(rows, columns, axis=1), axis=1, kind="stable")
    return np.take_along_axis(columns, order, axis=1)


def _reciprocal_neighbours(neighbours, k):
    """(item, neighbour) pairs of R(i, k): j among the first k + 1 of i's ranking and i among j's;
    sorted by item then neighbour."""
    num, available = neighbours.shape
    width = min(k + 1, available)
    item = np.repeat(np.arange(num), width)
    other = neighbours[:, :width].reshape(-1)
    links = np.sort(item * num + other)
    reciprocal = _contains(links, other * num + item)
    pairs = np.sort(item[reciprocal] * num + other[reciprocal])
    return pairs // num, pairs % num


def _contains(sorted_keys, keys):
    """bool per key: whether it occurs in sorted_keys."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    position = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[position] == keys


def _expanded_sets(reciprocal, half_reciprocal, num):
    """(item, member) pairs of R*(i) (step 3), sorted by item then member, without repeats."""
    item, other = reciprocal
    half_item, half_other = half_reciprocal
    half_start = np.searchsorted(half_item, np.arange(num + 1))
    half_size = np.diff(half_start)
    reciprocal_keys = item * num + other                       # sorted
    members = [reciprocal_keys]
    # Candidate sets R(j, k1/2) for every pair (i, j); a few pairs at a time bounds the memory.
    for first, stop in _chunks(half_size[other], _BLOCK_TERMS):
        pair_item, candidate = item[first:stop], other[first:stop]
        term_pair, position = _ragged(half_start[candidate], half_size[candidate])
        term_member = half_other[position]
        shared = _contains(reciprocal_keys, pair_item[term_pair] * num + term_member)
        overlap = np.bincount(term_pair, weights=shared, minlength=stop - first)
        accepted = overlap > 2.0 / 3 * half_size[candidate]    # the standard code's test, as written
        added = accepted[term_pair]
        members.append(pair_item[term_pair[added]] * num + term_member[added])
    keys = _unique(np.concatenate(members))
    return keys // num, keys % num


def _unique(keys):
    """Sorted distinct values of an int array (np.unique hashes integers, many times slower here)."""
    keys = np.sort(keys)
    return keys[np.r_[True, keys[1:] != keys[:-1]]] if len(keys) else keys


class _SparseRows:
    """An n x n matrix with few nonzeros per row: row i holds columns[start[i]:start[i + 1]]
    (ascending) with values values[...] (float32)."""

    def __init__(self, start, columns, values):
        self.start, self.columns, self.values = start, columns, values

    @classmethod
    def from_pairs(cls, pairs, values, num):
        """From (row, column) pairs sorted by row then column."""
        rows, columns = pairs
        return cls(np.searchsorted(rows, np.arange(num + 1)), columns, values.astype(np.float32))

    @property
    def num_rows(self):
        return len(self.start) - 1

    def row_of_entries(self):
        return np.repeat(np.arange(self.num_rows), np.diff(self.start))

    def normalised(self):
        """Each nonempty row divided by its sum (step 4)."""
        sums = np.add.reduceat(self.values, self.start[:-1][np.diff(self.start) > 0])
        row_sum = np.ones(self.num_rows, dtype=np.float32)
        row_sum[np.diff(self.start) > 0] = sums
        return _SparseRows(self.start, self.columns, self.values / row_sum[self.row_of_entries()])

    def entries_of(self, rows):
        """(index into rows, column, value) of every entry of the listed rows, row by row."""
        owner, position = _ragged(self.start[rows], self.start[rows + 1] - self.start[rows])
        return owner, self.columns[position], self.values[position]


def _ragged(starts, sizes):
    """The ragged (CSR) gather: (owner, position) over the segments [starts[s], starts[s] + sizes[s]),
    segment after segment, each position in its segment's order, with the segment s it belongs to."""
    owner = np.repeat(np.arange(len(sizes)), sizes)
    position = np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
    position += np.arange(len(position))
    return owner, position


def _chunks(work, budget):
    """Split range(len(work)) into consecutive (first, stop) chunks of about `budget` total work."""
    total = np.cumsum(work)
    first = 0
    while first < len(work):
        stop = int(np.searchsorted(total, (total[first - 1] if first else 0) + budget, side="right"))
        stop = min(max(stop, first + 1), len(work))
        yield first, stop
        first = stop


def _local_query_expansion(weights, expansion_neighbours):
    """Step 5: row i becomes the mean of the rows of its first k2 neighbours. Per chunk of rows, a
    [rows, n] array of flags marks the union of the k2 rows' columns (cheaper than sorting them)."""
    num, width = expansion_neighbours.shape
    sizes = np.diff(weights.start)
    starts, columns, values = [np.zeros(1, dtype=np.intp)], [], []
    row_cells = max(1, _BLOCK_CELLS // num)
    for first, stop in _chunks(sizes[expansion_neighbours].sum(axis=1), _BLOCK_TERMS):
        for sub_first in range(first, stop, row_cells):
            sub_stop = min(sub_first + row_cells, stop)
            owner, column, value = weights.entries_of(expansion_neighbours[sub_first:sub_stop].reshape(-1))
            cell = (owner // width) * num + column
            used = np.zeros((sub_stop - sub_first) * num, dtype=bool)
            used[cell] = True
            cells = np.flatnonzero(used)
            total = np.bincount(np.searchsorted(cells, cell), weights=value, minlength=len(cells))
            starts.append(np.bincount(cells // num, minlength=sub_stop - sub_first))
            columns.append(cells % num)
            values.append((total / width).astype(np.float32))
    start = np.cumsum(np.concatenate(starts))
    return _SparseRows(start, np.concatenate(columns), np.concatenate(values))


def _final_distances(matrices, weights, lambda_value):
    """Steps 6 and 7 for the query x gallery block: S[i, g] = sum_m min(V[i, m], V[g, m]) added up
    term by term from the gallery items that share a nonzero column m with query i."""
    num_q, num_g, num = matrices.num_query, matrices.num_gallery, matrices.num_items
    # The gallery rows' entries regrouped by column (which gallery items use each column m).
    entry_row = weights.row_of_entries()
    gallery_entries = np.flatnonzero(entry_row >= num_q)
    by_column = gallery_entries[np.argsort(weights.columns[gallery_entries], kind="stable")]
    column_start = np.searchsorted(weights.columns[by_column], np.arange(num + 1))
    column_size = np.diff(column_start)
    column_item = entry_row[by_column] - num_q
    column_value = weights.values[by_column]

    query_entries = slice(0, weights.start[num_q])
    query_work = np.bincount(entry_row[query_entries], weights=column_size[weights.columns[query_entries]],
                             minlength=num_q)
    result = np.empty((num_q, num_g), dtype=np.float32)
    row_cells = max(1, _BLOCK_CELLS // (2 * num_g))
    for first, stop in _chunks(query_work, _BLOCK_TERMS):
        for sub_first in range(first, stop, row_cells):        # the dense sum is [rows, num_g] float64
            sub_stop = min(sub_first + row_cells, stop)
            owner, column, value = weights.entries_of(np.arange(sub_first, sub_stop))
            # One term per (query entry (i, m), gallery entry (g, m)): each query entry spread over its
            # column's gallery entries, which sit at consecutive cells.
            term_entry, term_cell = _ragged(column_start[column], column_size[column])
            shared = np.minimum(value[term_entry], column_value[term_cell])
            target = owner[term_entry] * num_g
            target += column_item[term_cell]
            overlap = np.bincount(target, weights=shared, minlength=(sub_stop - sub_first) * num_g)
            overlap = overlap.astype(np.float32).reshape(sub_stop - sub_first, num_g)
            jaccard = 1 - overlap / (np.float32(2) - overlap)
            original = np.square(matrices.q_g[sub_first:sub_stop].astype(matrices.dtype))
            original = original.astype(np.float32) / matrices.row_max[sub_first:sub_stop, None]
            result[sub_first:sub_stop] = jaccard * (1 - lambda_value) + original * lambda_value
    return result
