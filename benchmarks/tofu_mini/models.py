"""The data splits of a preset, and the finetuned and retain models trained from scratch on them (cached on disk)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer

from erasus_hf.data.tofu import QA_PER_AUTHOR, load_tofu
from erasus_hf.modeling import build_tiny_llama, sft_train, train_tokenizer

from .presets import Preset

FORGET10_FIRST_AUTHOR = 180  # forget10_perturbed holds authors 180-199, 20 rows each, in order

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "tofu"
"""`../shared/data/tofu` beside the clone; without it the splits come from the Hub (`locuslab/TOFU`)."""


def add_data_options(parser) -> None:
    """The options every TOFU-mini benchmark reads its data and cached models with: --data_dir, --cache_dir."""
    parser.add_argument(
        "--data_dir",
        default=str(DEFAULT_DATA_DIR) if DEFAULT_DATA_DIR.is_dir() else None,
        help="folder of TOFU split files (default: ../shared/data/tofu when present, else the Hub's locuslab/TOFU)",
    )
    parser.add_argument("--cache_dir", default="benchmarks/.cache", help="where the trained models are kept")


@dataclass
class Splits:
    train_retain: Dataset  # question/answer rows of the retain authors (both models train on them)
    forget: Dataset  # forgetXX_perturbed: question/answer/paraphrased_answer/perturbed_answer
    retain_eval: Dataset  # retain_perturbed rows, authors inside train_retain
    holdout: Dataset  # question/answer rows of authors neither model saw
    tuning_forget: Dataset | None = None  # the tuning authors' forget10_perturbed rows (None: the preset has none)

    @property
    def forget_groups(self) -> list[Dataset]:
        """The perturbed rows of every forget group the models may see: the reported one, and the tuning one."""
        return [self.forget] + ([self.tuning_forget] if self.tuning_forget is not None else [])


def _authors(full: Dataset, authors: range) -> Dataset:
    return full.select([a * QA_PER_AUTHOR + i for a in authors for i in range(QA_PER_AUTHOR)])


def load_splits(preset: Preset, data_dir: str | None) -> Splits:
    kwargs = {"data_dir": data_dir} if data_dir else {}
    full = load_tofu("full", **kwargs)
    forget = load_tofu(f"{preset.forget_split}_perturbed", **kwargs)
    forget_questions = set(forget["question"])
    train_retain = _authors(full, preset.retain_authors).select_columns(["question", "answer"])
    holdout = _authors(full, preset.holdout_authors).select_columns(["question", "answer"])
    overlap = forget_questions & (set(train_retain["question"]) | set(holdout["question"]))
    if overlap:
        raise ValueError(f"Preset {preset.name!r}: {len(overlap)} forget questions are also retain or holdout rows.")
    tuning_forget = None
    if preset.tuning_authors is not None:
        first = FORGET10_FIRST_AUTHOR
        if preset.tuning_authors.start < first or preset.tuning_authors.stop > first + 20:
            raise ValueError(f"Preset {preset.name!r}: tuning authors must lie in forget10 (authors 180-199).")
        tuning_forget = load_tofu("forget10_perturbed", **kwargs)
        rows = [(a - first) * QA_PER_AUTHOR + i for a in preset.tuning_authors for i in range(QA_PER_AUTHOR)]
        tuning_forget = tuning_forget.select(rows)
        if set(tuning_forget["question"]) & (forget_questions | set(train_retain["question"])):
            raise ValueError(f"Preset {preset.name!r}: the tuning authors overlap the forget or retain authors.")
    retain_eval = load_tofu("retain_perturbed", **kwargs)
    retain_eval = retain_eval.select(range(min(preset.retain_eval_rows, len(retain_eval))))
    missing = set(retain_eval["question"]) - set(train_retain["question"])
    if missing:
        raise ValueError(f"Preset {preset.name!r}: {len(missing)} retain evaluation rows are not retain authors.")
    return Splits(train_retain, forget, retain_eval, holdout, tuning_forget)


def tokenizer_texts(splits: Splits) -> list[str]:
    texts = list(splits.train_retain["question"]) + list(splits.train_retain["answer"])
    for rows in (*splits.forget_groups, splits.retain_eval):
        texts += list(rows["question"]) + list(rows["answer"]) + list(rows["paraphrased_answer"])
        texts += [a for perturbed in rows["perturbed_answer"] for a in perturbed]
    return texts + list(splits.holdout["question"]) + list(splits.holdout["answer"])


def _fingerprint(preset: Preset, splits: Splits) -> str:
    """What a cached model depends on: the model size, the training settings and the exact training text."""
    settings = [asdict(preset.model), preset.sft_epochs, preset.sft_learning_rate, preset.sft_batch_size]
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for rows in (splits.train_retain, *splits.forget_groups):
        for q, a in zip(rows["question"], rows["answer"], strict=True):
            h.update(f"{q}\0{a}\0".encode())
    return h.hexdigest()[:16]


def train_model(preset: Preset, tokenizer, rows: Dataset, seed: int, quiet: bool) -> tuple[torch.nn.Module, float]:
    """A Llama of the preset's size, initialised with `seed` and trained on `rows` (TRL SFTTrainer); with its
    training wall time in seconds."""
    settings = preset.model
    model = build_tiny_llama(
        tokenizer,
        hidden_size=settings.hidden_size,
        num_layers=settings.num_layers,
        num_heads=settings.num_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        seed=seed,
    )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model = sft_train(
            model,
            tokenizer,
            rows,
            output_dir=workdir,
            num_train_epochs=preset.sft_epochs,
            learning_rate=preset.sft_learning_rate,
            per_device_train_batch_size=preset.sft_batch_size,
            seed=seed,
            disable_tqdm=quiet,
        )
    return model, time.perf_counter() - start


def model_names(splits: Splits) -> tuple[str, ...]:
    return ("finetuned", "retain") + (("tuning",) if splits.tuning_forget is not None else ())


def trained_models(
    preset: Preset, splits: Splits, cache_dir: str, seed: int = 0, quiet: bool = False, retrain: bool = False
) -> dict:
    """The finetuned model (retain + forget authors), the retain model (retain authors only) and, with tuning authors,
    the tuning model (retain + tuning authors), trained the same way from the same initialisation, with the tokenizer.
    Loaded from `cache_dir/<preset>/` when a cached copy was trained from the same settings and text; `retrain=True`
    trains them again. Returns models, tokenizer, and `meta` with the training wall time of each."""
    root = Path(cache_dir) / preset.name
    key = f"{_fingerprint(preset, splits)}-seed{seed}"
    meta_path = root / "meta.json"
    if not retrain and meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        meta = json.loads(meta_path.read_text())
        tokenizer = AutoTokenizer.from_pretrained(root / "finetuned")
        models = {name: AutoModelForCausalLM.from_pretrained(root / name) for name in model_names(splits)}
        return {**models, "tokenizer": tokenizer, "meta": {**meta, "cached": True}}

    tokenizer = train_tokenizer(tokenizer_texts(splits), vocab_size=preset.model.vocab_size)
    rows = {
        "finetuned": concatenate_datasets([splits.train_retain, splits.forget.select_columns(["question", "answer"])]),
        "retain": splits.train_retain,
    }
    if splits.tuning_forget is not None:
        tuning = splits.tuning_forget.select_columns(["question", "answer"])
        rows["tuning"] = concatenate_datasets([splits.train_retain, tuning])
    models, meta = {}, {"key": key, "seed": seed, "transformers": transformers.__version__, "torch": torch.__version__}
    for name, data in rows.items():
        print(f"Training the {name} model from scratch on {len(data)} TOFU question/answer pairs (TRL SFTTrainer)...")
        models[name], seconds = train_model(preset, tokenizer, data, seed, quiet)
        meta[f"{name}_train_seconds"] = seconds
        meta[f"{name}_train_rows"] = len(data)
        os.makedirs(root / name, exist_ok=True)
        models[name].save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    meta["parameters"] = sum(p.numel() for p in models["finetuned"].parameters())
    meta_path.write_text(json.dumps(meta, indent=2))
    return {**models, "tokenizer": tokenizer, "meta": {**meta, "cached": False}}
