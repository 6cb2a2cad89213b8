"""The models a run starts from: loaded from a folder or the Hub (`loading`), or small ones built from configs for
tests and the offline demo (`tiny`; no weights are downloaded)."""

from erasus_hf.modeling.loading import load_model, starting_model
from erasus_hf.modeling.tiny import (
    DEMO_MODEL,
    DEMO_SFT,
    SFTSettings,
    TinyModelSettings,
    build_tiny_llama,
    count_parameters,
    prompt_completion_dataset,
    sft_train,
    train_tokenizer,
)

__all__ = [
    "DEMO_MODEL",
    "DEMO_SFT",
    "SFTSettings",
    "TinyModelSettings",
    "build_tiny_llama",
    "count_parameters",
    "load_model",
    "prompt_completion_dataset",
    "sft_train",
    "starting_model",
    "train_tokenizer",
]
