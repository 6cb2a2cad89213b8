"""Per-parameter gradient statistics over a whole forget or retain set, for the methods that read them before (or
instead of) training: SalUn's saliency, SSD's importances, Fisher forgetting's diagonal Fisher.

Every statistic is computed with the model in eval mode (no dropout) over the parameters that require a gradient,
from the objective's score, so the batches are exactly what the strategy's loss sees. `gradient_sums` is the
accumulation under them, for a strategy with a loss of its own (the diffusion SalUn's guided loss).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from ..objectives import Objective, Scores
from ..reference import eval_mode
from .base import Batch


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"{type(model).__name__} has no trainable parameter.")
    return params


def side_batches(trainer, *datasets, batch_size: int, shuffle_seed: int | None = None) -> Iterator[Batch]:
    """Batches of the trainer's prepared side datasets (forget, retain, or both concatenated), collated with the
    trainer's side collator and moved to the model's device; shuffled with a seeded generator when asked."""
    data = datasets[0] if len(datasets) == 1 else ConcatDataset(list(datasets))
    generator = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    loader = DataLoader(
        data,
        batch_size=batch_size,
        shuffle=shuffle_seed is not None,
        generator=generator,
        collate_fn=trainer.data_collator.side_collator,
    )
    device = next(trainer.model.parameters()).device
    for batch in loader:
        yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def class_logits(scores: Scores) -> torch.Tensor:
    """[B, C] logits of a classifier's scores (the classification objective scores one label per example)."""
    if scores.logits.dim() != 3 or scores.logits.shape[1] != 1:
        raise ValueError(
            f"Expected one class prediction per example (logits [batch, 1, classes]), got {tuple(scores.logits.shape)}"
            "; this strategy serves the classification objective."
        )
    return scores.logits[:, 0]


def gradient_sums(
    params: dict[str, nn.Parameter], losses: Iterable[torch.Tensor], power: int = 1
) -> tuple[dict[str, torch.Tensor], int]:
    """(sum over `losses` of (grad_theta loss)^power per parameter, the number of losses); a parameter that a loss
    does not reach adds zero. The caller sets the model's mode (the classifier statistics run in eval mode)."""
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for name, g in zip(params, grads, strict=True):
            if g is not None:
                sums[name] += g if power == 1 else g.pow(power)
        count += 1
    return sums, count


def _batch_ce(model: nn.Module, objective: Objective, batches: Iterable[Batch]) -> Iterator[torch.Tensor]:
    """CE(batch), the batch-mean NLL of the labels, of each batch in turn."""
    for batch in batches:
        yield objective.score(model, batch).mean_nll.mean()


def summed_gradients(model: nn.Module, objective: Objective, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """sum over batches of grad_theta CE(batch), CE the batch-mean NLL of the labels (SalUn's saliency gradient)."""
    params = trainable_parameters(model)
    with eval_mode(model):
        sums, _ = gradient_sums(params, _batch_ce(model, objective, batches))
    return sums


def squared_gradients(model: nn.Module, objective: Objective, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """mean over batches of (grad_theta CE(batch))^2: the diagonal importances of SSD's reference code (squared
    mini-batch gradients, averaged over the mini-batches)."""
    params = trainable_parameters(model)
    with eval_mode(model):
        sums, count = gradient_sums(params, _batch_ce(model, objective, batches), power=2)
    if count == 0:
        raise ValueError("No batch to compute importances from.")
    return {n: s / count for n, s in sums.items()}


def fisher_diagonal(model: nn.Module, objective: Objective, examples: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """The diagonal of the (true) Fisher information, one example at a time:
    F = 1/N sum_x sum_y p(y|x) (d log p(y|x) / d theta)^2, the expectation over the model's own predictive
    distribution (Golatkar et al.'s `hessian`: one backward pass per class and example). Batches of one example."""
    params = trainable_parameters(model)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    with eval_mode(model):
        for batch in examples:
            logits = class_logits(objective.score(model, batch))
            if logits.shape[0] != 1:
                raise ValueError(f"fisher_diagonal needs batches of one example, got {logits.shape[0]}.")
            log_probs = torch.log_softmax(logits[0].float(), dim=-1)
            probs = log_probs.detach().exp()
            for y in range(log_probs.shape[0]):
                grads = torch.autograd.grad(log_probs[y], list(params.values()), retain_graph=True, allow_unused=True)
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        sums[name] += probs[y] * g.pow(2)
            count += 1
    if count == 0:
        raise ValueError("No example to compute the Fisher information from.")
    return {n: s / count for n, s in sums.items()}
