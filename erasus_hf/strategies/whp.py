"""Who's Harry Potter: fine-tune towards the generic predictions that a reinforced model reveals."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from torch.utils.data import DataLoader

from ..reference import eval_mode
from .base import Strategy
from .registry import register_strategy
from .task_vector import finetune_on_forget


@register_strategy
class WHP(Strategy):
    """Who's Harry Potter (WHP), the reinforcement-bootstrapping part.

    Eldan & Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs" (arXiv:2310.02238).

    1. Reinforced model: the base fine-tuned further on the forget set (the run's own training arguments).
    2. Generic predictions, teacher-forced on the forget text at every answer position:
       v_generic = v_base - alpha ReLU(v_reinforced - v_base) (logits), target = argmax v_generic.
    3. The base is fine-tuned towards those targets on the forget text (the run's training arguments again).
    With PEFT the reinforced model is the adapter trained in step 1 (base = adapter off); its B matrices are then
    reset to zero and the same adapter is trained in step 3, so no second model is held. alpha = 5 (an assumption:
    the value we could not verify in the paper's text; tune it). The paper's second ingredient, the anchored-term
    dictionary (idiosyncratic terms replaced by generic ones, with token alignment), is not implemented: passing
    `anchored_terms` fails rather than being ignored.
    """

    name = "whp"
    paper = "https://arxiv.org/abs/2310.02238"
    uses_retain = False
    one_shot = True
    objectives = ("causal_lm",)

    def __init__(self, alpha: float = 5.0, anchored_terms: dict[str, str] | None = None) -> None:
        if anchored_terms:
            raise NotImplementedError(
                "WHP's anchored-term translation (with its token alignment) is not implemented; "
                "run WHP without anchored_terms."
            )
        self.alpha = alpha
        self.anchored_terms = anchored_terms

    def generic_labels(self, logits_base: torch.Tensor, logits_reinforced: torch.Tensor) -> torch.Tensor:
        """argmax of v_base - alpha ReLU(v_reinforced - v_base), per position."""
        generic = logits_base - self.alpha * torch.relu(logits_reinforced - logits_base)
        return generic.argmax(-1)

    @torch.no_grad()
    def _generic_dataset(self, trainer, base, reinforced, base_context) -> Dataset:
        side_collator, objective = trainer.data_collator.side_collator, trainer.objective
        forget = trainer.train_dataset.forget
        rows = []
        loader = DataLoader(forget, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=side_collator)
        for batch in loader:
            batch = {k: v.to(trainer.args.device) for k, v in batch.items()}
            with eval_mode(reinforced):
                logits_reinforced = objective.score(reinforced, batch).logits
            with base_context(), eval_mode(base):
                scores = objective.score(base, batch)
            targets = self.generic_labels(scores.logits, logits_reinforced)
            labels = batch["labels"].clone()
            labels[:, 1:][scores.mask] = targets[scores.mask]
            for ids, lab, attention in zip(batch["input_ids"], labels, batch["attention_mask"], strict=True):
                keep = attention.bool()
                rows.append({"input_ids": ids[keep].tolist(), "labels": lab[keep].tolist()})
        return Dataset.from_list(rows)

    def apply(self, trainer) -> dict[str, float]:
        import contextlib

        from ..peft_utils import is_peft_model

        model = trainer.model
        if is_peft_model(model):
            finetune_on_forget(trainer, model)
            generic = self._generic_dataset(trainer, model, model, model.disable_adapter)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if "lora_B" in name and param.requires_grad:
                        param.zero_()
        else:
            reinforced = copy.deepcopy(model)
            reinforced.__dict__.pop("forward", None)  # see trainer.frozen_copy
            finetune_on_forget(trainer, reinforced)
            generic = self._generic_dataset(trainer, model, reinforced, contextlib.nullcontext)
            del reinforced
        changed = sum(
            sum(a != b for a, b in zip(g, o, strict=True))
            for g, o in zip(generic["labels"], trainer.train_dataset.forget["labels"], strict=True)
        )
        finetune_on_forget(trainer, model, dataset=generic)
        return {"whp_alpha": self.alpha, "whp_changed_targets": float(changed)}
