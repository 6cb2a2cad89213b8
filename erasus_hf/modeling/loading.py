"""The model a command starts from: a saved model or PEFT adapter loaded (`load_model`), or, when none is named, the
tiny Llama trained here on the rows to unlearn (`starting_model`). The demo, `erasus-hf unlearn`, `evaluate` and
`push --merge` all load through these two."""

from __future__ import annotations

import os
import tempfile

from datasets import Dataset, concatenate_datasets
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..model_source import check_model_source, load_causal_lm


def load_model(path: str, base_model: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a full-model folder (or Hub id) or a PEFT adapter folder (its base from `base_model`
    or the adapter config). A missing folder, a moved adapter base or a missing tokenizer is named before anything
    loads (`erasus_hf.model_source.check_model_source`)."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return load_causal_lm(path)
    check_model_source(path, base_model)  # also refuses an adapter config that names no base
    from peft import PeftConfig, PeftModel

    base = base_model or PeftConfig.from_pretrained(path).base_model_name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    has_tokenizer = os.path.isfile(os.path.join(path, "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base)


def starting_model(
    model_name_or_path: str | None,
    forget: Dataset,
    retain: Dataset,
    output_dir: str,
    seed: int = 0,
    quiet: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model that knows the forget and retain authors: loaded (`load_model`), or (no model given) a tiny Llama
    trained here on them with TRL's SFTTrainer and saved to `output_dir/starting_model`, the base the unlearning
    adapter applies to."""
    if model_name_or_path:
        return load_model(model_name_or_path)
    from .tiny import DEMO_MODEL, build_tiny_llama, sft_train, train_tokenizer

    everything = concatenate_datasets([forget, retain]).select_columns(["question", "answer"])
    texts = [t for col in ("question", "answer") for t in everything[col]]
    texts += [t for d in (forget, retain) if "paraphrased_answer" in d.column_names for t in d["paraphrased_answer"]]
    texts += [
        a
        for d in (forget, retain)
        if "perturbed_answer" in d.column_names
        for row in d["perturbed_answer"]
        for a in row
    ]
    tokenizer = train_tokenizer(texts, vocab_size=DEMO_MODEL.vocab_size)
    model = build_tiny_llama(tokenizer, seed=seed)
    print(
        f"Training a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter Llama on "
        f"{len(everything)} TOFU question/answer pairs (TRL SFTTrainer)..."
    )
    with tempfile.TemporaryDirectory() as workdir:
        model = sft_train(model, tokenizer, everything, output_dir=workdir, seed=seed, disable_tqdm=quiet)
    # The adapter needs its base: keep the model trained here beside it, and point the adapter config at it.
    starting_dir = os.path.abspath(os.path.join(output_dir, "starting_model"))
    model.save_pretrained(starting_dir)
    tokenizer.save_pretrained(starting_dir)
    model.config._name_or_path = starting_dir
    return model, tokenizer
