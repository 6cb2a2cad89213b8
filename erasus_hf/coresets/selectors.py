"""Coreset selectors: which rows of one side (forget or retain) to keep.

A selector reads one feature per row (`CoresetSelector.features`: hidden-state embeddings, per-example losses or
EL2N scores, per-example gradients or their norms, see `erasus_hf.coresets.features`) and returns **indices into the
dataset it was given**, sorted ascending: the rows themselves, whatever order or batch size they were scored in (the
original Erasus influence selector returned positions inside a batch). The deterministic selectors pick the same rows
from a shuffled copy of the dataset; `random` and `kmeans` draw from `seed`.

Geometric selectors (herding, k_center, kmeans, facility_location, forget_similar, upcore) L2-normalise the features
first (`normalize=True`), so a row's length (a long answer's larger hidden-state norm) does not decide for it.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np

from ..registry import Registry

CORESET_SIDES = ("retain", "forget", "both")
CORESET_BUDGETS = ("steps", "epochs")

SIDES = ("forget", "retain")
FEATURE_KINDS = ("embeddings", "losses", "el2n", "gradients", "gradient_norms")


class CoresetSelector:
    """Choose `k` of `n` rows. Subclasses set `name`, `paper`, `features` (the kind they read, None: no feature)
    and `sides`, and implement `_select(features, k, rng, forget_features)`.

    `forget_features` (the forget set's features of the same kind) is read by selectors with `needs_forget`, which
    choose retain rows by their relation to the forget set."""

    name: ClassVar[str]
    paper: ClassVar[str]
    features: ClassVar[str | None] = "embeddings"
    sides: ClassVar[tuple[str, ...]] = SIDES
    needs_forget: ClassVar[bool] = False

    def __init__(self, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"Unknown coreset_kwargs {sorted(kwargs)} for selector {self.name!r}; it takes none.")

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {}

    def select(
        self,
        k: int,
        features: np.ndarray | None = None,
        *,
        n: int | None = None,
        seed: int = 0,
        forget_features: np.ndarray | None = None,
    ) -> np.ndarray:
        """Indices (int64, sorted, distinct) of the `k` rows kept out of `n` (the rows of `features`, or `n`)."""
        if features is not None:
            features = np.asarray(features, dtype=np.float64)
            n = len(features)
        if n is None:
            raise ValueError(f"Selector {self.name!r} needs the number of rows n or their features.")
        if self.features is not None and features is None:
            raise ValueError(f"Selector {self.name!r} reads {self.features} of every row; none were given.")
        if not 1 <= k <= n:
            raise ValueError(f"A coreset of {k} rows out of {n} is not possible: keep between 1 and {n}.")
        if features is not None and not np.isfinite(features).all():
            bad = np.flatnonzero(~np.isfinite(features.reshape(n, -1)).all(axis=1))
            raise ValueError(f"Selector {self.name!r}: the features of rows {bad[:5].tolist()} are not finite.")
        if self.needs_forget and forget_features is None:
            raise ValueError(f"Selector {self.name!r} chooses retain rows near the forget set: pass forget_features.")
        if k == n:
            return np.arange(n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        chosen = np.asarray(self._select(features, k, rng, forget_features, n), dtype=np.int64)
        if len(np.unique(chosen)) != k:  # a selector's own bug must not silently return fewer rows
            raise RuntimeError(f"Selector {self.name!r} returned {len(np.unique(chosen))} distinct rows, not {k}.")
        return np.sort(chosen)

    def _select(self, features, k, rng, forget_features, n) -> np.ndarray:
        raise NotImplementedError


SELECTORS: Registry[type[CoresetSelector]] = Registry("coreset selector")


def register_selector(cls: type[CoresetSelector]) -> type[CoresetSelector]:
    """Class decorator: make a selector available by `cls.name`; a taken name raises."""
    return SELECTORS.register(cls, cls.name)


def get_selector(name: str | CoresetSelector, **kwargs: Any) -> CoresetSelector:
    """The selector `name` with its keyword hyperparameters (`coreset_kwargs`); unknown names fail with the valid
    ones."""
    if isinstance(name, CoresetSelector):
        if kwargs:
            raise ValueError("coreset_kwargs are ignored when a CoresetSelector instance is given; set them on it.")
        return name
    cls = SELECTORS.lookup(name)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self" and p != "kwargs"]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"Unknown coreset_kwargs {unknown} for selector {name!r}; valid: {valid or 'none'}")
    return cls(**kwargs)


def _unit_rows(features: np.ndarray) -> np.ndarray:
    flat = features.reshape(len(features), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-12)


class _Geometric(CoresetSelector):
    """A selector on feature vectors, L2-normalised unless `normalize=False`."""

    def __init__(self, normalize: bool = True) -> None:
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.normalize = normalize

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def vectors(self, features: np.ndarray) -> np.ndarray:
        flat = features.reshape(len(features), -1)
        return _unit_rows(flat) if self.normalize else flat


@register_selector
class RandomSelector(CoresetSelector):
    """Uniformly at random, without replacement, from `seed`: the baseline every coreset must beat."""

    name = "random"
    paper = "the baseline (Pal et al. 2025, arXiv:2504.10185, find random forget subsets sufficient)"
    features = None

    def _select(self, features, k, rng, forget_features, n):
        return rng.choice(n, size=k, replace=False)


@register_selector
class HerdingSelector(_Geometric):
    """Kernel herding (Welling, ICML 2009; the exemplar rule of iCaRL, Rebuffi et al., CVPR 2017): greedily add the
    row that brings the mean of the kept rows closest to the mean of all rows,
    i_t = argmin_i || mu - (sum_{j in S} x_j + x_i) / t ||."""

    name = "herding"
    paper = "Welling, Herding dynamical weights to learn (ICML 2009); Rebuffi et al., iCaRL (CVPR 2017)"

    def _select(self, features, k, rng, forget_features, n):
        x = self.vectors(features)
        mu = x.mean(axis=0)
        total = np.zeros_like(mu)
        free = np.ones(n, dtype=bool)
        chosen = []
        for t in range(1, k + 1):
            gap = np.linalg.norm(mu - (total + x) / t, axis=1)
            gap[~free] = np.inf
            i = int(np.argmin(gap))
            chosen.append(i)
            free[i] = False
            total += x[i]
        return np.array(chosen)


@register_selector
class KCenterSelector(_Geometric):
    """Greedy k-center (Sener & Savarese, ICLR 2018; a 2-approximation of the minimal covering radius): start from
    the row nearest the mean, then repeatedly add the row farthest from every kept row."""

    name = "k_center"
    paper = "Sener & Savarese, Active learning for convolutional neural networks: a core-set approach (ICLR 2018)"

    def _select(self, features, k, rng, forget_features, n):
        x = self.vectors(features)
        first = int(np.argmin(np.linalg.norm(x - x.mean(axis=0), axis=1)))
        chosen = [first]
        distance = np.linalg.norm(x - x[first], axis=1)
        for _ in range(k - 1):
            i = int(np.argmax(distance))
            chosen.append(i)
            distance = np.minimum(distance, np.linalg.norm(x - x[i], axis=1))
        return np.array(chosen)


@register_selector
class KMeansSelector(_Geometric):
    """k-means with k clusters (scikit-learn's `KMeans`, k-means++ initialisation from `seed`), keeping the row
    nearest each centroid (a row already kept for another centroid gives way to that centroid's next nearest)."""

    name = "kmeans"
    paper = "Lloyd's k-means (scikit-learn), the row nearest each centroid"

    def __init__(self, normalize: bool = True, n_init: int = 3) -> None:
        super().__init__(normalize)
        if not isinstance(n_init, int) or n_init < 1:
            raise ValueError(f"n_init must be an integer >= 1, got {n_init!r}")
        self.n_init = n_init

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters, "n_init": self.n_init}

    def _select(self, features, k, rng, forget_features, n):
        from sklearn.cluster import KMeans

        x = self.vectors(features)
        seed = int(rng.integers(2**31 - 1))
        centroids = KMeans(n_clusters=k, n_init=self.n_init, random_state=seed).fit(x).cluster_centers_
        distance = np.linalg.norm(x[None, :, :] - centroids[:, None, :], axis=2)  # [k, n]
        free = np.ones(n, dtype=bool)
        chosen = []
        for row in distance:
            order = np.argsort(row, kind="stable")
            i = int(order[free[order]][0])
            chosen.append(i)
            free[i] = False
        return np.array(chosen)


@register_selector
class FacilityLocationSelector(_Geometric):
    """Facility location (CRAIG, Mirzasoleiman et al., ICML 2020): greedily maximise
    F(S) = sum_i max_{j in S} s(i, j) with s(i, j) = d_max - ||x_i - x_j||, so every row is near a kept one.
    O(k n^2): meant for sets of up to a few thousand rows."""

    name = "facility_location"
    paper = "Mirzasoleiman, Bilmes, Leskovec, Coresets for data-efficient training of ML models (ICML 2020)"

    def _select(self, features, k, rng, forget_features, n):
        x = self.vectors(features)
        squared = (x * x).sum(axis=1)
        distance = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0))
        similarity = distance.max() - distance
        coverage = np.zeros(n)
        free = np.ones(n, dtype=bool)
        chosen = []
        for _ in range(k):
            gain = np.maximum(similarity - coverage[:, None], 0.0).sum(axis=0)  # gain of adding column j
            gain[~free] = -np.inf
            j = int(np.argmax(gain))
            chosen.append(j)
            free[j] = False
            coverage = np.maximum(coverage, similarity[:, j])
        return np.array(chosen)


