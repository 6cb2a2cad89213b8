"""Who's Harry Potter: fine-tune towards the generic predictions that a reinforced model reveals."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from datasets import Dataset

from ..data.anchored import anchored_example
from ..data.collator import QACollator
from ..peft_utils import is_peft_model
from ..reference import active_adapter, eval_mode, frozen_copy
from .base import Strategy
from .config import StrategyConfig
from .registry import register_strategy
from .task_vector import START_ADAPTER, adapter_adds_nothing, copy_adapter


@dataclass
class WHPConfig(StrategyConfig):
    alpha: float = field(
        default=5.0,
        metadata={
            "help": "Strength of the suppression in v_base - alpha ReLU(v_reinforced - v_base); 5.0 is our default "
            "(the paper gives the formula, we could not verify its value: tune it)."
        },
    )
    anchored_terms: dict[str, str] | None = field(
        default_factory=dict,
        metadata={
            "help": 'Anchored-term dictionary {term: generic translation} (e.g. {"Hogwarts": "the academy"}); '
            "v_base is read on the translated text. Empty by default (no translation); needs raw question/answer "
            "rows and a fast tokenizer."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.anchored_terms = dict(self.anchored_terms or {})


@register_strategy
class WHP(Strategy):
    """Who's Harry Potter (WHP).

    Eldan & Russinovich 2023, "Who's Harry Potter? Approximate Unlearning in LLMs" (arXiv:2310.02238).

    "Base" is the model as it arrived (with the adapter it carries, if any).
    1. Reinforced model: the base fine-tuned further on the forget set (the run's own training arguments).
    2. Generic predictions, teacher-forced on the forget text at every answer position:
       v_generic = v_base - alpha ReLU(v_reinforced - v_base) (logits), target = argmax v_generic.
       With an anchored-term dictionary (`anchored_terms={"Hogwarts": "the academy", ...}`) v_base is the base
       model's prediction on the *translated* text, at the aligned position (`erasus_hf.data.anchored`), while
       v_reinforced reads the original text; the tokens inside an anchored term after its first have no generic
       target and are not trained on (the paper's caveat about repeated terms). This is our reading of the paper's
       "combine the reinforced and the anchored-term predictions"; it publishes no code.
    3. The base is fine-tuned towards those targets on the original forget text (the run's training arguments).
    With a fresh LoRA adapter the reinforced model is the adapter trained in step 1 (base = adapter off); its B
    matrices are then reset to zero and the same adapter is trained in step 3, so no second model is held. With a
    model that arrives with a trained LoRA adapter, the base is that model: a frozen copy of its adapter gives
    v_base, the adapter itself is fine-tuned into the reinforced model, then reset to the copy before step 3 (one
    extra adapter's weights, deleted at the end). alpha = 5 is our default:
    the paper gives the formula but we could not verify its value of alpha; tune it. Anchored terms need raw
    question/answer rows and a fast tokenizer.
    """

    name = "whp"
    paper = "https://arxiv.org/abs/2310.02238"
    uses_retain = False
    one_shot = True
    objectives = ("causal_lm",)
    config_class = WHPConfig

    def generic_labels(self, logits_base: torch.Tensor, logits_reinforced: torch.Tensor) -> torch.Tensor:
        """argmax of v_base - alpha ReLU(v_reinforced - v_base), per position."""
        generic = logits_base - self.alpha * torch.relu(logits_reinforced - logits_base)
        return generic.argmax(-1)

    def _rows(self, trainer) -> list[dict]:
        """Forget rows with `input_ids`, `labels`, `translated_ids` and `alignment` (identity without anchors)."""
        if not self.anchored_terms:
            return [
                {**row, "translated_ids": row["input_ids"], "alignment": list(range(len(row["input_ids"])))}
                for row in trainer.train_dataset.forget.select_columns(["input_ids", "labels"])
            ]
        collator = trainer.data_collator.side_collator
        if not isinstance(collator, QACollator) or collator.question_key not in trainer.forget_rows.column_names:
            raise ValueError("WHP's anchored terms translate raw question/answer rows read by the QACollator.")
        if collator.text_format.chat(collator.tokenizer):
            raise ValueError(
                "WHP's anchored terms translate question/answer rows in the plain prompt template, not through a chat "
                "template: set use_chat_template=False."
            )
        return [anchored_example(collator, row, self.anchored_terms) for row in trainer.forget_rows]

    @torch.no_grad()
    def _generic_dataset(self, trainer, base, reinforced, base_context) -> Dataset:
        side_collator, objective = trainer.data_collator.side_collator, trainer.model_objective
        device = trainer.args.device
        rows, out = self._rows(trainer), []
        self.counts = {"whp_changed_targets": 0.0, "whp_untrained_tokens": 0.0}
        size = trainer.args.per_device_eval_batch_size
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            original = side_collator([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in chunk])
            translated = side_collator([{"input_ids": r["translated_ids"]} for r in chunk])
            original, translated = ({k: v.to(device) for k, v in b.items()} for b in (original, translated))
            with eval_mode(reinforced):
                logits_reinforced = objective.score(reinforced, original).logits
            with base_context(), eval_mode(base):
                logits_base = objective.score(base, translated).logits
            for b, row in enumerate(chunk):
                # logits[:, k] predicts the token at padded index k + 1, whichever side the padding is on
                pos_o = original["attention_mask"][b].nonzero()[:, 0]
                pos_t = translated["attention_mask"][b].nonzero()[:, 0]
                scored = [
                    (i, j)
                    for i, (label, j) in enumerate(zip(row["labels"], row["alignment"], strict=True))
                    if label != -100 and i > 0
                ]
                aligned = torch.tensor([(i, j) for i, j in scored if j > 0], dtype=torch.long).view(-1, 2)
                targets = self.generic_labels(
                    logits_base[b, pos_t[aligned[:, 1]] - 1], logits_reinforced[b, pos_o[aligned[:, 0]] - 1]
                )
                labels = [-100] * len(row["labels"])
                for i, target in zip(aligned[:, 0].tolist(), targets.tolist(), strict=True):
                    labels[i] = target
                    self.counts["whp_changed_targets"] += target != row["labels"][i]
                self.counts["whp_untrained_tokens"] += len(scored) - len(aligned)  # inside anchored terms
                out.append({"input_ids": row["input_ids"], "labels": labels})
        return Dataset.from_list(out)

    def apply(self, trainer) -> dict[str, float]:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        model = trainer.model
        if not is_peft_model(model):
            reinforced = frozen_copy(model)
            trainer.finetune_on_forget(reinforced)
            generic = self._generic_dataset(trainer, model, reinforced, contextlib.nullcontext)
            del reinforced
        elif adapter_adds_nothing(model):  # a fresh adapter: adapter-off is the starting model
            trainer.finetune_on_forget(model)
            generic = self._generic_dataset(trainer, model, model, model.disable_adapter)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if ("lora_B" in name or "lora_embedding_B" in name) and param.requires_grad:
                        param.zero_()
        else:  # an arrived adapter: the starting model is base + that adapter, kept in a frozen copy
            name = model.active_adapter
            start = copy_adapter(model, name, START_ADAPTER)
            trainer.finetune_on_forget(model)
            generic = self._generic_dataset(trainer, model, model, lambda: active_adapter(model, start))
            state = get_peft_model_state_dict(model, adapter_name=start)
            set_peft_model_state_dict(model, state, adapter_name=name)  # step 3 starts from the arrived model
            model.delete_adapter(start)
        trainer.finetune_on_forget(model, dataset=generic)
        return {"whp_alpha": self.alpha, **self.counts}
