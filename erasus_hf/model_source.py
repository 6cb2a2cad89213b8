"""Model folders checked before anything loads: a missing local path, a folder that is not a model, an adapter whose
base moved, or no tokenizer is named with its fix instead of surfacing as a Hub-id or sentencepiece error; and a
model id loaded with the run's `model_init_kwargs`, as TRL's trainers load one."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.quantizers import AutoQuantizationConfig

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
)
HUB_ID = re.compile(r"[\w.\-]+(/[\w.\-]+)?")


def looks_local(name_or_path: str) -> bool:
    """Whether a model argument that is not an existing folder was meant as a local path, not a Hub id
    (`namespace/name`): absolute, `./` or `~`, more than one `/`, characters no Hub id has, or a first part that is
    a local folder."""
    first = name_or_path.split("/")[0]
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or not HUB_ID.fullmatch(name_or_path)
        or ("/" in name_or_path and os.path.isdir(first))
    )


def check_model_source(name_or_path: str, base_model: str | None = None, needs_tokenizer: bool = True) -> str:
    """Refuse, before any loading, a model argument that cannot load: a local path that does not exist, a folder with
    neither `config.json` nor `adapter_config.json`, an adapter whose base folder moved, a folder (or, for an
    adapter, its base folder) without tokenizer files when a tokenizer is to be loaded from it. Hub ids pass.
    Return where the tokenizer loads from (an adapter folder without one: its base)."""
    if not os.path.isdir(name_or_path):
        if os.path.exists(name_or_path):
            raise ValueError(f"The model {name_or_path!r} is a file; pass the folder that holds its config.json.")
        if looks_local(name_or_path):
            raise FileNotFoundError(
                f"No model folder at {name_or_path!r} ({os.path.abspath(os.path.expanduser(name_or_path))} does not "
                "exist), and it is not a Hub id (namespace/name). Check the path: a model saved with save_pretrained."
            )
        return name_or_path
    names = set(os.listdir(name_or_path))
    tokenizer_folders = [name_or_path]
    if "adapter_config.json" in names:
        with open(os.path.join(name_or_path, "adapter_config.json")) as f:
            base = base_model or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(
                f"{name_or_path} holds an adapter whose config names no base model; pass base_model= "
                "(--base_model on the command line)."
            )
        if not os.path.isdir(base) and looks_local(base):
            raise FileNotFoundError(
                f"The adapter in {name_or_path!r} applies to the base model {base!r}, which is not there (moved or "
                f"deleted?). Point base_model_name_or_path in {os.path.join(name_or_path, 'adapter_config.json')} "
                "at its new place, or pass that as base_model (erasus-hf evaluate / push: --base_model)."
            )
        check_model_source(base, needs_tokenizer=False)
        tokenizer_folders.append(base)
    elif "config.json" not in names:
        raise ValueError(
            f"The folder {name_or_path!r} holds neither config.json (a model saved with save_pretrained) nor "
            f"adapter_config.json (a PEFT adapter); it has {sorted(names)[:10]}."
        )
    for folder in tokenizer_folders:
        if not os.path.isdir(folder) or any(name in TOKENIZER_FILES for name in os.listdir(folder)):
            return folder  # a Hub base: its tokenizer is the Hub's to find
    if needs_tokenizer:
        raise ValueError(
            f"No tokenizer in {' or '.join(repr(d) for d in tokenizer_folders)} (none of "
            f"{', '.join(TOKENIZER_FILES[:3])}, ...). Save it beside the model, tokenizer.save_pretrained(folder), or "
            "pass the tokenizer (processing_class=tokenizer)."
        )
    return name_or_path


def from_pretrained_kwargs(model_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """`UnlearningConfig.model_init_kwargs` as `from_pretrained` takes them: a `dtype` name ("bfloat16", ...) as the
    `torch.dtype` ("auto" as it is), a `quantization_config` dict as its transformers config (refused, naming the
    methods, when it says none)."""
    kwargs = dict(model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    quantization = kwargs.get("quantization_config")
    if isinstance(quantization, dict):
        try:
            kwargs["quantization_config"] = AutoQuantizationConfig.from_dict(quantization)
        except ValueError as err:
            raise ValueError(
                f"model_init_kwargs['quantization_config'] = {quantization!r} names no quantization method: give "
                "'quant_method' (e.g. 'bitsandbytes_4bit', 'torchao', 'quanto') or bitsandbytes' 'load_in_4bit': "
                f"True / 'load_in_8bit': True. ({err})"
            ) from err
    return kwargs


def refuse_init_kwargs_for_instance(model: object, model_init_kwargs: dict[str, Any] | None) -> None:
    """`model_init_kwargs` only apply to a model that the trainer loads: with a model object they would be silently
    ignored (its dtype, attention and quantization are already set), so they are refused."""
    if model_init_kwargs:
        raise ValueError(
            f"args.model_init_kwargs ({sorted(model_init_kwargs)}) apply when the model is given as a model id or "
            f"path, but it is an instantiated {type(model).__name__}: pass its id/path to load it with them, or load "
            "it yourself with those arguments (from_pretrained(..., dtype=...)) and unset model_init_kwargs."
        )


def load_tokenizer(name_or_path: str, model_init_kwargs: dict[str, Any] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at `name_or_path` (checked first, `check_model_source`: an adapter folder without
    one gives its base's), with the `trust_remote_code` and `revision` of `model_init_kwargs`, as TRL loads it. Loading
    it alone lets a command check the rows against it before the weights load. A folder of tokenizer files alone
    (no model) loads as it is."""
    has_tokenizer = os.path.isdir(name_or_path) and any(n in TOKENIZER_FILES for n in os.listdir(name_or_path))
    source = name_or_path if has_tokenizer else check_model_source(name_or_path)
    kwargs = model_init_kwargs or {}
    shared = {key: kwargs[key] for key in ("trust_remote_code", "revision") if key in kwargs}
    return AutoTokenizer.from_pretrained(source, **shared)


def load_causal_lm(
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase | None = None,
    model_init_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a folder or Hub id, checked first (`check_model_source`), the model loaded with
    `model_init_kwargs` (`from_pretrained_kwargs`); the tokenizer from the same place unless one is given, with the
    same `trust_remote_code` and `revision`, as TRL loads it."""
    kwargs = from_pretrained_kwargs(model_init_kwargs)
    check_model_source(name_or_path, needs_tokenizer=tokenizer is None)
    if tokenizer is None:
        tokenizer = load_tokenizer(name_or_path, model_init_kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs), tokenizer