class _Scored(CoresetSelector):
    """Keep the k rows of highest (or lowest) score."""

    def __init__(self, keep: str = "highest") -> None:
        if keep not in ("highest", "lowest"):
            raise ValueError(f"keep must be 'highest' or 'lowest', got {keep!r}")
        self.keep = keep

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def _select(self, features, k, rng, forget_features, n):
        if features.size != n:
            raise ValueError(
                f"Selector {self.name!r} reads one score per row; got features of shape {features.shape}."
            )
        scores = features.reshape(n)
        order = np.argsort(-scores if self.keep == "highest" else scores, kind="stable")
        return order[:k]


@register_selector
class LossSelector(_Scored):
    """The hardest rows by the starting model's per-example score (Paul, Ganguli, Dziugaite, NeurIPS 2021, "Deep
    learning on a data diet"): `score="loss"`, the mean NLL of the scored tokens, or `score="el2n"`, the mean over
    them of || softmax(logits) - onehot(target) ||_2. `keep="highest"` (the paper's rule) or "lowest"."""

    name = "loss"
    paper = "Paul, Ganguli, Dziugaite, Deep learning on a data diet (NeurIPS 2021): loss / EL2N scores"
    features = "losses"  # or "el2n" (`feature_kind`)

    def __init__(self, score: str = "loss", keep: str = "highest") -> None:
        super().__init__(keep)
        if score not in ("loss", "el2n"):
            raise ValueError(f"score must be 'loss' or 'el2n', got {score!r}")
        self.score = score

    @property
    def feature_kind(self) -> str:
        return "losses" if self.score == "loss" else "el2n"

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {"score": self.score, **super().hyperparameters}


