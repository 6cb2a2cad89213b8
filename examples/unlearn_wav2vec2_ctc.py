"""Make a CTC speech recogniser (Wav2Vec2ForCTC) forget how to transcribe some words, with an unlearning strategy.

    python examples/unlearn_wav2vec2_ctc.py --model facebook/wav2vec2-base-960h --dataset <audio dataset> \
        --forget_words three seven --strategy npo --output_dir wav2vec2-forget-three-seven

What it does:

1. `AutoModelForCTC.from_pretrained(model)` (Wav2Vec2ForCTC for the default; HubertForCTC, WavLMForCTC, ... for
   theirs) and `Wav2Vec2Processor.from_pretrained(model)`, from a Hub id or a local folder; the convolutional front
   end is frozen, as in CTC fine-tuning.
2. Loads `--dataset`: a folder written by `Dataset.save_to_disk`, or a Hub dataset (`load_dataset(dataset, config,
   split=split)`). The audio column is a `datasets.Audio` feature (decoded and resampled to the feature extractor's
   rate by `datasets`; needs its audio extra) or raw float arrays already at that rate; the text column holds the
   transcripts.
3. Forget set: the rows whose transcript contains one of `--forget_words` (whole words, case-insensitive); retain
   set: the others (`--max_retain` keeps a seeded sample of them).
4. Each row becomes the feature extractor's `input_values` and the transcript's character ids as `labels`. The
   transcript is put in the case of the vocabulary's letters (wav2vec2-base-960h's are upper case); characters
   outside the vocabulary become the unknown token, so strip punctuation the checkpoint was not trained on first.
5. `UnlearningTrainer` runs the strategy against the `ctc` objective (log p(transcript | audio) = -CTC loss; NPO by
   default, with a LoRA adapter merged back when training ends; `--lora_r 0` trains the weights themselves), and
   saves the model and the processor (safetensors) to `--output_dir`. CTC gives no per-character likelihood, so
   strategies that read per-token log-probabilities or logits (wga, undial, scrub, retain_loss='kl', ...) are
   refused with the list of the usable ones.
6. For the forget and retain rows (and `--eval_dataset`'s, e.g. held-out speakers), before and after: the CTC loss
   per transcript character (`*_ctc_loss_*`, nats) and the word error rate of greedy CTC decoding (`*_wer_*`).
   Printed and written to `output_dir/unlearning_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import AutoModelForCTC, PreTrainedModel, Wav2Vec2CTCTokenizer, Wav2Vec2Processor

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.data.speech import at_sampling_rate, load_rows, split_by_words, waveform
from erasus_hf.objectives import AudioCollator, CTCObjective, unwrap_model


def in_vocabulary_case(text: str, tokenizer: Wav2Vec2CTCTokenizer) -> str:
    """`text` upper-cased if the vocabulary's letters are all upper case, lower-cased if all lower case, else as is."""
    letters = [t for t in tokenizer.get_vocab() if len(t) == 1 and t.isalpha()]
    if letters and all(c.isupper() for c in letters):
        return text.upper()
    if letters and all(c.islower() for c in letters):
        return text.lower()
    return text


def featurize(
    dataset: Dataset, processor: Wav2Vec2Processor, audio_column: str = "audio", text_column: str = "text"
) -> Dataset:
    """Rows -> `input_values` (the feature extractor's waveform) and `labels` (the transcript's character ids), the
    layout `AudioCollator` pads."""
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    dataset = at_sampling_rate(dataset, audio_column, extractor.sampling_rate)

    def prepare(audio, text: str) -> dict:
        values = extractor(waveform(audio), sampling_rate=extractor.sampling_rate).input_values[0]
        return {"input_values": values, "labels": tokenizer(in_vocabulary_case(text, tokenizer)).input_ids}

    return dataset.map(prepare, input_columns=[audio_column, text_column], remove_columns=dataset.column_names)


def word_errors(reference: Sequence[str], hypothesis: Sequence[str]) -> int:
    """The word-level Levenshtein distance (substitutions + deletions + insertions)."""
    row = list(range(len(hypothesis) + 1))
    for i, ref in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp in enumerate(hypothesis, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ref != hyp))
    return row[-1]


@torch.no_grad()
def transcript_scores(
    model: torch.nn.Module, rows: Dataset, tokenizer: Wav2Vec2CTCTokenizer, batch_size: int = 16
) -> tuple[float, float]:
    """(CTC loss per transcript character in nats, averaged over rows; the word error rate of greedy CTC decoding
    over all rows, against the transcripts the labels encode)."""
    objective, collator = CTCObjective(), AudioCollator()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, errors, words = [], 0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        losses.append(objective.score(model, batch).mean_nll.float().cpu())
        logits = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"]).logits
        frames = unwrap_model(model)._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1)).tolist()
        predicted = tokenizer.batch_decode([ids[:n] for ids, n in zip(logits.argmax(-1).tolist(), frames)])
        labels = batch["labels"].masked_fill(batch["labels"] == -100, tokenizer.pad_token_id).tolist()
        for reference, hypothesis in zip(tokenizer.batch_decode(labels, group_tokens=False), predicted):
            errors += word_errors(reference.split(), hypothesis.split())
            words += len(reference.split())
    model.train(was_training)
    return torch.cat(losses).mean().item(), errors / max(words, 1)


