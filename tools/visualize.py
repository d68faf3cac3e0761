"""Figures from features saved by `test.py --save-features FEATS.npz`.

Sub-commands:
  ranks  ranked-list image grids: each row is a query followed by its top-k gallery images of one trial,
         every gallery thumbnail framed green (same identity) or red (different identity).
         Drawn with Pillow only, so it works without matplotlib.
  tsne   t-SNE of query and gallery features of a subset of identities; colour = identity,
         marker = modality (o visible, ^ infrared). Needs matplotlib (optional dependency).
  rerank per query, whether k-reciprocal re-ranking moved the true match: the ranked list before and after,
         with the first true match's rank in both, the queries it moved most first (Pillow only).
  cameras  bar chart of a metric per camera from a `test.py --by-camera` results JSON, low-light cameras
         hatched and labelled. Needs matplotlib.

The t-SNE is an exact numpy implementation (`tsne`), adequate for up to a few thousand points.
"""
import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from eval_metrics import removed_gallery  # noqa: E402  (needs the repo root on sys.path)
from similarity import STANDARD_FUSIONS, similarity  # noqa: E402
import json  # noqa: E402

from evaluation import (LABEL_SIDE_KEYS, FeaturesFileError, camera_label, feature_names,  # noqa: E402
                        read_features_file, rerank_parameters, reranked_distance)
import methods  # noqa: E402
from utils import ConfigError  # noqa: E402

MATPLOTLIB_MISSING = "matplotlib is required for figures: pip install matplotlib"
VISIBLE, INFRARED = 1, 2                      # modality codes used in the npz (query_modal / gallery_modal)
TRUE_COLOUR = (0, 170, 0)
FALSE_COLOUR = (220, 30, 30)
QUERY_COLOUR = (40, 90, 220)
ROWS_PER_PAGE = 8                             # keeps each PNG a readable size


class VisualizeError(ValueError):
    """A user-facing problem with the inputs (file missing, key missing, bad option)."""


# --------------------------------------------------------------------------------------------------
# Loading the saved features
# --------------------------------------------------------------------------------------------------
@dataclass
class SavedFeatures:
    source: str
    protocol: str
    query: dict            # the features (pool, bn, ...), pids, cams, paths, modal (per-sample arrays)
    gallery: dict
    trials: list           # trial ids
    trial_indices: list    # per trial, indices into the gallery arrays
    transpose: bool        # rows = gallery, columns = query (RegDB tvsearch, DEEN LLCM), as in evaluation
    fusions: dict          # the similarity modes of the method that saved them ({name: similarity.Fusion})

    def fusion(self, mode):
        if mode not in self.fusions:
            raise VisualizeError(f"similarity mode {mode} is not one of {self.source}'s method: "
                                 f"{', '.join(self.fusions)}")
        return self.fusions[mode]

    def trial_position(self, trial):
        """Position of trial id `trial` (None -> the first stored trial)."""
        if trial is None:
            return 0
        if trial not in self.trials:
            raise VisualizeError(f"trial {trial} not in {self.source} (stored trials: {self.trials})")
        return self.trials.index(trial)

    @property
    def metric(self):
        """Metric family from the protocol name ("sysu-all-single" -> "sysu")."""
        return self.protocol.split("-")[0].lower()

    def trial_sets(self, pos):
        """(probes, ranked set) for trial position `pos`: the query set and that trial's gallery, swapped
        when the protocol is evaluated transposed. Each is a dict of per-sample arrays
        (the features and evaluation.LABEL_SIDE_KEYS)."""
        gallery = {key: _take(values, self.trial_indices[pos]) for key, values in self.gallery.items()}
        return (gallery, self.query) if self.transpose else (self.query, gallery)


def _take(values, idx):
    return [values[i] for i in idx] if isinstance(values, list) else values[idx]