@register_selector
class GradientNormSelector(_Scored):
    """GraNd (Paul et al., NeurIPS 2021): the rows whose loss gradient on the trainable parameters (the LoRA adapter
    with PEFT) has the largest norm, `keep="highest"`."""

    name = "gradient_norm"
    paper = "Paul, Ganguli, Dziugaite, Deep learning on a data diet (NeurIPS 2021): GraNd scores"
    features = "gradient_norms"


@register_selector
class ForgetSimilarSelector(_Geometric):
    """Retain rows nearest the forget set: s_i = max_j cos(r_i, f_j) over the forget rows' features, keeping the k
    highest. Chang & Lee (ACL 2025, arXiv:2502.11441) find that the retain rows most like the forget rows (their
    "syntactically similar neighbours", picked by the questions' form) lose the most in unlearning and regularise
    best; here similarity is read from the starting model's hidden states, not from a syntax rule."""

    name = "forget_similar"
    paper = "Chang & Lee, Which retain set matters for LLM unlearning? (ACL 2025, arXiv:2502.11441)"
    sides = ("retain",)
    needs_forget = True

    def _select(self, features, k, rng, forget_features, n):
        retain = _unit_rows(features)
        forget = _unit_rows(np.asarray(forget_features, dtype=np.float64))
        if forget.shape[1] != retain.shape[1]:
            raise ValueError(f"forget features have {forget.shape[1]} dimensions, the retain rows' {retain.shape[1]}.")
        nearest = (retain @ forget.T).max(axis=1)
        return np.argsort(-nearest, kind="stable")[:k]


