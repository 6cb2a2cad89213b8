"""The mathematics of Guo et al. (ICML 2020), "Certified Data Removal from Machine Learning Models": an L2-regularised
logistic-regression head on fixed features, trained with loss perturbation, and removal by one Newton step.

Everything is in the paper's *sum* scale (the scale its bounds are stated in)::

    L_b(w; D) = sum_i l(w^T x_i, y_i) + lam * n / 2 * ||w||^2 + b^T w

with ``l(z, y) = log(1 + exp(-y z))``, labels ``y`` in {-1, +1} and ``||x_i|| <= 1``. Multiclass heads are one-vs-rest,
as in the paper: column k of ``W`` (d x K) is a binary head for "class k or not", with its own noise column ``b_k``.
The columns are independent problems, so the joint gradient is the d x K matrix of the columns' gradients and its
norm is the Frobenius norm (Theorem 3 holds for the joint vector of dK weights with b ~ N(0, sigma^2 I_dK)).

Removing rows R (remaining rows M), one Newton step (Sec. 3 of the paper; batch removal in Sec. 4)::

    Delta_k = sum_{j in R} [grad l(w_k^T x_j, y_jk) + lam * w_k]       # the removed rows' share of the gradient
    H_k     = sum_{i in M} l''(w_k^T x_i, y_ik) x_i x_i^T + lam |M| I  # Hessian of L on the remaining rows
    w_k    <- w_k + H_k^{-1} Delta_k

and the data-dependent bound on the gradient residual it leaves (Corollary 1), with ``X`` the remaining rows::

    ||grad L(w^-; D')|| <= gamma * ||X||_2 * ||H^{-1} Delta|| * ||X H^{-1} Delta||

where gamma is the Lipschitz constant of l''; gamma = 1/4 for the logistic loss as in the paper and the authors' code
(the tight value, sup |l'''| = 1/(6 sqrt 3) ~ 0.096, would be valid too; the paper's is kept so numbers compare).
``||X||_2`` is computed exactly (largest eigenvalue of X^T X), not by power iteration as in the authors' code, whose
20-step estimate lies *below* the true norm and so can understate the bound. Over one-vs-rest columns the per-column
bounds combine as the Frobenius norm of the residual matrix: sqrt(sum_k bound_k^2) (the authors' code sums them, a
looser bound).

The loss's first and second derivatives come from torch autograd on the per-example loss; gradient and Hessian of the
linear model follow by the chain rule (``X^T l'(z)`` and ``X^T diag(l''(z)) X``), which keeps memory at O(nd + d^2)
per column. Tests check them against torch's full Hessian and against the authors' closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPE = torch.float64
"""Every computation of the certificate runs in float64 (the bounds are compared with residuals of order 1e-4)."""


def logistic_loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example logistic loss ``log(1 + exp(-y z))`` for labels ``y`` in {-1, +1} (elementwise)."""
    return F.softplus(-y * z)


@dataclass(frozen=True)
class ConvexLoss:
    """A per-example loss of the score z = w^T x that the certificate covers: convex and smooth in z, with a
    second derivative that is `gamma`-Lipschitz (the constant of Theorem 1 and Corollary 1)."""

    name: str
    function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    gamma: float


LOSSES: dict[str, ConvexLoss] = {"logistic": ConvexLoss("logistic", logistic_loss, gamma=0.25)}
"""The losses Guo et al.'s bound is stated for. Multiclass is one-vs-rest logistic, as in the paper."""

NOT_COVERED = {
    "hinge": "the hinge loss is not smooth (no second derivative at the margin), so the Newton step has no residual "
    "bound",
    "squared_hinge": "the squared hinge loss has no Lipschitz second derivative (it jumps at the margin)",
    "softmax": "the paper's multiclass head is one-vs-rest: loss='logistic' with more than two classes trains K "
    "binary heads, each with its own certified residual",
    "cross_entropy": "the paper's multiclass head is one-vs-rest: loss='logistic' with more than two classes trains K "
    "binary heads, each with its own certified residual",
}
"""Losses users ask for that the certificate does not cover, and why (the refusal's message)."""


def loss_derivatives(loss: ConvexLoss, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivatives of the per-example loss with respect to the score, by autograd (the loss is
    elementwise, so the gradient of the sum is the per-example derivative)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        (first,) = torch.autograd.grad(loss.function(z, y).sum(), z, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), z)
    return first.detach(), second.detach()


def objective(
    weights: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    noise: torch.Tensor,
    loss: ConvexLoss,
) -> torch.Tensor:
    """``L_b(W; D)``: the perturbed objective in sum scale (differentiable in `weights`)."""
    n = features.shape[0]
    return (
        loss.function(features @ weights, targets).sum() + lam * n / 2 * weights.pow(2).sum() + (noise * weights).sum()
    )


