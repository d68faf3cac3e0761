"""Test-time similarities: how the named features of a query and a gallery image combine into one score.

Every network's test features are named L2-normalised vectors per image ("pool" and "bn" for all; the
middle-modality methods add "pool_m" and "bn_m" for the generated image). A similarity mode is a Fusion:
a list of (query feature, gallery feature, weight) cosine terms and how they combine (summed, or their
element-wise min or max, MMN's fusions). The standard modes are below; a method adds its own (METHODS.md 7.2)
through its `fusions`. Pure numpy.
"""
from dataclasses import dataclass

import numpy as np

COMBINERS = {"sum": None, "min": np.minimum, "max": np.maximum}


@dataclass(frozen=True)
class Fusion:
    """similarity(q, g) = combine over terms of weight * cos(q[query feature], g[gallery feature])."""

    terms: tuple                # ((query feature, gallery feature, weight), ...)
    combine: str = "sum"        # "sum", or "min" / "max" element-wise over the weighted terms

    def __post_init__(self):
        if not self.terms:
            raise ValueError("a fusion needs at least one term")
        if self.combine not in COMBINERS:
            raise ValueError(f"unknown combine {self.combine!r}; expected one of {', '.join(COMBINERS)}")

    @classmethod
    def weighted(cls, **weights):
        """The weighted sum of the named features' cosine similarities, each query feature against the same
        gallery feature (e.g. weighted(pool=0.1, bn=0.9))."""
        return cls(tuple((name, name, float(weight)) for name, weight in weights.items()))

    def features(self, side):
        """The feature names the `side` ("query" or "gallery") needs, in term order, without repeats."""
        position = {"query": 0, "gallery": 1}[side]
        return tuple(dict.fromkeys(term[position] for term in self.terms))

    def transposed(self):
        """The same fusion with the sides swapped: ranking the query set for each gallery row."""
        return Fusion(tuple((gallery, query, weight) for query, gallery, weight in self.terms), self.combine)

    def embedding_weights(self):
        """{feature: weight} where the similarity is a weighted sum of same-feature terms (then one unit vector
        per image ranks exactly like it: `embedding`), else None (cross-feature terms, min, max)."""
        if self.combine != "sum" or any(query != gallery for query, gallery, _ in self.terms):
            return None
        weights = {}
        for name, _, weight in self.terms:
            weights[name] = weights.get(name, 0.0) + weight
        return weights if all(weight > 0 for weight in weights.values()) else None


STANDARD_FUSIONS = {
    "pool": Fusion.weighted(pool=1.0),
    "bn": Fusion.weighted(bn=1.0),
    "sum": Fusion.weighted(pool=1.0, bn=1.0),             # IRL's LLCM "FC" line
    "weighted": Fusion.weighted(pool=0.1, bn=0.9),        # IRL's LLCM "POOL" line
}
# Their labels in result tables.
STANDARD_LABELS = {"bn": "bn (FC)", "pool": "pool", "sum": "sum (pool+bn)", "weighted": "weighted (0.1/0.9)"}


def _check_features(fusion, query_feats, gallery_feats):
    for side, feats in (("query", query_feats), ("gallery", gallery_feats)):
        missing = [name for name in fusion.features(side) if name not in feats]
        if missing:
            raise ValueError(f"this similarity needs {side} features {missing}; the features hold {sorted(feats)}")


def similarity(query_feats, gallery_feats, fusion):
    """[num_query, num_gallery] similarity of `fusion` between {name: [N, D] L2-normalised array} features."""
    _check_features(fusion, query_feats, gallery_feats)
    combine = COMBINERS[fusion.combine]
    total = None
    for query_name, gallery_name, weight in fusion.terms:
        term = np.matmul(query_feats[query_name], np.transpose(gallery_feats[gallery_name]))
        if weight != 1.0:                       # x 1.0 is exact: skipping it saves a pass over the matrix
            term = weight * term
        if total is None:
            total = term
        elif combine is None:
            total = total + term
        else:
            total = combine(total, term)
    return total


def negative_similarity(row_feats, column_feats, fusion):
    """The protocols' default distance: minus the similarity."""
    return -similarity(row_feats, column_feats, fusion)


def embedding(feats, fusion):
    """Unit vectors whose cosine similarity is similarity(fusion) / (sum of its weights), so they rank exactly
    like it: the fusion's features concatenated, each scaled by sqrt(weight / total). Re-ranking needs one
    feature per item; this is that feature. ValueError for fusions that have none (`embedding_weights`)."""
    weights = fusion.embedding_weights()
    if weights is None:
        raise ValueError("this similarity is not a positive weighted sum of same-feature cosines, so no single "
                         "feature per image ranks like it")
    total = sum(weights.values())
    # A Python float scale keeps the features' dtype (a numpy float64 scalar would promote float32 ones).
    return np.concatenate([float(np.sqrt(weight / total)) * np.asarray(feats[name])
                           for name, weight in weights.items()], axis=1)