def load_features(path) -> SavedFeatures:
    """Read and validate a test.py --save-features npz (evaluation.read_features_file). An optional boolean
    `transpose` key marks protocols evaluated with gallery rows (absent -> False)."""
    try:
        data, trial_indices = read_features_file(path)
    except FeaturesFileError as exc:
        raise VisualizeError(str(exc)) from None
    trials = [int(t) for t in np.atleast_1d(data["trials"])]
    return SavedFeatures(source=path, protocol=str(data.get("protocol", "unknown")),
                         query=_side(data, "query"), gallery=_side(data, "gallery"),
                         trials=trials, trial_indices=trial_indices,
                         transpose=bool(data.get("transpose", False)), fusions=_saved_fusions(data))


def _saved_fusions(data):
    """The similarity modes of the method named in the file's options; the standard ones for files that name
    none (written before the options held the model)."""
    options = json.loads(str(data["options"])) if "options" in data else {}
    method = options.get("model", {}).get("method")
    return STANDARD_FUSIONS if method is None else methods.get(method).similarity_modes()


def _side(data, side):
    arrays = {key: data[f"{side}_{key}"] for key in feature_names(data) + LABEL_SIDE_KEYS}
    n = len(arrays["pids"])
    arrays["modal"] = np.broadcast_to(np.asarray(arrays["modal"], dtype=np.int64), (n,))
    arrays["paths"] = [str(p) for p in arrays["paths"]]
    return arrays


# --------------------------------------------------------------------------------------------------
# Ranked lists
# --------------------------------------------------------------------------------------------------
def kept_gallery(metric, probes, ranked_set):
    """[probes, ranked set] mask of the entries the evaluation metric keeps for each probe (REFERENCE 3.1-3.3)."""
    return ~removed_gallery(metric, probes["pids"], probes["cams"], ranked_set["pids"], ranked_set["cams"])


def rank_gallery(sim_row, excluded):
    """Gallery positions by decreasing similarity (stable), skipping excluded ones."""
    order = np.argsort(-sim_row, kind="stable")
    return order[~excluded[order]]


