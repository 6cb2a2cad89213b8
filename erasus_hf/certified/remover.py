"""`CertifiedRemover`: Guo et al.'s (ICML 2020) certified data removal for a logistic-regression head on fixed
features, with the bookkeeping of Algorithm 2.

- ``fit`` (Algorithm 1): draw ``b ~ N(0, sigma^2 I)`` and minimise ``L_b(w; D)``; the optimiser's leftover gradient
  residual is charged to the budget.
- ``remove`` / ``remove_sequentially`` (Algorithm 2): one Newton step per removal request (a batch of rows in one
  step, or one row per step); each step's data-dependent residual bound (Corollary 1) accumulates. When the
  accumulated residual would pass the budget ``sigma * epsilon / c`` of (epsilon, delta), the remover says so (a
  warning and the record's `retrained`) and retrains the head from scratch on the remaining rows with fresh noise,
  which resets the residual; with ``on_budget_exhausted="raise"`` it raises instead and changes nothing.
- ``certificate()``: the (epsilon, delta), residual used and budget left, as JSON and as a model-card block.

Requests outside the certificate's assumptions are refused before any compute, naming the assumption: no L2
regularisation (lam <= 0), a head with hidden layers (non-convex), a loss that is not smooth and convex, features that
are not fixed (a gradient graph, a trainable body), rows with norm above 1 when normalisation is off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import linear
from .certificate import (
    AssumptionError,
    BudgetExhaustedError,
    RemovalCertificate,
    noise_std_for,
    residual_budget,
)
from .features import FixedFeatures, normalize_rows

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-6
"""Rows may exceed unit norm by this much (rounding) when ``normalize=False``."""


@dataclass(frozen=True)
class RemovalRecord:
    """One removal request: the rows (indices into the features given to `fit`), the Newton step's residual bound,
    the residual used and budget left after the request, and whether the budget ran out so that the head was
    retrained instead (then `bound` is that of the step not taken, and `reason` says why)."""

    rows: tuple[int, ...]
    bound: float
    residual_used: float
    budget_left: float
    retrained: bool = False
    reason: str | None = None


class CertifiedRemover:
    """An L2-regularised logistic-regression head (binary, or one-vs-rest over K classes) on fixed features, trained
    with loss perturbation so that rows can be removed with an (epsilon, delta) certificate.

    Args:
        epsilon, delta: the certificate's (epsilon, delta) (Guo et al., Definition 2).
        lam: the L2 regularisation (the paper's lambda: objective ``mean loss + lam / 2 ||w||^2``); must be > 0.
        noise_std: sigma, the standard deviation of the perturbation b (the authors' ``--std``). Give it or
            `residual_budget` (then sigma = c * budget / epsilon): a larger sigma allows more removals before a
            retraining and costs accuracy.
        loss: ``"logistic"`` (the loss the paper's bound is stated for).
        head: optionally the head as a module, to check it is one: an ``nn.Linear`` without bias.
        normalize: divide each feature row by its L2 norm (the paper does; the bound assumes ||x|| <= 1). With
            False, rows of norm above 1 are refused.
        seed: seeds the noise draws (each training draws fresh noise from this generator).
        on_budget_exhausted: ``"retrain"`` (Algorithm 2) or ``"raise"``.
        max_iter: L-BFGS iterations per training.
    """

    def __init__(
        self,
        epsilon: float = 1.0,
        delta: float = 1e-4,
        lam: float = 1e-3,
        noise_std: float | None = None,
        residual_budget: float | None = None,
        loss: str = "logistic",
        head: nn.Module | None = None,
        normalize: bool = True,
        seed: int = 0,
        on_budget_exhausted: str = "retrain",
        max_iter: int = 500,
    ) -> None:
        self.loss = _check_loss(loss)
        _check_privacy(epsilon, delta)
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
            raise AssumptionError(
                f"lam={lam!r}: the certificate needs L2 regularisation, lam > 0. It makes the objective lam-strongly "
                "convex, so the optimum is unique and the Newton step's residual is bounded (Guo et al., Theorem 1); "
                "the paper uses lam between 1e-4 and 1e-2 on normalised features."
            )
        if (noise_std is None) == (residual_budget is None):
            raise ValueError(
                "give exactly one of noise_std (sigma of the loss perturbation) and residual_budget (the gradient "
                f"residual removals may accumulate before a retraining); got noise_std={noise_std!r}, "
                f"residual_budget={residual_budget!r}."
            )
        scale = noise_std if noise_std is not None else residual_budget
        name = "noise_std" if noise_std is not None else "residual_budget"
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{name}={scale!r} must be a positive number.")
        if not (isinstance(max_iter, int) and max_iter > 0):
            raise ValueError(f"max_iter={max_iter!r} must be a positive integer (L-BFGS iterations per training).")
        if on_budget_exhausted not in ("retrain", "raise"):
            raise ValueError(f"on_budget_exhausted={on_budget_exhausted!r} is not 'retrain' or 'raise'.")
        if head is not None:
            check_head(head)
        self.epsilon = float(epsilon)
        self.delta = float(delta)
        self.lam = float(lam)
        self.noise_std = float(noise_std if noise_std is not None else noise_std_for(epsilon, delta, residual_budget))
        self.residual_budget = _budget(self.epsilon, self.delta, self.noise_std)
        self.head = head
        self.normalize = normalize
        self.on_budget_exhausted = on_budget_exhausted
        self.max_iter = max_iter
        self._generator = torch.Generator().manual_seed(seed)
        self.history: list[RemovalRecord] = []
        self.weights: torch.Tensor | None = None

    # ---- training (Algorithm 1)

    def fit(self, features: FixedFeatures | torch.Tensor | np.ndarray, labels: Sequence) -> CertifiedRemover:
        """Train the head on all rows of `features` (n x d) with labels `labels` (n class labels; two classes give a
        binary head, more a one-vs-rest head)."""
        values, self.feature_source = self._check_features(features)
        labels = _check_labels(labels, values.shape[0])
        self.classes = sorted(set(labels))
        if len(self.classes) < 2:
            raise ValueError(f"labels hold one class ({self.classes[0]!r}): a classifier needs at least two.")
        index = {label: k for k, label in enumerate(self.classes)}
        codes = torch.tensor([index[label] for label in labels])
        columns = 1 if len(self.classes) == 2 else len(self.classes)
        if columns == 1:
            targets = (2.0 * (codes == 1).to(linear.DTYPE) - 1).unsqueeze(1)
        else:
            targets = 2.0 * torch.nn.functional.one_hot(codes, columns).to(linear.DTYPE) - 1
        if self.head is not None:
            _check_head_shape(self.head, values.shape[1], columns)
        self._features, self._targets = values, targets
        self._active = torch.ones(values.shape[0], dtype=torch.bool)
        self.removals = self.retrains = 0
        self.history = []
        self._train()
        return self

    def _train(self) -> None:
        """Fresh noise, the minimiser on the active rows, and a reset residual (the training residual only)."""
        rows = self._active
        shape = (self._features.shape[1], self._targets.shape[1])
        self._noise = self.noise_std * torch.randn(shape, generator=self._generator, dtype=linear.DTYPE)
        self.weights, self.training_residual = linear.fit(
            self._features[rows], self._targets[rows], self.lam, self._noise, self.loss, max_iter=self.max_iter
        )
        self.removal_residual = 0.0
        self.removals_since_training = 0
        if self.training_residual > self.residual_budget:
            raise RuntimeError(
                f"the optimiser left a gradient residual of {self.training_residual:.3g}, above the whole budget "
                f"{self.residual_budget:.3g}: the certificate needs the optimum. Raise max_iter (now {self.max_iter}) "
                "or lam, or the noise (noise_std)."
            )

    # ---- removal (Algorithm 2)

    def remove(self, rows: int | Iterable[int]) -> RemovalRecord:
        """Remove `rows` (indices into the features given to `fit`) with one Newton step; retrain instead when the
        step's residual bound would exhaust the budget."""
        removed = self._check_rows(rows)
        kept = self._active.clone()
        kept[removed] = False
        if not kept.any():
            raise ValueError("removing these rows would leave no rows to train on.")
        features, targets = self._features, self._targets
        update = linear.newton_step(
            self.weights, (features[kept], targets[kept]), (features[removed], targets[removed]), self.lam, self.loss
        )
        bound = linear.residual_bound(features[kept], update, self.loss.gamma)
        rows_removed = tuple(removed.tolist())
        used = self.training_residual + self.removal_residual
        if used + bound > self.residual_budget:
            reason = (
                f"the gradient-residual budget {self.residual_budget:.3g} of (epsilon={self.epsilon:g}, "
                f"delta={self.delta:g}) would be exceeded ({used:.3g} used + {bound:.3g} for this removal)"
            )
            if self.on_budget_exhausted == "raise":
                raise BudgetExhaustedError(
                    reason + ": nothing was removed. retrain() (fresh noise, a full budget), then remove them again."
                )
            logger.warning("Certified removal: %s; retraining the head from scratch with fresh noise.", reason)
            self._active = kept
            self.removals += len(rows_removed)
            self.retrain()
            record = RemovalRecord(rows_removed, bound, self._used(), self._left(), retrained=True, reason=reason)
        else:
            self.weights = self.weights + update
            self.removal_residual += bound
            self._active = kept
            self.removals += len(rows_removed)
            self.removals_since_training += len(rows_removed)
            record = RemovalRecord(rows_removed, bound, self._used(), self._left())
        self.history.append(record)
        return record

    def remove_sequentially(self, rows: Iterable[int]) -> list[RemovalRecord]:
        """Remove `rows` one at a time (one Newton step each, as the paper's experiments do)."""
        rows = [int(row) for row in _as_index_list(rows)]
        self._check_rows(rows)  # refuse a bad list before removing any of it
        return [self.remove(row) for row in rows]

    def retrain(self) -> None:
        """Train the head from scratch on the remaining rows with fresh noise (resets the residual used)."""
        self._require_fit()
        self.retrains += 1
        self._train()

    # ---- what the head says and what it guarantees

    def certificate(self) -> RemovalCertificate:
        self._require_fit()
        columns = self._targets.shape[1]
        head = "binary logistic regression" if columns == 1 else f"one-vs-rest logistic regression ({columns} classes)"
        return RemovalCertificate(
            epsilon=self.epsilon,
            delta=self.delta,
            noise_std=self.noise_std,
            residual_budget=self.residual_budget,
            training_residual=self.training_residual,
            removal_residual=self.removal_residual,
            removals=self.removals,
            removals_since_training=self.removals_since_training,
            retrains=self.retrains,
            rows=int(self._active.sum()),
            head=head,
            classes=len(self.classes),
            lam=self.lam,
            loss=self.loss.name,
            gamma=self.loss.gamma,
            features=self._features.shape[1],
            feature_source=self.feature_source,
            normalized=self.normalize,
        )

    def gradient_residual(self) -> float:
        """The true ``||grad L_b(W; D')||`` of the current head on the remaining rows (Frobenius, sum scale): what the
        certificate's `residual_used` bounds. It reads the secret noise b, so it is for audits and tests."""
        self._require_fit()
        rows = self._active
        residual = linear.gradient(
            self.weights, self._features[rows], self._targets[rows], self.lam, self._noise, self.loss
        )
        return residual.norm().item()

    def decision_function(self, features: FixedFeatures | torch.Tensor | np.ndarray) -> torch.Tensor:
        """Scores ``x W`` (n x K, or n x 1 for a binary head) of rows prepared as in `fit`."""
        self._require_fit()
        values, _ = self._check_features(features)
        if values.shape[1] != self._features.shape[1]:
            raise ValueError(
                f"features have {values.shape[1]} columns; the head was trained on {self._features.shape[1]}."
            )
        return values @ self.weights

    def predict(self, features: FixedFeatures | torch.Tensor | np.ndarray) -> list:
        scores = self.decision_function(features)
        codes = (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(dim=1)
        return [self.classes[code] for code in codes.tolist()]

    def accuracy(self, features: FixedFeatures | torch.Tensor | np.ndarray, labels: Sequence) -> float:
        predictions = self.predict(features)
        labels = _check_labels(labels, len(predictions))
        return sum(p == y for p, y in zip(predictions, labels)) / len(labels)

    def as_linear(self) -> nn.Linear:
        """The head as an ``nn.Linear`` without bias (float32); its inputs must be normalised rows as in `fit`."""
        self._require_fit()
        layer = nn.Linear(self.weights.shape[0], self.weights.shape[1], bias=False)
        with torch.no_grad():
            layer.weight.copy_(self.weights.T.float())
        return layer.requires_grad_(False)

    @property
    def remaining_rows(self) -> list[int]:
        self._require_fit()
        return torch.nonzero(self._active).squeeze(1).tolist()

    # ---- checks

    def _used(self) -> float:
        return self.training_residual + self.removal_residual

    def _left(self) -> float:
        return self.residual_budget - self._used()

    def _require_fit(self) -> None:
        if self.weights is None:
            raise RuntimeError("call fit(features, labels) first.")

    def _check_features(self, features) -> tuple[torch.Tensor, str]:
        source = "features given by the user"
        if isinstance(features, FixedFeatures):
            features, source = features.values, features.source
        if isinstance(features, torch.Tensor) and (features.requires_grad or features.grad_fn is not None):
            raise AssumptionError(
                "features are not fixed: the tensor is attached to a gradient graph (it comes from a trainable body). "
                "The certificate covers a linear head on fixed features of a frozen or publicly pre-trained body: "
                "extract them under torch.no_grad() from a frozen body (erasus_hf.certified.hidden_state_features)."
            )
        values = torch.as_tensor(
            np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features)
        )
        if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
            raise ValueError(
                f"features have shape {tuple(values.shape)}: expected one non-empty row per example (n x d)."
            )
        values = values.to(linear.DTYPE)
        bad = torch.nonzero(~torch.isfinite(values).all(dim=1)).squeeze(1)
        if len(bad):
            raise ValueError(f"features row {bad[0].item()} holds a NaN or an infinity ({len(bad)} such rows).")
        if self.normalize:
            return normalize_rows(values), source
        norms = values.norm(dim=1)
        if (norms > 1 + NORM_TOLERANCE).any():
            row = int(norms.argmax())
            raise AssumptionError(
                f"features row {row} has norm {norms[row].item():.4g} > 1, and normalize=False: the residual bound "
                "(Guo et al., Theorem 1, Corollary 1) assumes ||x|| <= 1 for every row. Use normalize=True (each row "
                "divided by its norm, as the paper does) or scale the features yourself."
            )
        return values, source

    def _check_rows(self, rows) -> torch.Tensor:
        self._require_fit()
        rows = _as_index_list(rows)
        if not rows:
            raise ValueError("no rows to remove.")
        n = self._features.shape[0]
        seen = set()
        for row in rows:
            if not isinstance(row, (int, np.integer)) or isinstance(row, bool):
                raise ValueError(f"row {row!r} is not an integer index into the features given to fit.")
            if not 0 <= row < n:
                raise ValueError(f"row {row} is out of range: fit saw {n} rows (0..{n - 1}).")
            if row in seen:
                raise ValueError(f"row {row} is listed twice.")
            if not self._active[row]:
                raise ValueError(f"row {row} was already removed.")
            seen.add(int(row))
        return torch.tensor(sorted(seen))


def check_head(head: nn.Module) -> None:
    """Refuse a head the certificate does not cover: anything but a single bias-free ``nn.Linear``."""
    if isinstance(head, nn.Linear):
        if head.bias is not None:
            raise AssumptionError(
                "the head nn.Linear has a bias: Guo et al.'s model is w^T x with every weight L2-regularised. Use "
                "bias=False and append a constant feature instead (then regularised and normalised with the rest)."
            )
        return
    layers = [name or type(head).__name__ for name, module in head.named_modules() if isinstance(module, nn.Linear)]
    others = [
        type(m).__name__ for m in head.modules() if m is not head and not isinstance(m, (nn.Linear, nn.Sequential))
    ]
    if len(layers) > 1 or others:
        raise AssumptionError(
            f"the head {type(head).__name__} has hidden layers ({len(layers)} linear layers; "
            f"{', '.join(others) or 'no activations'}): its loss is not convex in the weights, and the certificate "
            "(Guo et al., Theorem 3) needs the unique optimum of a strongly convex loss. Move the hidden layers into "
            "the frozen body and certify only the last linear layer."
        )
    raise AssumptionError(
        f"the head {type(head).__name__} is not a linear layer: the certificate covers a bias-free nn.Linear on fixed "
        "features only."
    )


def _check_head_shape(head: nn.Module, features: int, columns: int) -> None:
    if head.in_features != features or head.out_features != columns:
        raise ValueError(
            f"the head is nn.Linear({head.in_features}, {head.out_features}); these features and labels need "
            f"nn.Linear({features}, {columns}) (one output for two classes, one per class for more)."
        )


def _check_loss(loss) -> linear.ConvexLoss:
    if callable(loss) and not isinstance(loss, str):
        raise AssumptionError(
            f"loss={loss!r} is a function: the certificate needs a loss known to be convex and smooth with a "
            f"Lipschitz second derivative (its constant gamma enters the bound); use one of {sorted(linear.LOSSES)}."
        )
    if loss in linear.LOSSES:
        return linear.LOSSES[loss]
    why = linear.NOT_COVERED.get(loss, "the residual bound is stated for the logistic loss")
    raise AssumptionError(f"loss={loss!r} is not covered: {why}. Use one of {sorted(linear.LOSSES)}.")


def _check_privacy(epsilon, delta) -> None:
    if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon={epsilon!r} must be a positive number.")
    if not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(
            f"delta={delta!r} must be in (0, 1) (Theorem 3's Gaussian noise gives (epsilon, delta) with delta > 0)."
        )


def _budget(epsilon: float, delta: float, noise_std: float) -> float:
    return residual_budget(epsilon, delta, noise_std)


def _check_labels(labels, n: int) -> list:
    if isinstance(labels, torch.Tensor):
        labels = labels.tolist()
    labels = list(np.asarray(labels).tolist()) if isinstance(labels, np.ndarray) else list(labels)
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} feature rows: give one label per row.")
    for index, label in enumerate(labels):
        if label is None or (isinstance(label, float) and math.isnan(label)):
            raise ValueError(f"labels[{index}] is {label!r}: every row needs a class label.")
    return labels


def _as_index_list(rows) -> list:
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        return [int(rows)]
    if isinstance(rows, torch.Tensor):
        return rows.flatten().tolist()
    if isinstance(rows, np.ndarray):
        return rows.flatten().tolist()
    return list(rows)
