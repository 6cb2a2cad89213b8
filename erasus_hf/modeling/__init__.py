"""Small models built from configs, for tests and the offline demo (no weights are downloaded)."""

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
    "prompt_completion_dataset",
    "sft_train",
    "train_tokenizer",
]
