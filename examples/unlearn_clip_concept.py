r"""Make a CLIP model forget one concept: its images stop matching the concept's caption, the others still match.

    python examples/unlearn_clip_concept.py --model openai/clip-vit-base-patch32 \
        --dataset path/to/image_folder --forget_caption "a photo of a dog" --output_dir clip-without-dogs

What it does:

1. `CLIPModel.from_pretrained(model)` and `CLIPProcessor.from_pretrained(model)` load the model and its processor.
2. The dataset holds (image, caption) rows, one caption per concept (e.g. "a photo of a dog"): an image folder with
   a `metadata.csv`/`metadata.jsonl` naming each `file_name` and its caption, a dataset saved with
   `Dataset.save_to_disk`, or a Hub dataset id (train split). Rows with `--forget_caption` are the forget set, the
   others the retain set; `--eval_fraction` of each is held out to measure the result on unseen images.
3. `UnlearningTrainer` runs the strategy (default NPO, Zhang et al. 2024: a bounded, reference-relative gradient
   ascent on the forget rows, plus the retain rows' loss; NPO's frozen reference is a copy of the model, or the model
   with its LoRA adapter off) with the `contrastive` objective: each example's InfoNCE over the batch, image -> text
   and text -> image, at CLIP's learned temperature. The dataset's distinct captions are extra text candidates
   ("negatives"), so a forget batch that holds one caption still contrasts it with the other concepts (see
   `erasus_hf.objectives.contrastive`); `--no_negatives` scores CLIP's in-batch loss alone. NPO's beta is 0.1 by
   default (the paper's); a larger beta stops the ascent sooner once the concept no longer matches.
4. Zero-shot accuracy (the argmax over the distinct captions) of the held-out forget and retain images is printed
   before and after; the model (or the LoRA adapter, with `--lora_r > 0`) and the processor are saved to
   `--output_dir` as safetensors.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.objectives import ContrastiveObjective


def load_rows(dataset: str, image_column: str, caption_column: str):
    """The (image, caption) rows of `dataset`: a `save_to_disk` folder, an image folder, or a Hub dataset id."""
    from datasets import load_dataset, load_from_disk

    if os.path.isdir(dataset) and os.path.exists(os.path.join(dataset, "state.json")):
        rows = load_from_disk(dataset)
    elif os.path.isdir(dataset):
        rows = load_dataset("imagefolder", data_dir=dataset, split="train")
    else:
        rows = load_dataset(dataset, split="train")
    missing = [c for c in (image_column, caption_column) if c not in rows.column_names]
    if missing:
        raise ValueError(f"The dataset has no column {missing}; its columns are {rows.column_names}.")
    return rows.select_columns([image_column, caption_column])


def split_concept(rows, caption_column: str, forget_caption: str, eval_fraction: float, seed: int):
    """(forget train, retain train, forget eval, retain eval): the rows of `forget_caption` and the others, each
    with `eval_fraction` held out (seeded)."""
    captions = rows[caption_column]
    if forget_caption not in captions:
        raise ValueError(f"No row has the caption {forget_caption!r}; the captions are {sorted(set(captions))}.")
    forget = rows.select([i for i, c in enumerate(captions) if c == forget_caption])
    retain = rows.select([i for i, c in enumerate(captions) if c != forget_caption])
    if len(retain) == 0:
        raise ValueError("Every row has the forget caption: there is nothing to retain or to contrast with.")
    if eval_fraction <= 0:
        return forget, retain, forget, retain
    forget_split = forget.train_test_split(test_size=eval_fraction, seed=seed)
    retain_split = retain.train_test_split(test_size=eval_fraction, seed=seed)
    return forget_split["train"], retain_split["train"], forget_split["test"], retain_split["test"]


def processed(rows, processor, image_column: str, caption_column: str):
    """`rows` with `pixel_values` and unpadded `input_ids` computed on access (images are not cached)."""

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = [image.convert("RGB") for image in batch[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        input_ids = processor.tokenizer(batch[caption_column])["input_ids"]
        return {"pixel_values": list(pixel_values), "input_ids": input_ids}

    return rows.with_transform(transform)


@torch.no_grad()
def zero_shot_accuracy(model, processor, rows, captions: list[str], image_column: str, caption_column: str) -> float:
    """Share of `rows` whose image is closest to its own caption among `captions`."""
    model.eval()
    device = next(model.parameters()).device
    text = processor.tokenizer(captions, padding=True, return_tensors="pt").to(device)
    correct = 0
    for start in range(0, len(rows), 256):
        chunk = rows[start : start + 256]
        images = [image.convert("RGB") for image in chunk[image_column]]
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
        logits = model(**text, pixel_values=pixel_values).logits_per_image
        truth = torch.tensor([captions.index(c) for c in chunk[caption_column]], device=device)
        correct += (logits.argmax(-1) == truth).sum().item()
    return correct / len(rows)


def unlearn_concept(
    model: str,
    dataset: str,
    forget_caption: str,
    output_dir: str,
    image_column: str = "image",
    caption_column: str = "caption",
    strategy: str = "npo",
    strategy_kwargs: dict | None = None,
    negatives: bool = True,
    eval_fraction: float = 0.2,
    learning_rate: float = 1e-5,
    num_train_epochs: float = 3.0,
    batch_size: int = 32,
    lora_r: int = 0,
    seed: int = 0,
) -> dict[str, float]:
    """Unlearn the concept of `forget_caption` from the CLIP model at `model`, save the result to `output_dir`,
    and return the held-out zero-shot accuracies before and after."""
    from transformers import CLIPModel, CLIPProcessor

    clip = CLIPModel.from_pretrained(model)
    processor = CLIPProcessor.from_pretrained(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip.to(device)
    rows = load_rows(dataset, image_column, caption_column)
    captions = sorted(set(rows[caption_column]))
    forget, retain, forget_eval, retain_eval = split_concept(rows, caption_column, forget_caption, eval_fraction, seed)

    def evaluate(m) -> tuple[float, float]:
        return tuple(
            zero_shot_accuracy(m, processor, part, captions, image_column, caption_column)
            for part in (forget_eval, retain_eval)
        )

    before = evaluate(clip)
    tokenizer = processor.tokenizer
    objective = ContrastiveObjective(
        negative_captions=tokenizer(captions) if negatives else None, pad_token_id=tokenizer.pad_token_id
    )
    args = UnlearningConfig(
        output_dir=output_dir,
        strategy=strategy,
        strategy_kwargs=strategy_kwargs,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant",
        use_peft=lora_r > 0,
        lora_r=max(lora_r, 1),
        lora_alpha=2 * max(lora_r, 1),
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = UnlearningTrainer(
        clip,
        args,
        forget_dataset=processed(forget, processor, image_column, caption_column),
        retain_dataset=processed(retain, processor, image_column, caption_column),
        objective=objective,
    )
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(output_dir)
    after = evaluate(trainer.model)
    results = {
        "forget_accuracy_before": before[0],
        "forget_accuracy_after": after[0],
        "retain_accuracy_before": before[1],
        "retain_accuracy_after": after[1],
        "chance": 1 / len(captions),
    }
    with open(os.path.join(output_dir, "concept_unlearning.json"), "w") as f:
        json.dump({"forget_caption": forget_caption, "strategy": strategy, **results}, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="openai/clip-vit-base-patch32", help="A CLIP model: Hub id or folder.")
    parser.add_argument("--dataset", required=True, help="Image folder, save_to_disk folder or Hub dataset id.")
    parser.add_argument("--forget_caption", required=True, help="The caption of the concept to forget.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="caption")
    parser.add_argument("--strategy", default="npo", help="npo | grad_diff | ga | simnpo | scrub | ...")
    parser.add_argument(
        "--strategy_kwargs",
        type=json.loads,
        default=None,
        help="The strategy's hyperparameters, e.g. '{\"beta\": 0.1}'.",
    )
    parser.add_argument(
        "--no_negatives", action="store_true", help="Score CLIP's in-batch loss only (no dataset captions added)."
    )
    parser.add_argument("--eval_fraction", type=float, default=0.2, help="Held out of each side for the report.")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--num_train_epochs", type=float, default=3.0)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--lora_r", type=int, default=0, help="LoRA rank; 0 trains the whole model.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = unlearn_concept(
        args.model,
        args.dataset,
        args.forget_caption,
        args.output_dir,
        image_column=args.image_column,
        caption_column=args.caption_column,
        strategy=args.strategy,
        strategy_kwargs=args.strategy_kwargs,
        negatives=not args.no_negatives,
        eval_fraction=args.eval_fraction,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        seed=args.seed,
    )
    for side in ("forget", "retain"):
        before, after = results[f"{side}_accuracy_before"], results[f"{side}_accuracy_after"]
        print(f"{side} zero-shot accuracy: {before:.3f} -> {after:.3f}")
    print(f"chance: {results['chance']:.3f}")
    return results


if __name__ == "__main__":
    main()