def gradient(
    weights: torch.Tensor,
    features: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    noise: torch.Tensor,
    loss: ConvexLoss,
) -> torch.Tensor:
    """``grad L_b(W; D)`` (d x K): ``X^T l'(XW) + lam n W + b``."""
    first, _ = loss_derivatives(loss, features @ weights, targets)
    return features.T @ first + lam * features.shape[0] * weights + noise


def hessians(
    weights: torch.Tensor, features: torch.Tensor, targets: torch.Tensor, lam: float, loss: ConvexLoss
) -> torch.Tensor:
    """The K per-column Hessians (K x d x d) of ``L(W; D)``: ``X^T diag(l''(X w_k)) X + lam n I``. The noise term is
    linear, so it does not enter."""
    n, d = features.shape
    _, second = loss_derivatives(loss, features @ weights, targets)  # n x K
    curvature = torch.stack([(features * second[:, k : k + 1]).T @ features for k in range(second.shape[1])])
    return curvature + lam * n * torch.eye(d, dtype=features.dtype)


def spectral_norm(features: torch.Tensor) -> float:
    """``||X||_2``, exactly: the square root of the largest eigenvalue of the d x d Gram matrix ``X^T X``."""
    if features.shape[0] == 0:
        return 0.0
    return math.sqrt(max(torch.linalg.eigvalsh(features.T @ features)[-1].item(), 0.0))


def residual_bound(features: torch.Tensor, update: torch.Tensor, gamma: float) -> float:
    """Corollary 1's data-dependent bound on the gradient residual a Newton step leaves, for the remaining rows
    `features` (n x d) and the step `update` (d x K, ``H^{-1} Delta`` per column): per column
    ``gamma ||X||_2 ||v_k|| ||X v_k||``, combined over columns as sqrt(sum of squares)."""
    norm = spectral_norm(features)
    per_column = gamma * norm * update.norm(dim=0) * (features @ update).norm(dim=0)
    return per_column.pow(2).sum().sqrt().item()


def newton_step(
    weights: torch.Tensor,
    kept: tuple[torch.Tensor, torch.Tensor],
    removed: tuple[torch.Tensor, torch.Tensor],
    lam: float,
    loss: ConvexLoss,
) -> torch.Tensor:
    """The Newton update ``H^{-1} Delta`` (d x K) that removes the rows `removed` = (features, targets) from a head
    trained on them and the rows `kept`: Delta is the removed rows' gradient (loss plus their lam / 2 ||w||^2 share),
    H the Hessian of the objective on the kept rows. It needs no noise: b's gradient is the same on both sides."""
    removed_features, removed_targets = removed
    first, _ = loss_derivatives(loss, removed_features @ weights, removed_targets)
    delta = removed_features.T @ first + lam * removed_features.shape[0] * weights  # d x K
    hessian = hessians(weights, *kept, lam=lam, loss=loss)  # K x d x d, positive definite (lam > 0)
    factor = torch.linalg.cholesky(hessian)
    return torch.cholesky_solve(delta.T.unsqueeze(-1), factor).squeeze(-1).T


def fit(
    features: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    noise: torch.Tensor,
    loss: ConvexLoss,
    max_iter: int = 500,
    newton_steps: int = 10,
) -> tuple[torch.Tensor, float]:
    """Algorithm 1's minimiser of ``L_b(W; D)`` and the gradient residual it leaves (sum scale, Frobenius).

    L-BFGS on the mean-scaled objective from W = 0, as the authors' code, then Newton steps (exact Hessians are at
    hand) while they lower the residual: the certificate assumes the exact optimum, and whatever residual remains is
    charged to the removal budget by the caller."""
    n = features.shape[0]
    weights = torch.zeros(noise.shape, dtype=DTYPE, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weights],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective(weights, features, targets, lam, noise, loss) / n
        value.backward()
        return value

    optimizer.step(closure)
    weights = weights.detach()
    residual = gradient(weights, features, targets, lam, noise, loss)
    for _ in range(newton_steps):
        factor = torch.linalg.cholesky(hessians(weights, features, targets, lam, loss))
        step = torch.cholesky_solve(residual.T.unsqueeze(-1), factor).squeeze(-1).T
        candidate = weights - step
        candidate_residual = gradient(candidate, features, targets, lam, noise, loss)
        if candidate_residual.norm() >= residual.norm():
            break
        weights, residual = candidate, candidate_residual
    return weights, residual.norm().item()
