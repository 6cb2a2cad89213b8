"""Make a LLaVA model forget the answers it gives about some images, with a LoRA adapter.

    python examples/unlearn_llava.py --model llava-hf/llava-1.5-7b-hf --dataset my_vqa_dataset \\
        --forget_column answer --forget_value "Barack Obama" --strategy npo --output_dir llava-forget

What it does:

1. `LlavaForConditionalGeneration.from_pretrained(model)` and `AutoProcessor.from_pretrained(model)` (a Hub id or a
   local folder; bfloat16 on a GPU).
2. The dataset (`datasets.load_dataset(dataset, split=split)`, or `load_from_disk` for a saved folder) has one row per
   (image, question, answer). The rows whose `--forget_column` equals one of the `--forget_value`s are the forget set;
   a seeded sample of the other rows is the retain set, and another, disjoint, sample measures what is kept.
3. `VisionLanguageObjective(processor)` turns each row into LLaVA's prompt (`--prompt_template`, llava-1.5's
   "USER: <image>\\n{question} ASSISTANT:" by default) with the answer after it; only the answer tokens are scored
   (the prompt and the image placeholder tokens are masked).
4. `UnlearningTrainer` trains a LoRA adapter on the language model's linear layers (the vision tower and projector
   stay frozen) with the chosen strategy (e.g. `grad_diff`: ascend on the forget answers, descend on the retain
   answers; `npo`: Negative Preference Optimization with a retain term).
5. `trainer.save_model()` writes the adapter (safetensors) and the processor to `--output_dir`; load it with
   `PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(model), output_dir)`.

Prints (and returns from `main`) the mean answer NLL (nats per answer token) of the forget rows and of the held-out
retain rows before and after unlearning.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset, load_dataset, load_from_disk

from erasus_hf import STRATEGIES, UnlearningConfig, UnlearningTrainer, get_strategy
from erasus_hf.objectives import VisionLanguageObjective

LLAVA_PROMPT = "USER: {image}\n{question} ASSISTANT:"
"""The llava-1.5 conversation format, `{image}` being the processor's image placeholder ("<image>")."""

VISION_LANGUAGE_STRATEGIES = sorted(name for name, cls in STRATEGIES.items() if "vision_language" in cls.objectives)


def load_rows(dataset: str, split: str) -> Dataset:
    """A dataset folder written by `save_to_disk`, or a Hub dataset id / local data files for `load_dataset`."""
    if os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "dataset_info.json")):
        loaded = load_from_disk(dataset)
        return loaded[split] if isinstance(loaded, dict) else loaded
    return load_dataset(dataset, split=split)