def unlearn_words(
    model: PreTrainedModel,
    processor: Wav2Vec2Processor,
    dataset: Dataset,
    forget_words: Sequence[str],
    output_dir: str,
    strategy: str = "npo",
    strategy_kwargs: dict | None = None,
    lora_r: int = 8,
    learning_rate: float = 1e-4,
    num_train_epochs: float = 5,
    batch_size: int = 8,
    max_retain: int | None = None,
    eval_dataset: Dataset | None = None,
    audio_column: str = "audio",
    text_column: str = "text",
    seed: int = 0,
) -> dict[str, float]:
    """Unlearn the rows of `dataset` whose transcript contains `forget_words`, save the model and the processor to
    `output_dir`, and return the CTC loss and WER of the forget and retain rows (and of `eval_dataset`, split the
    same way) before and after."""
    forget, retain = split_by_words(dataset, forget_words, text_column)
    if max_retain is not None and len(retain) > max_retain:
        retain = retain.shuffle(seed=seed).select(range(max_retain))
    sets = {"forget": forget, "retain": retain}
    if eval_dataset is not None:
        sets["eval_forget"], sets["eval_retain"] = split_by_words(eval_dataset, forget_words, text_column)
    sets = {name: featurize(rows, processor, audio_column, text_column) for name, rows in sets.items()}
    metrics = {}
    for name, rows in sets.items():
        metrics[f"{name}_ctc_loss_before"], metrics[f"{name}_wer_before"] = transcript_scores(
            model, rows, processor.tokenizer
        )

    model.freeze_feature_encoder()
    args = UnlearningConfig(
        output_dir=output_dir,
        strategy=strategy,
        strategy_kwargs=strategy_kwargs,
        use_peft=lora_r > 0,
        lora_r=max(lora_r, 1),
        lora_alpha=2 * max(lora_r, 1),
        merge_adapter=True,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        per_device_train_batch_size=batch_size,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=sets["forget"],
        retain_dataset=sets["retain"],
        processing_class=processor,
        data_collator=AudioCollator(),
        objective=CTCObjective(),
    )
    trainer.train()
    trainer.save_model()
    for name, rows in sets.items():
        metrics[f"{name}_ctc_loss_after"], metrics[f"{name}_wer_after"] = transcript_scores(
            trainer.model, rows, processor.tokenizer
        )
    metrics.update({f"{name}_rows": len(rows) for name, rows in sets.items()})
    with open(os.path.join(output_dir, "unlearning_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="facebook/wav2vec2-base-960h", help="A *ForCTC checkpoint: Hub id or local folder."
    )
    parser.add_argument("--dataset", required=True, help="An audio dataset: a save_to_disk folder or a Hub id.")
    parser.add_argument("--config", default=None, help="The Hub dataset's configuration (e.g. 'clean').")
    parser.add_argument("--split", default="train")
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--forget_words", nargs="+", required=True, help="Forget the rows whose transcript has these.")
    parser.add_argument("--eval_dataset", default=None, help="Held-out rows measured before and after (same format).")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--strategy", default="npo", help="A sequence-likelihood strategy: npo, grad_diff, ga, ...")
    parser.add_argument("--strategy_kwargs", default=None, help="JSON hyperparameters, e.g. '{\"beta\": 0.1}'.")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank (merged when done); 0 trains the weights.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=float, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_retain", type=int, default=None, help="Use at most this many retain rows (seeded).")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    processor = Wav2Vec2Processor.from_pretrained(args.model)
    model = AutoModelForCTC.from_pretrained(args.model)
    dataset = load_rows(args.dataset, args.config, args.split)
    eval_dataset = load_rows(args.eval_dataset, args.config, args.eval_split) if args.eval_dataset else None
    metrics = unlearn_words(
        model,
        processor,
        dataset,
        args.forget_words,
        args.output_dir,
        strategy=args.strategy,
        strategy_kwargs=json.loads(args.strategy_kwargs) if args.strategy_kwargs else None,
        lora_r=args.lora_r,
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        batch_size=args.batch_size,
        max_retain=args.max_retain,
        eval_dataset=eval_dataset,
        audio_column=args.audio_column,
        text_column=args.text_column,
        seed=args.seed,
    )
    for key, value in metrics.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return metrics


if __name__ == "__main__":
    main()