def pick_queries(q_pids, g_pids, keep_masks, num, seed):
    """Seeded choice of `num` queries that have at least one true match among their kept gallery."""
    has_match = np.array([np.any((g_pids == pid) & keep) for pid, keep in zip(q_pids, keep_masks)], dtype=bool)
    candidates = np.flatnonzero(has_match)
    if len(candidates) == 0:
        raise VisualizeError("no query has a true match in this trial's gallery")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(candidates, size=min(num, len(candidates)), replace=False))


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a ranked-list grid (exposed so tests can read frame pixels)."""
    thumb_w: int = 64
    thumb_h: int = 128
    border: int = 4
    label_h: int = 30
    pad: int = 6
    query_gap: int = 16            # extra space separating the query column from its ranked list
    header_h: int = 22

    @property
    def cell_w(self):
        return self.thumb_w + 2 * self.border

    @property
    def cell_h(self):
        return self.thumb_h + 2 * self.border + self.label_h

    def cell_origin(self, row, col):
        """Top-left pixel of the frame of cell (row, col); col 0 is the query, 1..k the ranks."""
        x = self.pad + col * (self.cell_w + self.pad) + (self.query_gap if col > 0 else 0)
        y = self.header_h + self.pad + row * (self.cell_h + self.pad)
        return x, y

    def canvas_size(self, rows, top_k):
        x, _ = self.cell_origin(0, top_k)
        return x + self.cell_w + self.pad, self.header_h + self.pad + rows * (self.cell_h + self.pad)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single fixed-size bitmap font
        return ImageFont.load_default()


def _thumbnail(path, layout):
    try:
        with Image.open(path) as img:
            return img.convert("RGB").resize((layout.thumb_w, layout.thumb_h), Image.BILINEAR)
    except OSError as exc:  # includes PIL.UnidentifiedImageError
        raise VisualizeError(f"cannot read image {path}: {exc}") from None


def _draw_cell(canvas, draw, layout, row, col, image_path, colour, lines, font):
    x, y = layout.cell_origin(row, col)
    draw.rectangle([x, y, x + layout.cell_w - 1, y + 2 * layout.border + layout.thumb_h - 1], fill=colour)
    canvas.paste(_thumbnail(image_path, layout), (x + layout.border, y + layout.border))
    text_y = y + 2 * layout.border + layout.thumb_h + 2
    for line in lines:
        draw.text((x + 2, text_y), line, fill=(0, 0, 0), font=font)
        text_y += 13


def render_ranked_rows(rows, top_k, title, layout=GridLayout()) -> Image.Image:
    """rows: list of dicts {query_path, query_pid, query_cam, first_hit, ranked: [(path, pid, cam, score)]}, and
    optionally "label": the query cell's second line instead of "cam<c> hit@<rank>"."""
    canvas = Image.new("RGB", layout.canvas_size(len(rows), top_k), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    draw.text((layout.pad, 5), title, fill=(0, 0, 0), font=_font(13))
    for r, row in enumerate(rows):
        hit = f"hit@{row['first_hit']}" if row["first_hit"] else "no hit"
        _draw_cell(canvas, draw, layout, r, 0, row["query_path"], QUERY_COLOUR,
                   [f"Q id {row['query_pid']}", row.get("label", f"cam{row['query_cam']} {hit}")], font)
        for k, (path, pid, cam, sim) in enumerate(row["ranked"], start=1):
            colour = TRUE_COLOUR if pid == row["query_pid"] else FALSE_COLOUR
            _draw_cell(canvas, draw, layout, r, k, path, colour, [f"#{k} id {pid}", f"cam{cam} {sim:+.2f}"], font)
    return canvas


def resolve_image(path, image_root, source):
    full = path if image_root is None or os.path.isabs(path) else os.path.join(image_root, path)
    if not os.path.isfile(full):
        hint = "" if image_root else "; pass --image-root if the paths are relative"
        raise VisualizeError(f"image not found: {full} (listed in {source}){hint}")
    return full


def ranked_rows(feats: SavedFeatures, mode, trial_pos, num_queries, top_k, seed, image_root=None):
    """Build the row descriptions for `render_ranked_rows` (query choice, ranking, true/false flags)."""
    probes, ranked_set = feats.trial_sets(trial_pos)
    g_pids, g_cams = ranked_set["pids"], ranked_set["cams"]
    sim = similarity(probes, ranked_set, feats.fusion(mode))    # reads only the features it needs
    keep = kept_gallery(feats.metric, probes, ranked_set)
    rows = []
    for qi in pick_queries(probes["pids"], g_pids, keep, num_queries, seed):
        order = rank_gallery(sim[qi], ~keep[qi])
        hits = np.flatnonzero(g_pids[order] == probes["pids"][qi])
        ranked = [(resolve_image(ranked_set["paths"][j], image_root, feats.source), int(g_pids[j]),
                   int(g_cams[j]), float(sim[qi, j])) for j in order[:top_k]]
        rows.append({"query_path": resolve_image(probes["paths"][qi], image_root, feats.source),
                     "query_pid": int(probes["pids"][qi]), "query_cam": int(probes["cams"][qi]),
                     "first_hit": int(hits[0]) + 1 if len(hits) else None, "ranked": ranked})
    return rows


def run_ranks(args) -> list:
    feats = load_features(args.features)
    pos = feats.trial_position(args.trial)
    rows = ranked_rows(feats, args.feature, pos, args.num_queries, args.top_k, args.seed, args.image_root)
    stem = f"ranks_{feats.protocol}_trial{feats.trials[pos]}_{args.feature}"
    title = (f"{feats.protocol}  trial {feats.trials[pos]}  feature {args.feature}  "
             f"top-{args.top_k}  (green = same identity, red = different)")
    return write_pages(rows, args.top_k, title, args.out, stem)


def write_pages(rows, top_k, title, out, stem):
    """render_ranked_rows over pages of ROWS_PER_PAGE rows (even: a query's before/after rows stay on one
    page); returns the PNG paths."""
    os.makedirs(out, exist_ok=True)
    pages = [rows[i:i + ROWS_PER_PAGE] for i in range(0, len(rows), ROWS_PER_PAGE)]
    written = []
    for p, page in enumerate(pages):
        path = os.path.join(out, f"{stem}.png" if len(pages) == 1 else f"{stem}_p{p}.png")
        render_ranked_rows(page, top_k, title).save(path)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# Re-ranking: where the true match moved
# --------------------------------------------------------------------------------------------------
def first_hits(scores, keep, probe_pids, ranked_pids):
    """1-based rank of each probe's first kept true match when ranking by decreasing score (None: no match)."""
    hits = []
    for row, kept, pid in zip(scores, keep, probe_pids):
        order = rank_gallery(row, ~kept)
        matches = np.flatnonzero(ranked_pids[order] == pid)
        hits.append(int(matches[0]) + 1 if len(matches) else None)
    return hits


def rerank_moves(feats: SavedFeatures, mode, trial_pos, params):
    """(similarity before, minus the re-ranked distance after, kept masks, first-hit ranks before, after) of
    every probe of one trial."""
    probes, ranked_set = feats.trial_sets(trial_pos)
    keep = kept_gallery(feats.metric, probes, ranked_set)
    fusion = feats.fusion(mode)
    before = similarity(probes, ranked_set, fusion)
    after = -reranked_distance(**params)(probes, ranked_set, fusion).astype(np.float64)
    return (before, after, keep, first_hits(before, keep, probes["pids"], ranked_set["pids"]),
            first_hits(after, keep, probes["pids"], ranked_set["pids"]))


def most_moved(hits_before, hits_after, num):
    """Up to `num` probes with a true match, by decreasing |rank change| (then index)."""
    moved = [(abs(b - a), i) for i, (b, a) in enumerate(zip(hits_before, hits_after)) if b is not None]
    return [i for _, i in sorted(moved, key=lambda m: (-m[0], m[1]))[:num]]


def run_rerank(args) -> list:
    feats = load_features(args.features)
    pos = feats.trial_position(args.trial)
    try:
        _, params = rerank_parameters(args.rerank)
    except ValueError as exc:
        raise VisualizeError(f"--rerank {' '.join(args.rerank)}: {exc}") from None
    before, after, keep, hits_before, hits_after = rerank_moves(feats, args.feature, pos, params)
    probes, ranked_set = feats.trial_sets(pos)
    rows = []
    for qi in most_moved(hits_before, hits_after, args.num_queries):
        for when, scores, hit in (("before", before, hits_before[qi]), ("after", after, hits_after[qi])):
            order = rank_gallery(scores[qi], ~keep[qi])[:args.top_k]
            rows.append({"query_path": resolve_image(probes["paths"][qi], args.image_root, feats.source),
                         "query_pid": int(probes["pids"][qi]), "query_cam": int(probes["cams"][qi]),
                         "first_hit": hit, "label": f"{when}: hit@{hit}",
                         "ranked": [(resolve_image(ranked_set["paths"][j], args.image_root, feats.source),
                                     int(ranked_set["pids"][j]), int(ranked_set["cams"][j]), float(scores[qi, j]))
                                    for j in order]})
    changes = [a - b for b, a in zip(hits_before, hits_after) if b is not None]
    print(f"{feats.protocol} trial {feats.trials[pos]} {args.feature}: re-ranking ({params['k1']}, {params['k2']}, "
          f"{params['lambda_value']}) moved the first true match up for {sum(c < 0 for c in changes)} probes, down "
          f"for {sum(c > 0 for c in changes)}, not for {sum(c == 0 for c in changes)}", file=sys.stderr)
    title = (f"{feats.protocol} trial {feats.trials[pos]} {args.feature}: before / after re-ranking "
             f"k1={params['k1']} k2={params['k2']} lambda={params['lambda_value']} (green = same identity)")
    stem = f"rerank_{feats.protocol}_trial{feats.trials[pos]}_{args.feature}"
    return write_pages(rows, args.top_k, title, args.out, stem)


# --------------------------------------------------------------------------------------------------
# Per-camera bar chart (test.py --by-camera)
# --------------------------------------------------------------------------------------------------
def camera_bars(results, mode, metric):
    """[(side, [(label, mean, std, low_light)])] of a test.py --by-camera results JSON, for the sides with
    several cameras; VisualizeError (with test.py's note) when there is no per-camera table."""
    by_camera = results.get("by_camera")
    if by_camera is None:
        raise VisualizeError("the results hold no per-camera numbers: run test.py with --by-camera")
    if "summary" not in by_camera:
        raise VisualizeError(by_camera.get("note", "the results hold no per-camera table"))
    if mode not in by_camera["summary"]:
        raise VisualizeError(f"feature {mode} not in the results (they hold {', '.join(by_camera['summary'])})")
    low_light = set(by_camera["low_light_cameras"])
    bars = []
    for side in ("gallery", "query"):
        cameras = by_camera["summary"][mode][side]["cameras"]
        if len(cameras) < 2:
            continue
        bars.append((side, [(camera_label(int(cam), low_light),
                             r["mean"][metric], r["std"][metric], int(cam) in low_light)
                            for cam, r in sorted(cameras.items(), key=lambda item: int(item[0]))
                            if r["mean"][metric] is not None]))
    return bars


def run_cameras(args) -> list:
    try:
        with open(args.results) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        raise VisualizeError(f"cannot read results {args.results}: {exc}") from None
    bars = camera_bars(results, args.feature, args.metric)
    plt = import_pyplot()
    fig, axes = plt.subplots(1, len(bars), figsize=(4 + 1.2 * sum(len(b) for _, b in bars), 4.5), dpi=110,
                             squeeze=False)
    for ax, (side, side_bars) in zip(axes[0], bars):
        labels, means, stds, dark = zip(*side_bars)
        ax.bar(range(len(labels)), [100 * m for m in means], yerr=[100 * s for s in stds], capsize=3,
               color=["dimgray" if d else "tab:blue" for d in dark], edgecolor="black")
        for k, d in enumerate(dark):
            if d:
                ax.patches[k].set_hatch("//")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel(f"{args.metric} (%)")
        ax.set_title(f"per {side} camera")
    fig.suptitle(f"{results['protocol']['name']} {args.feature}: {args.metric} per camera "
                 f"(mean ± std over trials; hatched = low-light)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    return [args.out]


# --------------------------------------------------------------------------------------------------
# t-SNE (exact, numpy)
# --------------------------------------------------------------------------------------------------
def squared_distances(x):
    """Pairwise squared Euclidean distances, clipped at 0 against rounding."""
    sq = np.sum(x * x, axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)


def conditional_affinities(d2, perplexity, tol=1e-5, max_steps=100):
    """Row-stochastic P[j|i] with a Gaussian precision per row found by binary search so that the
    row entropy (nats) equals log(perplexity). Returns (P, betas)."""
    n = d2.shape[0]
    target = np.log(perplexity)
    P = np.zeros((n, n))
    betas = np.ones(n)
    for i in range(n):
        d = np.delete(d2[i], i)
        d = d - d.min()                                   # shift-invariant; avoids exp underflow
        beta, lo, hi = 1.0, 0.0, np.inf
        for _ in range(max_steps):
            p = np.exp(-d * beta)
            total = p.sum()
            entropy = np.log(total) + beta * np.sum(d * p) / total
            if abs(entropy - target) < tol:
                break
            if entropy > target:                          # too flat: sharpen
                lo = beta
                beta = beta * 2.0 if hi == np.inf else (beta + hi) / 2.0
            else:
                hi = beta
                beta = (beta + lo) / 2.0
        P[i, np.arange(n) != i] = p / total
        betas[i] = beta
    return P, betas


def joint_affinities(x, perplexity):
    """Symmetric joint probabilities p_ij = (p_j|i + p_i|j) / 2n."""
    P, _ = conditional_affinities(squared_distances(x), perplexity)
    P = (P + P.T) / (2.0 * len(x))
    return np.maximum(P, 1e-12)


def student_t_affinities(Y):
    """Unnormalised kernel 1/(1+|y_i-y_j|^2) with zero diagonal, and Q = kernel / sum (floored)."""
    num = 1.0 / (1.0 + squared_distances(Y))
    np.fill_diagonal(num, 0.0)
    return num, np.maximum(num / num.sum(), 1e-12)


def tsne_gradient(P, Y):
    """Gradient of KL(P||Q): dY_i = 4 sum_j (p_ij - q_ij)(y_i - y_j) / (1 + |y_i - y_j|^2)."""
    num, Q = student_t_affinities(Y)
    W = (P - Q) * num
    return 4.0 * (W.sum(axis=1)[:, None] * Y - W @ Y)


def tsne_kl(P, Y):
    """The t-SNE objective KL(P||Q) over off-diagonal pairs (for tests and diagnostics)."""
    _, Q = student_t_affinities(Y)
    off = ~np.eye(len(P), dtype=bool)
    return float(np.sum(P[off] * np.log(P[off] / Q[off])))


def tsne(x, dim=2, perplexity=30.0, iters=1000, seed=0, *, exaggeration=12.0, exaggeration_iters=250,
         learning_rate=None):
    """Exact t-SNE (van der Maaten & Hinton 2008) of x [n, d] -> [n, dim].

    Perplexity-calibrated Gaussian affinities, early exaggeration, gradient descent with momentum
    (0.5 then 0.8) and per-parameter adaptive gains. O(n^2) memory/time per step: fine for n <= ~3000.
    Deterministic for a given seed.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        raise ValueError("t-SNE needs at least 2 points")
    if not 0 < perplexity < n - 1:
        raise ValueError(f"perplexity {perplexity} must be in (0, {n - 1}) for {n} points")
    lr = max(n / exaggeration / 4.0, 50.0) if learning_rate is None else learning_rate  # sklearn's "auto"
    P = joint_affinities(x, perplexity)
    rng = np.random.default_rng(seed)
    Y = rng.normal(scale=1e-4, size=(n, dim))
    velocity = np.zeros_like(Y)
    gains = np.ones_like(Y)
    for it in range(iters):
        early = it < exaggeration_iters
        grad = tsne_gradient(P * exaggeration if early else P, Y)
        momentum = 0.5 if early else 0.8
        same_sign = (grad > 0) == (velocity > 0)
        gains = np.maximum(np.where(same_sign, gains * 0.8, gains + 0.2), 0.01)
        velocity = momentum * velocity - lr * gains * grad
        Y = Y + velocity
        Y = Y - Y.mean(axis=0)
    return Y


def tsne_points(feats: SavedFeatures, feature, trial_pos, max_ids, max_points, seed):
    """Features, pids and modalities of query + trial-gallery samples of a seeded subset of identities."""
    sets = feats.trial_sets(trial_pos)
    if feature not in feats.query or feature in LABEL_SIDE_KEYS:
        stored = [key for key in feats.query if key not in LABEL_SIDE_KEYS]
        raise VisualizeError(f"feature {feature} is not in {feats.source} (it holds {', '.join(stored)})")
    shared = np.intersect1d(sets[0]["pids"], sets[1]["pids"])
    if len(shared) == 0:
        raise VisualizeError(f"{feats.source}: no identity appears in both the query set and trial gallery")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(shared, size=min(max_ids, len(shared)), replace=False))
    chosen = [np.isin(side["pids"], ids) for side in sets]
    x, pids, modal = (np.concatenate([side[key][sel] for side, sel in zip(sets, chosen)])
                      for key in (feature, "pids", "modal"))
    if len(x) > max_points:                       # exact t-SNE is O(n^2): subsample, seeded
        keep = np.sort(rng.choice(len(x), size=max_points, replace=False))
        x, pids, modal = x[keep], pids[keep], modal[keep]
    return x.astype(np.float64), pids, modal


def import_pyplot():
    """Lazy, headless matplotlib import; VisualizeError with an install hint when it is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise VisualizeError(MATPLOTLIB_MISSING) from None
    return plt


def plot_embedding(plt, Y, pids, modal, title, out):
    ids = np.unique(pids)
    cmap = plt.get_cmap("tab20" if len(ids) <= 20 else "hsv", max(len(ids), 1))
    colour_of = {pid: cmap(i) for i, pid in enumerate(ids)}
    fig, ax = plt.subplots(figsize=(8, 7), dpi=110)
    legend = []
    for code, marker, name in ((VISIBLE, "o", "visible"), (INFRARED, "^", "infrared")):
        sel = modal == code
        if sel.any():
            ax.scatter(Y[sel, 0], Y[sel, 1], c=[colour_of[p] for p in pids[sel]], marker=marker, s=28,
                       edgecolors="black", linewidths=0.3)
            # neutral legend handle: colour encodes identity, not modality
            legend.append(ax.scatter([], [], c="lightgrey", marker=marker, edgecolors="black",
                                     label=f"{name} ({int(sel.sum())})"))
    ax.legend(handles=legend, loc="best", title="marker = modality")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def run_tsne(args) -> list:
    plt = import_pyplot()
    feats = load_features(args.features)
    pos = feats.trial_position(args.trial)
    x, pids, modal = tsne_points(feats, args.feature, pos, args.max_ids, args.max_points, args.seed)
    perplexity = args.perplexity
    if perplexity >= len(x) - 1:
        perplexity = max((len(x) - 1) / 3.0, 1.0)
        print(f"note: only {len(x)} points, perplexity lowered to {perplexity:.1f}", file=sys.stderr)
    Y = tsne(x, perplexity=perplexity, iters=args.iters, seed=args.seed)
    title = (f"t-SNE {feats.protocol} trial {feats.trials[pos]} {args.feature}: "
             f"{len(np.unique(pids))} ids, colour = identity")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    plot_embedding(plt, Y, pids, modal, title, args.out)
    return [args.out]


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(description="Figures from features saved by test.py --save-features.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, seed=True):
        p.add_argument("--features", required=True, help="npz written by test.py --save-features")
        p.add_argument("--trial", type=int, default=None, help="trial id whose gallery is used (default: first)")
        if seed:
            p.add_argument("--seed", type=int, default=0, help="seed for the choice of queries / identities")

    def ranked_lists(p, num_queries, queries_help):
        p.add_argument("--out", required=True, help="output directory for the PNG(s)")
        p.add_argument("--feature", default="bn",
                       help="similarity mode used for ranking: bn, pool, sum, weighted (REFERENCE 2.3) or a mode "
                            "of the method that saved the features (e.g. DEEN's s7)")
        p.add_argument("--num-queries", type=int, default=num_queries, help=queries_help)
        p.add_argument("--top-k", type=int, default=10, help="gallery images shown per row")
        p.add_argument("--image-root", default=None, help="directory that relative image paths are under")

    ranks = sub.add_parser("ranks", help="ranked-list grids, true matches framed green, false red")
    common(ranks)
    ranked_lists(ranks, 8, "queries shown (8 rows per PNG)")
    ranks.set_defaults(run=run_ranks)

    t = sub.add_parser("tsne", help="t-SNE of both modalities (needs matplotlib)")
    common(t)
    t.add_argument("--out", required=True, help="output PNG file")
    t.add_argument("--feature", default="bn", help="feature embedded: bn, pool or another one the file holds")
    t.add_argument("--max-ids", type=int, default=20, help="identities shown (seeded choice)")
    t.add_argument("--max-points", type=int, default=3000, help="subsample above this many points")
    t.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    t.add_argument("--iters", type=int, default=1000, help="t-SNE gradient steps")
    t.set_defaults(run=run_tsne)

    rr = sub.add_parser("rerank", help="ranked lists before and after re-ranking, the most moved queries first")
    common(rr, seed=False)
    ranked_lists(rr, 4, "queries shown (two rows each), those whose first true match moved most")
    rr.add_argument("--rerank", nargs="*", default=[], metavar="K1 K2 LAMBDA",
                    help="preset (field: 20 6 0.3, tsme: 31 19 0.3) or k1 k2 lambda (default field)")
    rr.set_defaults(run=run_rerank)

    cams = sub.add_parser("cameras", help="bar chart per camera from a test.py --by-camera JSON (needs matplotlib)")
    cams.add_argument("--results", required=True, help="results JSON written by test.py --by-camera")
    cams.add_argument("--out", required=True, help="output PNG file")
    cams.add_argument("--feature", default="bn", help="similarity mode, one of the results' modes")
    cams.add_argument("--metric", default="Rank-1", choices=("Rank-1", "mAP", "mINP"), help="metric plotted")
    cams.set_defaults(run=run_cameras)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("num_queries", "top_k", "max_ids", "max_points", "iters"):
        if getattr(args, name, 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        written = args.run(args)
    except (VisualizeError, ConfigError) as exc:        # ConfigError: re-ranking refused the features
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
