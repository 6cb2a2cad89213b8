"""Task-vector negation: a one-shot edit, run through the same trainer entry point."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from .base import Batch, Strategy, StrategyContext
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


def finetune_on_forget(trainer, model: nn.Module, dataset=None) -> nn.Module:
    """Fine-tune `model` in place on the trainer's forget set (or `dataset`: pre-tokenized rows) with the trainer's
    own arguments (learning rate, epochs, batch size, ...), and return it."""
    from ..trainer import UnlearningTrainer

    args = dataclasses.replace(
        trainer.args,
        strategy=ForgetFinetune(),
        strategy_kwargs={},
        use_peft=False,
        reference="none",
        save_strategy="no",
        output_dir=f"{trainer.args.output_dir}/reinforced",
    )
    UnlearningTrainer(
        model,
        args,
        forget_dataset=dataset if dataset is not None else trainer.train_dataset.forget,
        processing_class=trainer.processing_class,
        data_collator=trainer.data_collator.side_collator,
        objective=trainer.objective,
    ).train()
    return model


@register_strategy
class TaskVector(Strategy):
    """Task-vector negation.

    Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi, Farhadi 2023, "Editing Models with Task Arithmetic"
    (arXiv:2212.04089).

    theta_new = theta_base - lambda (theta_ft - theta_base), theta_ft the model fine-tuned on the forget set (with the
    run's own training arguments; the fine-tuning of the task vector). With PEFT the task vector *is* the adapter
    delta: the adapter is fine-tuned on the forget set and its LoRA B matrices are scaled by -lambda, so the adapter
    applies -lambda (theta_ft - theta_base) and adapter-off is the base. One-shot: `train()` runs the fine-tuning and
    the edit, with no unlearning loop. lambda = 1 (the paper picks lambda on held-out data from [0, 1]).
    """

    name = "task_vector"
    paper = "https://arxiv.org/abs/2212.04089"
    uses_retain = False
    one_shot = True

    def __init__(self, scaling: float = 1.0) -> None:
        self.scaling = scaling

    @torch.no_grad()
    def _negate(self, model: nn.Module, finetuned: nn.Module) -> None:
        finetuned_params = dict(finetuned.named_parameters())
        for name, param in model.named_parameters():
            param.sub_(self.scaling * (finetuned_params[name] - param))

    def apply(self, trainer) -> dict[str, float]:
        from ..peft_utils import is_peft_model

        model = trainer.model
        if is_peft_model(model):
            finetune_on_forget(trainer, model)  # trains the adapter: its delta is the task vector
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name and param.requires_grad:
                        param.mul_(-self.scaling)
        else:
            twin = copy.deepcopy(model)
            twin.__dict__.pop("forward", None)  # see trainer.frozen_copy
            self._negate(model, finetune_on_forget(trainer, twin))
        return {"task_vector_scaling": self.scaling}
