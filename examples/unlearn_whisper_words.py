"""Make a Whisper speech recogniser forget how to transcribe some words, with an unlearning strategy.

    python examples/unlearn_whisper_words.py --model openai/whisper-tiny --dataset <audio dataset> \
        --forget_words three seven --strategy npo --output_dir whisper-forget-three-seven

What it does:

1. `WhisperForConditionalGeneration.from_pretrained(model)` and `WhisperProcessor.from_pretrained(model)` (a Hub id
   or a local folder).
2. Loads `--dataset`: a folder written by `Dataset.save_to_disk`, or a Hub dataset (`load_dataset(dataset, config,
   split=split)`). The audio column is a `datasets.Audio` feature (decoded and resampled to the feature extractor's
   rate by `datasets`; needs its audio extra) or raw float arrays already at that rate; the text column holds the
   transcripts.
3. Forget set: the rows whose transcript contains one of `--forget_words` (whole words, case-insensitive); retain
   set: the others (`--max_retain` keeps a seeded sample of them).
4. Each row becomes log-mel `input_features`, the decoder prompt (the tokenizer's prefix tokens:
   `<|startoftranscript|>`, language, task, `<|notimestamps|>`), left unscored, and the transcript tokens with
   `<|endoftext|>` as labels: the seq2seq objective scores exactly the transcript.
5. `UnlearningTrainer` runs the strategy (NPO by default, with a LoRA adapter merged back when training ends; `--lora_r
   0` trains the weights themselves), and saves the model and the processor (safetensors) to `--output_dir`.
6. For the forget and retain rows (and `--eval_dataset`'s, e.g. held-out speakers), before and after: the mean
   negative log-likelihood per transcript token (`*_nll_*`) and the token accuracy (`*_accuracy_*`, the share of
   transcript tokens that are the model's top prediction given the audio and the transcript so far). Printed and
   written to `output_dir/unlearning_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

import torch
from datasets import Dataset
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.data.speech import at_sampling_rate, load_rows, split_by_words, waveform
from erasus_hf.objectives import Seq2SeqObjective, SpeechSeq2SeqCollator


def featurize(
    dataset: Dataset,
    processor: WhisperProcessor,
    model: WhisperForConditionalGeneration,
    audio_column: str = "audio",
    text_column: str = "text",
) -> Dataset:
    """Rows -> `input_features`, `decoder_input_ids` (prompt + transcript) and `labels` (the same shifted left, the
    prompt set to -100), the layout `SpeechSeq2SeqCollator` pads."""
    extractor, tokenizer = processor.feature_extractor, processor.tokenizer
    prefix = tokenizer.prefix_tokens
    if prefix[0] != model.config.decoder_start_token_id:
        raise ValueError(
            f"The tokenizer's first prefix token {prefix[0]} is not the model's decoder_start_token_id "
            f"{model.config.decoder_start_token_id}: the processor does not belong to this model."
        )
    dataset = at_sampling_rate(dataset, audio_column, extractor.sampling_rate)

    def prepare(audio, text: str) -> dict:
        array = waveform(audio)
        features = extractor(array, sampling_rate=extractor.sampling_rate, return_tensors="np").input_features[0]
        ids = tokenizer(text).input_ids[: model.config.max_target_positions + 1]
        labels = [-100] * (len(prefix) - 1) + ids[len(prefix) :]
        return {"input_features": features, "decoder_input_ids": ids[:-1], "labels": labels}

    return dataset.map(prepare, input_columns=[audio_column, text_column], remove_columns=dataset.column_names)


@torch.no_grad()
def transcript_scores(
    model: torch.nn.Module, rows: Dataset, pad_token_id: int, batch_size: int = 16
) -> tuple[float, float]:
    """(mean negative log-likelihood per transcript token in nats, averaged over rows; the fraction of transcript
    tokens that are the model's top prediction given the audio and the transcript so far)."""
    objective, collator = Seq2SeqObjective(), SpeechSeq2SeqCollator(pad_token_id)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, hits, tokens = [], 0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        scores = objective.score(model, {k: v.to(device) for k, v in batch.items()})
        nll.append(scores.mean_nll.float().cpu())
        hits += (scores.logits.argmax(-1) == batch["labels"].to(device))[scores.mask].sum().item()
        tokens += scores.mask.sum().item()
    model.train(was_training)
    return torch.cat(nll).mean().item(), hits / tokens


def unlearn_words(
    model: WhisperForConditionalGeneration,
    processor: WhisperProcessor,
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
    `output_dir`, and return the transcript NLL of the forget and retain rows (and of `eval_dataset`, split the same
    way) before and after."""
    forget, retain = split_by_words(dataset, forget_words, text_column)
    if max_retain is not None and len(retain) > max_retain:
        retain = retain.shuffle(seed=seed).select(range(max_retain))
    sets = {"forget": forget, "retain": retain}
    if eval_dataset is not None:
        sets["eval_forget"], sets["eval_retain"] = split_by_words(eval_dataset, forget_words, text_column)
    sets = {name: featurize(rows, processor, model, audio_column, text_column) for name, rows in sets.items()}
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    metrics = {}
    for name, rows in sets.items():
        metrics[f"{name}_nll_before"], metrics[f"{name}_accuracy_before"] = transcript_scores(model, rows, pad)

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
        data_collator=SpeechSeq2SeqCollator(pad),
        objective=Seq2SeqObjective(),
    )
    trainer.train()
    trainer.save_model()
    for name, rows in sets.items():
        metrics[f"{name}_nll_after"], metrics[f"{name}_accuracy_after"] = transcript_scores(trainer.model, rows, pad)
    metrics.update({f"{name}_rows": len(rows) for name, rows in sets.items()})
    with open(os.path.join(output_dir, "unlearning_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="openai/whisper-tiny", help="A Whisper checkpoint: Hub id or local folder.")
    parser.add_argument("--dataset", required=True, help="An audio dataset: a save_to_disk folder or a Hub id.")
    parser.add_argument("--config", default=None, help="The Hub dataset's configuration (e.g. a language).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--audio_column", default="audio")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--forget_words", nargs="+", required=True, help="Forget the rows whose transcript has these.")
    parser.add_argument("--eval_dataset", default=None, help="Held-out rows measured before and after (same format).")
    parser.add_argument("--eval_split", default="test")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--strategy", default="npo", help="A likelihood strategy: npo, grad_diff, ga, simnpo, ...")
    parser.add_argument("--strategy_kwargs", default=None, help="JSON hyperparameters, e.g. '{\"beta\": 0.1}'.")
    parser.add_argument("--lora_r", type=int, default=8, help="LoRA rank (merged when done); 0 trains the weights.")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=float, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_retain", type=int, default=None, help="Use at most this many retain rows (seeded).")
    parser.add_argument("--language", default=None, help="Transcript language for a multilingual Whisper (english).")
    parser.add_argument("--task", default=None, help="transcribe | translate, for a multilingual Whisper.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    processor = WhisperProcessor.from_pretrained(args.model)
    if args.language or args.task:
        processor.tokenizer.set_prefix_tokens(language=args.language, task=args.task)
    model = WhisperForConditionalGeneration.from_pretrained(args.model)
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