def split_forget_retain(
    rows: Dataset, column: str, values: Sequence[str], max_retain: int, eval_rows: int, seed: int
) -> tuple[Dataset, Dataset, Dataset]:
    """(forget, retain to train on, held-out retain to evaluate): the rows whose `column` is one of `values`, and two
    disjoint seeded samples of the others."""
    if column not in rows.column_names:
        raise ValueError(f"--forget_column {column!r} is not a column; columns are {rows.column_names}.")
    wanted = {str(v) for v in values}
    matches = [str(v) in wanted for v in rows[column]]
    forget = rows.select([i for i, m in enumerate(matches) if m])
    others = rows.select([i for i, m in enumerate(matches) if not m]).shuffle(seed=seed)
    if len(forget) == 0:
        raise ValueError(f"No row has {column} in {sorted(wanted)}: nothing to forget.")
    if len(others) < 2:
        raise ValueError(f"Only {len(others)} rows are left to retain; the retain set needs at least 2.")
    held_out = min(eval_rows, len(others) // 2)
    return (
        forget,
        others.select(range(held_out, min(len(others), held_out + max_retain))),
        others.select(range(held_out)),
    )


@torch.no_grad()
def answer_nll(model: torch.nn.Module, objective: VisionLanguageObjective, rows: Dataset, batch_size: int) -> float:
    """Mean over rows of each answer's NLL (nats per answer token)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = objective.collator([rows[i] for i in range(start, min(len(rows), start + batch_size))])
        batch = {k: v.to(device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        total += objective.score(model, batch).mean_nll.float().sum().item()
    model.train(was_training)
    return total / len(rows)


def unlearn_llava(
    model: str,
    dataset: str,
    forget_column: str,
    forget_values: Sequence[str],
    output_dir: str,
    split: str = "train",
    strategy: str = "grad_diff",
    strategy_kwargs: dict[str, Any] | None = None,
    image_column: str = "image",
    question_column: str = "question",
    answer_column: str = "answer",
    prompt_template: str = LLAVA_PROMPT,
    lora_r: int = 16,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 3.0,
    batch_size: int = 4,
    max_retain: int = 512,
    eval_rows: int = 64,
    seed: int = 0,
    **config: Any,
) -> dict[str, Any]:
    """Unlearn the matching rows of `dataset` from the LLaVA at `model` with a LoRA adapter saved to `output_dir`;
    return the forget / held-out retain NLL before and after, the row counts and the unlearned (PEFT) `model`.
    `config` holds further `UnlearningConfig` fields."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    cuda = torch.cuda.is_available()
    llava = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16 if cuda else torch.float32)
    llava.to("cuda" if cuda else "cpu")
    processor = AutoProcessor.from_pretrained(model)
    objective = VisionLanguageObjective(
        processor,
        image_key=image_column,
        question_key=question_column,
        answer_key=answer_column,
        prompt_template=prompt_template,
    )
    rows = load_rows(dataset, split)
    forget, retain, held_out = split_forget_retain(rows, forget_column, forget_values, max_retain, eval_rows, seed)
    before = {
        "forget_nll": answer_nll(llava, objective, forget, batch_size),
        "retain_nll": answer_nll(llava, objective, held_out, batch_size),
    }
    args = UnlearningConfig(
        output_dir=output_dir,
        strategy=strategy,
        strategy_kwargs=strategy_kwargs,
        use_peft=True,
        lora_r=lora_r,
        lora_alpha=2 * lora_r,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        bf16=cuda,
        save_strategy="no",
        report_to="none",
        seed=seed,
        **config,
    )
    needs_retain = get_strategy(args.strategy, **args.strategy_kwargs).needs_retain(args.retain_loss)
    trainer = UnlearningTrainer(
        llava,
        args,
        forget_dataset=forget,
        retain_dataset=retain if needs_retain else None,
        processing_class=processor,
        objective=objective,
    )
    trainer.train()
    trainer.save_model()
    after = {
        "forget_nll": answer_nll(trainer.model, objective, forget, batch_size),
        "retain_nll": answer_nll(trainer.model, objective, held_out, batch_size),
    }
    return {
        "model": trainer.model,
        "strategy": strategy,
        "num_forget": len(forget),
        "num_retain": len(retain),
        "num_held_out": len(held_out),
        "before": before,
        "after": after,
        "output_dir": output_dir,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="llava-hf/llava-1.5-7b-hf", help="A LLaVA checkpoint: Hub id or local folder."
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="Rows of (image, question, answer): a Hub dataset id or a save_to_disk folder.",
    )
    parser.add_argument("--split", default="train", help="Dataset split (default: train).")
    parser.add_argument("--forget_column", required=True, help="The column the forget filter reads (e.g. answer).")
    parser.add_argument(
        "--forget_value", nargs="+", required=True, help="Rows whose forget_column equals one of these are forgotten."
    )
    parser.add_argument("--output_dir", required=True, help="Where the LoRA adapter and the processor are saved.")
    parser.add_argument(
        "--strategy",
        default="grad_diff",
        choices=VISION_LANGUAGE_STRATEGIES,
        help="Unlearning strategy (default: grad_diff).",
    )
    parser.add_argument(
        "--strategy_kwargs", default=None, help="The strategy's hyperparameters as JSON, e.g. '{\"beta\": 0.1}'."
    )
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--question_column", default="question")
    parser.add_argument("--answer_column", default="answer")
    parser.add_argument(
        "--prompt_template",
        default=LLAVA_PROMPT,
        help="Prompt with {image} (the processor's image token) and {question}; default: llava-1.5's format.",
    )
    parser.add_argument("--lora_r", type=int, default=16, help="LoRA rank (alpha = 2r).")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=4, help="Per-device batch of forget (and retain) rows.")
    parser.add_argument("--max_retain", type=int, default=512, help="Retain rows to train on (a seeded sample).")
    parser.add_argument("--eval_rows", type=int, default=64, help="Held-out retain rows to measure what is kept.")
    parser.add_argument("--retain_weight", type=float, default=1.0, help="alpha, the weight of the retain term.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    summary = unlearn_llava(
        model=args.model,
        dataset=args.dataset,
        forget_column=args.forget_column,
        forget_values=args.forget_value,
        output_dir=args.output_dir,
        split=args.split,
        strategy=args.strategy,
        strategy_kwargs=json.loads(args.strategy_kwargs) if args.strategy_kwargs else None,
        image_column=args.image_column,
        question_column=args.question_column,
        answer_column=args.answer_column,
        prompt_template=args.prompt_template,
        lora_r=args.lora_r,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        batch_size=args.batch_size,
        max_retain=args.max_retain,
        eval_rows=args.eval_rows,
        seed=args.seed,
        retain_weight=args.retain_weight,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=2))
    return summary


if __name__ == "__main__":
    main()