@register_selector
class UpcoreSelector(_Geometric):
    """UPCORE (Patil et al. 2025, arXiv:2502.15082): prune the forget set's outliers in representation space, which
    cause most of the collateral damage. An Isolation Forest (scikit-learn, `n_estimators` trees from `seed`) on the
    hidden-state embeddings scores every forget row; the k most inlying rows are kept."""

    name = "upcore"
    paper = "Patil, Stengel-Eskin, Bansal, UPCORE: utility-preserving coreset selection (arXiv:2502.15082)"
    sides = ("forget",)

    def __init__(self, normalize: bool = True, n_estimators: int = 100) -> None:
        super().__init__(normalize)
        if not isinstance(n_estimators, int) or n_estimators < 1:
            raise ValueError(f"n_estimators must be an integer >= 1, got {n_estimators!r}")
        self.n_estimators = n_estimators

    @property
    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters, "n_estimators": self.n_estimators}

    def _select(self, features, k, rng, forget_features, n):
        from sklearn.ensemble import IsolationForest

        x = self.vectors(features)
        forest = IsolationForest(n_estimators=self.n_estimators, random_state=int(rng.integers(2**31 - 1))).fit(x)
        inlying = forest.score_samples(x)  # higher: more normal
        return np.argsort(-inlying, kind="stable")[:k]


def feature_kind(selector: CoresetSelector, requested: str = "auto") -> str | None:
    """The features `selector` reads: its own kind, or for geometric selectors the `requested` one
    ("embeddings" or "gradients"); None for `random`."""
    own = getattr(selector, "feature_kind", selector.features)
    if requested == "auto" or own is None:
        return own
    if not isinstance(selector, _Geometric):
        raise ValueError(
            f"coreset_features={requested!r}: selector {selector.name!r} reads {own} only; leave coreset_features "
            "at 'auto'."
        )
    if requested not in ("embeddings", "gradients"):
        raise ValueError(f"coreset_features must be 'auto', 'embeddings' or 'gradients', got {requested!r}")
    return requested


def check_coreset_options(selector: CoresetSelector, side: str, has_retain: bool) -> None:
    """Refuse a side the selector does not serve, and a retain coreset without a retain set, before any compute."""
    wanted = ("forget", "retain") if side == "both" else (side,)
    unserved = [s for s in wanted if s not in selector.sides]
    if unserved:
        raise ValueError(
            f"coreset_side={side!r}: selector {selector.name!r} serves the {' and '.join(selector.sides)} side only"
            f"{'s' if len(selector.sides) > 1 else ''}, not {' and '.join(unserved)}."
        )
    if "retain" in wanted and not has_retain:
        raise ValueError(
            f"coreset_side={side!r} reduces the retain set, but this run has none (the strategy or retain_loss "
            "uses no retain set). Use coreset_side='forget'."
        )
