"""Task-vector negation: a one-shot edit, run through the same trainer entry point."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from ..peft_utils import is_peft_model
from ..reference import frozen_copy
from .base import Batch, Strategy, StrategyContext
from .config import StrategyConfig
from .registry import register_strategy


class ForgetFinetune(Strategy):
    """Plain fine-tuning on the forget set (L = NLL(forget)): the "reinforced" model of task-vector negation and
    Who's Harry Potter. Not an unlearning method, so not registered by name."""

    name = "forget_finetune"
    paper = "n/a"
    uses_retain = False

    def forget_loss(self, ctx: StrategyContext, forget: Batch):
        nll = ctx.score(forget).mean_nll.mean()
        return nll, {"forget_nll": nll.detach()}


START_ADAPTER = "erasus_start"


def adapter_adds_nothing(model: nn.Module) -> bool:
    """Whether the active LoRA adapter of `model` (a PeftModel) leaves the base unchanged (all its B matrices are
    zero, as when LoRA is freshly initialised), so adapter-off is the starting model. Refuses adapters whose delta is
    not B @ A: another PEFT method, DoRA, or `modules_to_save` copies of whole modules."""
    name = model.active_adapter
    config = model.peft_config[name]
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA" or getattr(config, "use_dora", False) or config.modules_to_save:
        raise ValueError(
            f"task_vector and whp edit a LoRA adapter's B @ A delta; adapter {name!r} is {kind}"
            f"{' with DoRA' if getattr(config, 'use_dora', False) else ''}"
            f"{f' with modules_to_save={config.modules_to_save}' if config.modules_to_save else ''}. "
            "Merge it into the model (merge_and_unload) and unlearn with a fresh LoRA adapter or without PEFT."
        )
    return all(
        not param.any()
        for n, param in model.named_parameters()
        if f"lora_B.{name}." in n or f"lora_embedding_B.{name}" in n
    )


def copy_adapter(model: nn.Module, source: str, target: str) -> str:
    """Add adapter `target` to `model` (a PeftModel) as a frozen copy of adapter `source`; `source` stays active."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if target in model.peft_config:
        raise ValueError(f"The model already has an adapter named {target!r}.")
    model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    set_peft_model_state_dict(model, get_peft_model_state_dict(model, adapter_name=source), adapter_name=target)
    model.base_model.set_adapter(source)
    return target


@dataclass
class TaskVectorConfig(StrategyConfig):
    scaling: float = field(
        default=1.0,
        metadata={
            "help": "lambda, the multiple of the task vector (theta_ft - theta_start) subtracted from the start; "
            "1.0 by default (the paper picks it on held-out data from [0, 1])."
        },
    )


@register_strategy
class TaskVector(Strategy):
    """Task-vector negation.

    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi 2023, "Editing Models with Task Arithmetic"
    (arXiv:2212.04089).

    theta_new = theta_start - lambda (theta_ft - theta_start), theta_start the model as it arrived and theta_ft that
    model fine-tuned on the forget set (with the run's own training arguments; the fine-tuning of the task vector).
    With PEFT the fine-tuning trains the adapter:
    - a fresh LoRA adapter (B = 0, so theta_start is the base): the task vector *is* the adapter delta, and its B
      matrices are scaled by -lambda, so the adapter applies -lambda (theta_ft - theta_start);
    - a model that arrives with a trained adapter (theta_start = base + delta_start): the adapter is fine-tuned from
      delta_start to delta_ft, and the result base + (1 + lambda) delta_start - lambda delta_ft is written back under
      the adapter's name as one LoRA adapter of rank r_start + r_ft (PEFT's `add_weighted_adapter(..., "cat")`,
      exact; its lora_alpha equals its rank).
    Only LoRA adapters without DoRA or `modules_to_save` can hold the edit (it is a weight difference); others fail.
    One-shot: `train()` runs the fine-tuning and the edit, with no unlearning loop. lambda = 1 (the paper picks
    lambda on held-out data from [0, 1]).
    """

    name = "task_vector"
    paper = "https://arxiv.org/abs/2212.04089"
    uses_retain = False
    one_shot = True
    config_class = TaskVectorConfig

    @torch.no_grad()
    def _negate(self, model: nn.Module, finetuned: nn.Module) -> None:
        finetuned_params = dict(finetuned.named_parameters())
        for name, param in model.named_parameters():
            param.sub_(self.scaling * (finetuned_params[name] - param))

    def apply(self, trainer) -> dict[str, float]:
        model = trainer.model
        if not is_peft_model(model):
            self._negate(model, trainer.finetune_on_forget(frozen_copy(model)))
        elif adapter_adds_nothing(model):  # a fresh adapter: the start is the base, the adapter delta the vector
            trainer.finetune_on_forget(model)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ("lora_B" in name or "lora_embedding_B" in name) and param.requires_grad:
                        param.mul_(-self.scaling)
        else:  # an arrived adapter: delta_new = (1 + lambda) delta_start - lambda delta_ft, rank r_start + r_ft
            name = model.active_adapter
            start = copy_adapter(model, name, START_ADAPTER)
            trainer.finetune_on_forget(model)
            combined = "erasus_task_vector"
            model.add_weighted_adapter([start, name], [1 + self.scaling, -self.scaling], combined, "cat")
            model.base_model.set_adapter(combined)
            for old in (name, start):
                model.delete_adapter(old)
            copy_adapter(model, combined, name)  # back under the adapter's own name (the one the trainer saves)
            model.base_model.set_adapter(name)
            model.delete_adapter(combined)
        return {"task_vector_scaling": self.scaling}
