"""Random-label unlearning for classifiers: Amnesiac relabelling, and SalUn (relabelling restricted to the weights
most salient for the forget set)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .importance import class_logits, side_batches, summed_gradients
from .registry import register_strategy
from .saliency import MaskedUpdates, SaliencyConfig, saliency_masks


def random_wrong_labels(labels: torch.Tensor, index: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A random wrong label per example, fixed per example: y' = (y + k) mod C, k uniform on {1, ..., C-1} drawn from
    a generator seeded by (`seed`, the example's `index`), so y' is uniform over the C-1 wrong classes and the same
    at every epoch, in every batch composition."""
    if num_classes < 2:
        raise ValueError(f"Relabelling needs at least 2 classes, got {num_classes}.")
    offsets = [
        int(torch.randint(1, num_classes, (1,), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))))
        for i in index.tolist()
    ]
    return (labels + torch.tensor(offsets, device=labels.device)) % num_classes


@dataclass
class RandomLabelConfig(StrategyConfig):
    relabel_seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the random wrong labels, drawn once per example (with its index); the paper has no "
            "method hyperparameter besides it."
        },
    )


@register_strategy
class RandomLabel(Strategy):
    """Random labelling: fine-tune on the forget examples with random wrong labels.

    Graves, Nagisetty, Ganesh 2021, "Amnesiac Machine Learning", AAAI (arXiv:2010.10981), its relabelling form (the
    "unlearning" baseline that retrains the sensitive examples under randomly selected incorrect labels).

    L = gamma CE(f_theta(x_f), y'_f) + alpha L_retain, y'_f != y_f a random wrong label fixed per example (seeded by
    `relabel_seed` and the example's index, see `random_wrong_labels`), L_retain the CE of the retain examples
    (`retain_loss="nll"`; `"none"` gives the paper's relabelling-only form). The paper trains a few iterations on the
    relabelled data at the training learning rate; no method hyperparameter besides the seed.
    """

    name = "random_label"
    paper = "https://arxiv.org/abs/2010.10981"
    objectives = ("classification",)
    token_level = True  # reads the class logits
    config_class = RandomLabelConfig

    def relabelled(self, forget: Batch, num_classes: int) -> torch.Tensor:
        if "index" not in forget:
            raise ValueError(
                f"Strategy {self.name!r} needs forget batches that carry their `index` (UnlearningTrainer adds it) "
                "to fix each example's random label."
            )
        return random_wrong_labels(forget["labels"].view(-1), forget["index"].view(-1), num_classes, self.relabel_seed)

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        logits = class_logits(ctx.score(forget))
        loss = F.cross_entropy(logits.float(), self.relabelled(forget, logits.shape[-1]))
        return loss, {"forget_nll": ctx.score(forget).mean_nll.detach().mean()}


@dataclass
class SalUnConfig(RandomLabelConfig, SaliencyConfig):
    """mask_fraction (from `SaliencyConfig`), then relabel_seed (from `RandomLabelConfig`): dataclass fields come in
    the reverse order of the bases."""


@register_strategy
class SalUn(MaskedUpdates, RandomLabel):
    """SalUn (saliency unlearning) for image (or any) classifiers.

    Fan, Liu, Zhang, Wong, Wei, Liu 2024, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in
    Both Image Classification and Generation", ICLR (arXiv:2310.12508).

    1. Saliency mask, once before training (`setup`): g = sum over the forget batches of grad_theta CE(x_f, y_f);
       m = 1 on the top `mask_fraction` of |g| over all trained parameters (one global ranking), 0 elsewhere.
    2. Unlearning: theta_u = m * (theta_0 + Delta) + (1 - m) * theta_0, Delta trained on
       L = gamma E_f[CE(x_f, y'_f)] + alpha E_r[CE(x_r, y_r)], y'_f != y_f a random wrong label (the paper's random
       labelling; fixed per example, see `random_wrong_labels`; the released code draws it uniformly over all
       classes). Gradients are multiplied by m and the masked-out weights are restored after every optimizer step, so
       weight decay (AdamW's decoupled decay included) and momentum cannot move them (`MaskedUpdates`; the released
       code's latest RL step does the same restore).

    Defaults of the released classification code (github.com/OPTML-Group/Unlearn-Saliency, `Classification/`):
    `mask_fraction` = 0.5 (its 50% mask), alpha = 1 (`retain_weight`), 10 epochs of SGD (momentum 0.9, weight decay
    5e-4) at learning rate 0.01, the `--unlearn_lr` default of its `arg_parser.py`; its README's CIFAR-10 example
    (ResNet-18, random 10% forgetting) passes 0.013. The learning rate is the trainer's (`learning_rate`), not a
    hyperparameter of the strategy. Logs `salun_mask_fraction`.
    """

    name = "salun"
    paper = "https://arxiv.org/abs/2310.12508"
    config_class = SalUnConfig

    def setup(self, trainer) -> dict[str, float]:
        """Build the saliency mask from the forget set and restrict the updates to it (the trainer calls this); on
        resume, install the run's mask from the checkpoint instead (`load_state_dict`)."""
        self.teardown()
        if self._resumed_masks is not None:
            return {"salun_mask_fraction": self.install_masks(trainer, None)}
        batches = side_batches(
            trainer, trainer.train_dataset.forget, batch_size=trainer.args.per_device_train_batch_size
        )
        gradients = summed_gradients(trainer.model, trainer.model_objective, batches)
        return {"salun_mask_fraction": self.install_masks(trainer, saliency_masks(gradients, self.mask_fraction))}

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        if not self.masks and ctx.training:
            raise RuntimeError("SalUn's saliency mask is not built; train it through UnlearningTrainer.train().")
        return super().forget_loss(ctx, forget)
