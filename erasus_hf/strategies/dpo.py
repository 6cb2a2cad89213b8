"""DPO towards an alternate answer, and TOFU's IdkDPO (the alternate is a refusal)."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources

import torch
import torch.nn.functional as F

from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


def load_refusals() -> list[str]:
    """The 100 refusal answers of TOFU's code release (shipped in `erasus_hf/data/resources/idontknow.txt`)."""
    text = resources.files("erasus_hf.data").joinpath("resources/idontknow.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@dataclass
class DPOConfig(StrategyConfig):
    beta: float = field(
        default=0.1,
        metadata={
            "help": "Inverse temperature of the log-sigmoid on the reward margin (> 0); 0.1: TOFU's and "
            "open-unlearning's setting."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"DPO needs beta > 0, got {self.beta}")


@register_strategy
class DPO(Strategy):
    """Direct Preference Optimization with the forget answer as the rejected one.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward Model"
    (arXiv:2305.18290), used for unlearning as in TOFU (Maini et al. 2024, arXiv:2401.06121).

    L_DPO = -(2/beta) E_forget[ log sigmoid(beta [(log pi_theta - log pi_ref)(y_alt|x) - (log pi_theta -
    log pi_ref)(y_forget|x)]) ], sequence log-probs over answer tokens; L = gamma L_DPO + alpha L_retain.
    beta = 0.1, TOFU's setting. The 2/beta scale is open-unlearning's (`compute_dpo_loss` in `src/trainer/utils.py`:
    -2/beta logsigmoid(beta (win_log_ratio - lose_log_ratio)), `configs/trainer/DPO.yaml` beta 0.1), not TOFU's:
    TOFU's `dataloader.py` (`forget_loss == "dpo"`) has no scale, -logsigmoid(beta (pi_logratios -
    ref_logratios)).mean() with beta = 0.1 written in the code. At beta = 0.1 our loss and its gradient are 20 times
    TOFU's: Adam mostly cancels a constant scale, gradient clipping (`max_grad_norm`) and SGD do not. `dpo` reads
    y_alt from the forget rows' `alternate` column; `idk_dpo` draws it from the refusal list. Logs the implicit
    reward margin.
    """

    name = "dpo"
    paper = "https://arxiv.org/abs/2305.18290"
    needs_reference = frozenset({"sequence_logprob"})
    objectives = ("causal_lm", "vision_language")
    config_class = DPOConfig  # IdkDPO inherits it

    def alternate_answers(self, forget, seed: int) -> list[str] | None:
        if "alternate" not in forget.column_names:
            raise ValueError(
                f"Strategy {self.name!r} needs an 'alternate' column (the preferred answer) in the forget set; "
                f"columns are {forget.column_names}. Use 'idk_dpo' to prefer a refusal instead."
            )
        return None

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        reference = ctx.require_reference()
        alternate = forget["alternate"]
        ref_forget = reference.sequence_logprob(ctx.objective, forget)
        ref_alternate = reference.sequence_logprob(ctx.objective, alternate)
        forget_ratio = ctx.score(forget).sequence_logprob - ref_forget
        alternate_ratio = ctx.score(alternate).sequence_logprob - ref_alternate
        margin = alternate_ratio - forget_ratio
        loss = -(2.0 / self.beta) * F.logsigmoid(self.beta * margin).mean()
        return loss, {
            "dpo_margin": margin.detach().mean(),
            "forget_log_ratio": forget_ratio.detach().mean(),
            "alternate_log_ratio": alternate_ratio.detach().mean(),
        }


@register_strategy
class IdkDPO(DPO):
    """IdkDPO: DPO that prefers a refusal ("I don't know") over the forget answer (TOFU, Maini et al. 2024,
    arXiv:2401.06121, after Rafailov et al. 2023). y_alt is drawn per forget row from TOFU's 100 refusals by a
    generator seeded with the run's seed, unless the forget rows carry their own `alternate` column. beta = 0.1."""

    name = "idk_dpo"
    paper = "https://arxiv.org/abs/2401.06121"

    def alternate_answers(self, forget, seed: int) -> list[str] | None:
        if "alternate" in forget.column_names:
            return None
        refusals = load_refusals()
        generator = torch.Generator().manual_seed(seed)
        picks = torch.randint(len(refusals), (len(forget),), generator=generator)
        return [refusals[i] for i in picks.tolist()]
