"""Unlearn one class of an image classifier with SalUn (or SCRUB) and report what it forgot.

    python examples/unlearn_digit_classifier.py --model farleyknight-org-username/vit-base-mnist \
        --dataset ylecun/mnist --forget_class 3 --output_dir vit-mnist-without-3

What it does:

1. `AutoModelForImageClassification.from_pretrained(model)` and its `AutoImageProcessor` (a Hub id or a local
   folder); `datasets.load_dataset(dataset)` gives the train and test splits (`--image_column`, `--label_column`).
2. The training images of `--forget_class` are the forget set, the other training images the retain set (up to
   `--max_train` images in all, a seeded sample).
3. `UnlearningTrainer` runs the strategy: `salun` builds its saliency mask from the forget images, then trains the
   salient half of the weights on random wrong labels for the forget images plus the retain images' cross-entropy;
   `scrub` alternates max-steps (away from the original model on the forget images) and min-steps (towards it on the
   retain images). `trainer.save_model()` writes safetensors.
4. Accuracy on the test images of the forgotten class and of the other classes, before and after.

The defaults follow benchmarks/classifier_digits.py (AdamW at a constant learning rate, 10 passes over the forget
set; SalUn with retain weight alpha = 5; SCRUB with max-steps in the first 3 passes), with a learning rate for
fine-tuning a pre-trained ViT; the SalUn paper's own runs use SGD at learning rate 0.1 for 10 epochs (CIFAR-10).
"""

from __future__ import annotations

import argparse

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.evaluation.classification import accuracy, class_probabilities


def class_accuracies(model, test, forget_class: int) -> dict[str, float]:
    """Test accuracy on the forgotten class and on the other classes."""
    columns = test[:]  # torch-formatted: {"pixel_values": [N, C, H, W], "labels": [N]}
    probs = class_probabilities(model, {"pixel_values": columns["pixel_values"]})
    labels = columns["labels"]
    is_forget = labels == forget_class
    return {
        "forget_class": accuracy(probs[is_forget], labels[is_forget]),
        "other_classes": accuracy(probs[~is_forget], labels[~is_forget]),
    }


def unlearn_class(
    model: str,
    dataset,
    forget_class: int,
    output_dir: str,
    strategy: str = "salun",
    image_column: str = "image",
    label_column: str = "label",
    max_train: int = 2000,
    max_test: int = 1000,
    learning_rate: float = 5e-5,
    num_train_epochs: int = 10,
    batch_size: int = 32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Unlearn `forget_class` from the classifier at `model` on `dataset` (a Hub id, a local dataset folder, or a
    `DatasetDict` with "train" and "test"); save the result to `output_dir`; return the accuracies before and after."""
    from datasets import load_dataset
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    classifier = AutoModelForImageClassification.from_pretrained(model)
    processor = AutoImageProcessor.from_pretrained(model)
    splits = load_dataset(dataset) if isinstance(dataset, str) else dataset
    mode = "RGB" if getattr(classifier.config, "num_channels", 3) == 3 else "L"

    def encode(batch):
        images = [image.convert(mode) for image in batch[image_column]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": batch[label_column]}

    def prepare(split, limit):
        rows = splits[split].shuffle(seed=seed).select(range(min(limit, len(splits[split]))))
        return rows.map(encode, batched=True, remove_columns=rows.column_names).with_format("torch")

    train, test = prepare("train", max_train), prepare("test", max_test)
    forget = train.filter(lambda label: label == forget_class, input_columns="labels")
    retain = train.filter(lambda label: label != forget_class, input_columns="labels")
    before = class_accuracies(classifier, test, forget_class)
    args = UnlearningConfig(
        output_dir=output_dir,
        strategy=strategy,
        strategy_kwargs={"max_epochs": 3} if strategy == "scrub" else {},
        retain_weight=5.0 if strategy == "salun" else 1.0,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = UnlearningTrainer(
        classifier, args, forget_dataset=forget, retain_dataset=retain, objective="classification"
    )
    trainer.train()
    trainer.save_model()
    processor.save_pretrained(output_dir)
    return {"before": before, "after": class_accuracies(classifier, test, forget_class)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="farleyknight-org-username/vit-base-mnist", help="Hub id or folder.")
    parser.add_argument("--dataset", default="ylecun/mnist", help="Hub id or folder with train and test splits.")
    parser.add_argument("--forget_class", type=int, default=3, help="The label id to unlearn.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--strategy", default="salun", choices=["salun", "scrub"])
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_train", type=int, default=2000, help="Training images used (forget + retain).")
    parser.add_argument("--max_test", type=int, default=1000, help="Test images to report accuracies on.")
    parser.add_argument("--learning_rate", type=float, default=5e-5, help="AdamW; tune it for your model.")
    parser.add_argument("--num_train_epochs", type=int, default=10, help="Passes over the forget images.")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args()
    result = unlearn_class(
        args.model,
        args.dataset,
        args.forget_class,
        args.output_dir,
        args.strategy,
        args.image_column,
        args.label_column,
        args.max_train,
        args.max_test,
        args.learning_rate,
        args.num_train_epochs,
        args.batch_size,
    )
    for when, acc in result.items():
        print(f"{when}: class {args.forget_class} {acc['forget_class']:.3f}, other classes {acc['other_classes']:.3f}")


if __name__ == "__main__":
    main()
