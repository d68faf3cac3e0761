"""Metric-learning losses of the IRL / AGW / DEEN / CAJ code (REFERENCE 7, METHODS 6.3), vectorised and
numerically safe.

All losses compute in float32 (or float64 if given float64) with autocast disabled, so fp16/bf16 features
from an autocast region neither overflow nor lose the small distances. Zero distances (identical
features) give finite values and finite gradients. The cross-entropy part of the objectives is plain
`torch.nn.CrossEntropyLoss()` (no label smoothing, REFERENCE 7.1).
"""
from collections import namedtuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils import ConfigError


def _no_autocast(x):
    """Context that switches autocast off on the features' device (losses need full precision)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _full_precision(x):
    """Half/bfloat16 features -> float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def comp_dist(a, b):
    """Pairwise Euclidean distances D[i, j] = sqrt(max(|a_i|^2 + |b_j|^2 - 2 a_i.b_j, 1e-12)).

    The clamp keeps the square root (and its gradient) finite when a_i == b_j. The product is accumulated
    into the norms by one addmm, as the official pdist_torch / addmm_ do: the self-distances are pure
    rounding noise of a cancelling difference (up to ~5e-3 for 2048-d float32 features instead of the
    clamp's 1e-6), and this way the noise is the official one (CAJ goldens: dist_mat bitwise).
    """
    with _no_autocast(a):
        a, b = _full_precision(a), _full_precision(b)
        norms = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :]
        return torch.addmm(norms, a, b.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()


def _row_norm(diff):
    """Plain Euclidean norm of each row (no clamp, as the official code), with gradient 0 at a zero row.

    sqrt'(0) = inf would turn into NaN via the chain rule; the double `where` keeps it out of the graph.
    """
    sq = (diff * diff).sum(1)
    nonzero = sq > 0
    safe_sq = torch.where(nonzero, sq, torch.ones_like(sq))
    return torch.where(nonzero, safe_sq.sqrt(), torch.zeros_like(sq))


def _one_hot_labels(labels, dtype):
    """(one-hot matrix [n, n] in `dtype`, class index of each row [n]): class k is the k-th smallest distinct
    label (torch.unique's order), and the columns after the last class are empty.

    Built from label comparisons only: torch.unique, F.one_hot and int(max) each wait for the device (the
    output size depends on the values), while n columns are known from the shape. A row's class index is the
    number of distinct smaller labels, each distinct label counted at its first row.
    """
    n = labels.shape[0]
    rows = torch.arange(n, device=labels.device)
    same = labels[:, None] == labels[None, :]
    first_of_label = ~(same & (rows[None, :] < rows[:, None])).any(1)
    inverse = ((labels[None, :] < labels[:, None]) & first_of_label[None, :]).sum(1)
    return (inverse[:, None] == rows[None, :]).to(dtype), inverse


def _require(condition, message):
    """ConfigError(message) unless the 0-d bool tensor `condition` holds, without waiting for the device: on the
    CPU torch._assert_async raises at once; on a GPU it is a device-side assertion that stops the process when
    its kernel runs (it guards batch layouts, which a correct sampler never breaks)."""
    try:
        torch._assert_async(condition, message)
    except RuntimeError:
        raise ConfigError(message) from None


def _class_means(onehot, x):
    """Mean feature of every class column of `onehot` ([K, d]); classes absent from the rows get 0."""
    counts = onehot.sum(0)
    return (onehot.t() @ x) / counts.clamp(min=1)[:, None], counts


def _negative_center_hinge(x, onehot, margin):
    """Per row i: mean over the rows j of other identities of max(0, margin - comp_dist(x_i, c(y_j))), c the
    identity centres over all rows (QCT's d_an, TCA's negative term); 0 for a row without another identity.
    A mean over negative *rows* is the count-weighted mean over negative classes."""
    centers, counts = _class_means(onehot, x)
    hinge = F.relu(margin - comp_dist(x, centers))        # [rows, classes]: row i vs every class centre
    neg_weight = counts[None, :] * (1 - onehot)
    return (hinge * neg_weight).sum(1) / neg_weight.sum(1).clamp(min=1)


def _same_label(labels):
    return labels[:, None] == labels[None, :]


def _masked_mean(values, mask):
    """Row-wise mean of `values` over `mask`; 0 for rows with an empty mask (instead of NaN)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp(min=1)


class OriTripletLoss(nn.Module):
    """Batch-hard triplet loss: mean_i max(0, max_pos D_ij - min_neg D_ij + margin) (REFERENCE 7.3).

    `batch_size` is accepted for the official constructor signature and unused. Rows without a
    negative in the batch contribute 0.
    """

    def __init__(self, margin=0.3, *, batch_size=None):
        super().__init__()
        self.margin = margin

    def forward(self, x, labels):
        with _no_autocast(x):
            dist = comp_dist(x, x)
            same = _same_label(labels)
            hardest_pos = torch.where(same, dist, torch.full_like(dist, -float("inf"))).amax(1)
            hardest_neg = torch.where(same, torch.full_like(dist, float("inf")), dist).amin(1)
            return F.relu(hardest_pos - hardest_neg + self.margin).mean()


def _softmax_weights(dist, mask):
    """Official AGW helper: softmax of `dist` over the mask, max taken over the masked-to-zero matrix."""
    max_v = torch.max(dist * mask, dim=1, keepdim=True)[0]
    exp = torch.exp(dist - max_v) * mask
    return exp / (exp.sum(1, keepdim=True) + 1e-6)


def _softmax_weighted_pairs(x, labels, normalize_feature=False, alpha=1):
    """(dist, w_ap, w_an, fp, cn) of the WRT and ADP triplets, on full-precision features: per row the
    softmax(alpha * D)-weighted positive distance fp and softmax(-alpha * D)-weighted negative distance cn."""
    if normalize_feature:
        x = x / (x.norm(2, dim=-1, keepdim=True) + 1e-12)
    dist = comp_dist(x, x)
    same = _same_label(labels)
    is_pos, is_neg = same.to(dist.dtype), (~same).to(dist.dtype)
    dist_ap, dist_an = dist * is_pos, dist * is_neg
    weights_ap = _softmax_weights(dist_ap * alpha, is_pos)
    weights_an = _softmax_weights(-dist_an * alpha, is_neg)
    return dist, weights_ap, weights_an, (dist_ap * weights_ap).sum(1), (dist_an * weights_an).sum(1)


class TripletLoss_WRT(nn.Module):
    """Weighted regularisation triplet (AGW default, no margin; REFERENCE 7.3).

    loss = mean_i softplus(fp_i - cn_i) with softmax-weighted furthest positive fp and closest negative cn
    (softplus == the official log(1 + exp(.)) SoftMarginLoss, without its overflow).
    """

    def forward(self, x, labels, normalize_feature=False):
        with _no_autocast(x):
            _, _, _, furthest_pos, closest_neg = _softmax_weighted_pairs(_full_precision(x), labels, normalize_feature)
            return F.softplus(furthest_pos - closest_neg).mean()


ADPTerms = namedtuple("ADPTerms", ["loss", "correct", "dist", "weights_ap", "weights_an",
                                   "furthest_positive", "closest_negative", "diff_pow", "y"])
ADPTerms.__doc__ = """Everything TripletLoss_ADP.terms computes; `diff_pow` is None for square=0.

`correct` is a 0-d int64 tensor (the official `.item()` would force a device sync every step)."""


def _softplus_exact(t):
    """log(1 + e^t) without overflow and without F.softplus's linear cut-off above 20, so float64 results
    follow the definition (the official SoftMarginLoss) to rounding, and a large t gives t, not inf."""
    return torch.logaddexp(torch.zeros_like(t), t)


class TripletLoss_ADP(nn.Module):
    """CAJ's adaptive-weight triplet (METHODS 6.3, official `TripletLoss_ADP`; README uses 1, 1, 1).

    D = comp_dist(x, x); fp_i / cn_i = softmax-weighted positive / negative distances, with weights
    softmax(alpha*D) over positives and softmax(-alpha*D) over negatives, the max taken over the whole
    masked row as in WRT (for the negatives that max is 0, so far negatives drive cn to 0: kept, it is
    what the published numbers were trained with).
      square=0: loss = mean softplus(gamma * (fp - cn))              (SoftMarginLoss(gamma*(cn - fp), 1))
      square=1: z = min(gamma * (fp - cn)^2, 88), y = -1 if fp > cn else +1, loss = mean softplus(-y * z)
    The 88 clamp is the official guard for float32 exp; it also zeroes the gradient of clamped rows, which
    is kept for comparability. `forward` returns the loss alone, like the other metric losses here;
    `terms` also returns `correct` (#rows with cn >= fp) and the intermediates.
    """

    def __init__(self, alpha=1, gamma=1, square=0):
        super().__init__()
        if square not in (0, 1):       # the official treats any non-zero value as 1; refuse the ambiguity
            raise ConfigError(f"TripletLoss_ADP: square must be 0 or 1, got {square!r}")
        self.alpha, self.gamma, self.square = alpha, gamma, int(square)

    def terms(self, x, labels, normalize_feature=False):
        with _no_autocast(x):
            dist, weights_ap, weights_an, furthest_pos, closest_neg = _softmax_weighted_pairs(
                _full_precision(x), labels, normalize_feature, self.alpha)
            if self.square == 0:
                diff_pow = None
                y = torch.ones_like(furthest_pos)
                loss = _softplus_exact(self.gamma * (furthest_pos - closest_neg)).mean()
            else:
                diff_pow = ((furthest_pos - closest_neg) ** 2 * self.gamma).clamp(max=88)
                y = torch.where(furthest_pos > closest_neg, -1.0, 1.0).to(furthest_pos.dtype)
                loss = _softplus_exact(-y * diff_pow).mean()
            correct = (closest_neg >= furthest_pos).sum()
            return ADPTerms(loss, correct, dist, weights_ap, weights_an, furthest_pos, closest_neg, diff_pow, y)

    def forward(self, x, labels, normalize_feature=False):
        return self.terms(x, labels, normalize_feature).loss


class KLDivLoss(nn.Module):
    """CAJ's logit distillation (official `KLDivLoss`, METHODS 6.3), without its hard-coded `.cuda()`.

    loss = T^2 * sum_i sum_c q_ic (log q_ic - log_softmax(pred_i / T)_c) / N with
    q = softmax(target / T) + eps, detached. eps = 1e-7 is added without renormalising, as officially: it
    shifts the value by about C * eps * |log p| (measurable at C = 395), so it is kept for comparability.
    `thirds(logits)` is train_ext.py's call: VIS view-0 rows [0, n) against IR rows [2n, 3n), n = N / 3.
    """

    def __init__(self, T=3, eps=1e-7):
        super().__init__()
        self.T, self.eps = T, eps

    def forward(self, pred, target):
        with _no_autocast(pred):
            pred, target = _full_precision(pred), _full_precision(target.detach())
            log_p = F.log_softmax(pred / self.T, dim=1)
            q = F.softmax(target / self.T, dim=1) + self.eps
            return self.T * self.T * (q * (q.log() - log_p)).sum(1).sum() / pred.shape[0]

    def thirds(self, logits):
        n = logits.shape[0]
        if n == 0 or n % 3:
            raise ConfigError(f"KLDivLoss.thirds needs a [VIS view 0 | VIS view 1 | IR] batch of 3n rows, "
                              f"got {n}")
        third = n // 3
        return self(logits[:third], logits[2 * third:])


class CenterTripletLoss(nn.Module):
    """DEEN/IRL centre triplet (REFERENCE 7.3): (mean_i |x_i - c(y_i)| + mean_anchors hinge) / 2.

    Anchors are rows 0, k, 2k, ...; each anchor's hinge is the mean over negative rows j of
    max(0, margin - |c(y_i) - c(y_j)|). An anchor without negatives contributes 0.
    """

    def __init__(self, k_size=4, margin=0.7):
        super().__init__()
        self.k_size, self.margin = int(k_size), margin

    def forward(self, x, labels):
        with _no_autocast(x):
            x = _full_precision(x)
            onehot, inverse = _one_hot_labels(labels, x.dtype)
            centers = _class_means(onehot, x)[0][inverse]          # centre of each row's class, [n, d]
            dist_pc = _row_norm(x - centers)
            anchors = torch.arange(0, x.shape[0], self.k_size, device=x.device)
            center_dist = comp_dist(centers[anchors], centers)
            negatives = labels[anchors][:, None] != labels[None, :]     # anchor rows only, not n x n
            hinge = _masked_mean(F.relu(self.margin - center_dist), negatives)
            return (dist_pc.mean() + hinge.mean()) / 2


class QuarCenterTripletLoss(nn.Module):
    """QCT, the IRL objective's metric term, as the official code computes it (REFERENCE 7.2).

    Rows are [RGB half | IR half] (n even, every identity present in both halves). For row i:
      d_pc(i) = |x_i - c_other_half(y_i)|   (cross-modal centre pull, plain norm)
      d_an(i) = mean over rows j with y_j != y_i of max(0, margin - comp_dist(x_i, c(y_j)))
    loss = (mean d_pc + mean d_an) / 2.  The official dead `a = 0` per-view term is omitted (Q-13),
    which gives identical values and avoids its NaN gradient at zero distance. `k_size` is unused.
    """

    def __init__(self, margin=0.7, *, k_size=4):
        super().__init__()
        self.margin = margin

    def forward(self, x, labels):
        n = x.shape[0]
        if n % 2:
            raise ConfigError(f"QuarCenterTripletLoss needs an [RGB | IR] batch of even size, got {n} rows")
        half = n // 2
        with _no_autocast(x):
            x = _full_precision(x)
            onehot, inverse = _one_hot_labels(labels, x.dtype)
            rgb_centers, rgb_counts = _class_means(onehot[:half], x[:half])
            ir_centers, ir_counts = _class_means(onehot[half:], x[half:])
            _require(((rgb_counts > 0) == (ir_counts > 0)).all(),
                     "QuarCenterTripletLoss: every identity must appear in both the RGB half and the IR half "
                     "of the batch (use the IdentitySampler layout)")
            partner = torch.cat([ir_centers[inverse[:half]], rgb_centers[inverse[half:]]])
            dist_pc = _row_norm(x - partner)

            dist_an = _negative_center_hinge(x, onehot, self.margin)
            return (dist_pc.mean() + dist_an.mean()) / 2


def _margin_ranking(closer, further, margin):
    """nn.MarginRankingLoss(margin)(further, closer, 1): mean of max(0, closer - further + margin)."""
    return F.relu(closer - further + margin).mean()


class CPMLoss(nn.Module):
    """DEEN's center-guided pair mining (METHODS.md 1.3 item 3), as the official loss.py computes it.

    Input: 4 row blocks [orig VIS, orig IR, DEE VIS, DEE IR], each holding B identities in contiguous groups
    of P rows (the identity sampler's order). Centres C1..C4 [B, D] are the group means. For identity i:
    positives ap123 = |C2_i - C3_i|, ap124 = |C1_i - C4_i|; anchors an123 = |C1_i - C3_i| and
    an124 = |C2_i - C4_i| (no gradient); hardest negatives an33 = min_{j!=i} |C3_i - C3_j| (an44, an11, an22 alike).
    L123 = R(an123, ap123) + (R(an33, ap123) + R(an11, ap123)) / 2 with R the margin ranking loss, L124
    alike, loss = (L123 + L124) / 2. The official margin is hard-coded at 0.2 (its `margin` argument is
    ignored); `margin` here is that 0.2. Needs B >= 2 (a negative per identity).

    identities: B, when the caller knows it (DEEN's recipe: --batch-size). Then the loss never waits for the
    device; without it, B is counted from the labels as the official code does (one host read).
    """

    def __init__(self, margin=0.2, *, identities=None):
        super().__init__()
        self.margin, self.identities = margin, identities

    def forward(self, x, labels):
        with _no_autocast(x):
            blocks = _full_precision(x).chunk(4, 0)
            n = self.identities or labels.chunk(4, 0)[0].unique().numel()
            if n < 2:
                raise ConfigError("CPM needs at least 2 identities per batch (a negative centre per identity)")
            if blocks[0].size(0) % n:
                raise ConfigError(f"CPM: {blocks[0].size(0)} rows per block do not hold {n} identities equally")
            c1, c2, c3, c4 = (block.reshape(n, -1, block.size(1)).mean(1) for block in blocks)
            self_pairs = torch.eye(n, dtype=torch.bool, device=x.device)

            def hardest_negative(c):
                return comp_dist(c, c).masked_fill(self_pairs, float("inf")).amin(1)

            def rank(further, closer):
                return _margin_ranking(closer, further, self.margin)

            # The official code mines the same-identity anchors without gradient (`.detach()`).
            ap123, an123 = comp_dist(c2, c3).diagonal(), comp_dist(c1, c3).diagonal().detach()
            ap124, an124 = comp_dist(c1, c4).diagonal(), comp_dist(c2, c4).diagonal().detach()
            loss123 = rank(an123, ap123) + 0.5 * (rank(hardest_negative(c3), ap123) + rank(hardest_negative(c1), ap123))
            loss124 = rank(an124, ap124) + 0.5 * (rank(hardest_negative(c4), ap124) + rank(hardest_negative(c2), ap124))
            return (loss123 + loss124) / 2


class TcaLoss(nn.Module):
    """IFALNet's centre-alignment loss (METHODS.md 2.3) on the four row blocks [VIS, M-VIS, IR, M-IR] of x.

    Per identity i, with c1..c4 its centres in the four blocks and C_ab = (c_a + c_b) / 2: the positive term is
    max(|C13 - C24|, |C12 - C34|, |C14 - C23|) (each mixture of two blocks against the other two), summed over
    the identities and divided by their number; `official_divisor` divides by 4 as the official code does (the
    hard-coded divisor equals its default 4 identities per batch, where both agree). The negative term is, for
    each row, the mean over the batch's rows of other identities of max(0, margin - |x_k - C_y|), C_y the
    centre of that row's identity over all four blocks (so each other identity weighs by its row count), then
    the mean over the rows; rows without another identity in the batch contribute 0 (the official code gives
    NaN). Distances are comp_dist's (the official pdist_torch). The official code takes the block centres as
    means of consecutive row groups in sampler order; here they are the means of each identity's rows, which is
    the same for the identity sampler's layout (every identity's rows contiguous, in the same order in every
    block) and needs no layout. Every identity must have rows in all four blocks (ConfigError otherwise).
    """

    OFFICIAL_DIVISOR = 4       # hard-coded in IFALNet's loss.py

    def __init__(self, margin=0.7, *, official_divisor=False):
        super().__init__()
        self.margin, self.official_divisor = margin, official_divisor

    def forward(self, x, labels):
        with _no_autocast(x):
            x = _full_precision(x)
            onehot, _ = _one_hot_labels(labels, x.dtype)      # [rows, classes]; no host synchronisation
            present = onehot.sum(0) > 0
            (c1, c2, c3, c4), block_counts = zip(*(_class_means(block_onehot, block)
                                                   for block_onehot, block in zip(onehot.chunk(4, 0), x.chunk(4, 0))))
            _require(((torch.stack(block_counts) > 0) == present).all(),
                     "TcaLoss: every identity must have rows in all four blocks [VIS, M-VIS, IR, M-IR]")

            def mixture_distance(a, b, c, d):
                return comp_dist((a + b) / 2, (c + d) / 2).diagonal()

            positive = torch.stack((mixture_distance(c1, c3, c2, c4), mixture_distance(c1, c2, c3, c4),
                                    mixture_distance(c1, c4, c2, c3))).amax(0)
            positive = torch.where(present, positive, 0).sum()
            positive = positive / (self.OFFICIAL_DIVISOR if self.official_divisor else present.sum())
            return positive + _negative_center_hinge(x, onehot, self.margin).mean()


def ort_loss(pool):
    """DEEN's orthogonality term before its 0.01 weight (METHODS.md 1.2 item 7): sum over rows k of
    <DEE1_k, DEE2_k> of the tripled pooled batch [orig | DEE1 | DEE2], divided by its row count."""
    _, branch1, branch2 = pool.chunk(3, 0)
    return (branch1 * branch2).sum() / pool.size(0)


class DCLoss(nn.Module):
    """MMN's distribution-consistency loss (METHODS.md 5.2): the mean distance between the projections of the
    first and the second half of the rows (M-VIS and M-IR features of a stripe, row k paired with row k).

    Projection z = l2n(BN(Linear(ReLU(BN(Linear(l2n(x))))))): in_dim -> dim without bias, then dim -> dim, with
    the official module names (fc1.0, fc2.0, fc2.2, fc2.3), so an official head's state dict loads. Its BNs
    run on batch statistics in training. l2n is F.normalize (norm clamped at 1e-12), as the official code.
    """

    def __init__(self, in_dim=2048, dim=256):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(in_dim, dim, bias=False))
        self.fc2 = nn.Sequential(nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim), nn.BatchNorm1d(dim))

    def project(self, x):
        return F.normalize(self.fc2(self.fc1(F.normalize(x))))

    def forward(self, x):
        with _no_autocast(x):
            first, second = self.project(_full_precision(x)).chunk(2, 0)
            return _row_norm(first - second).mean()
