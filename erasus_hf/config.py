"""`UnlearningConfig`: the `TrainingArguments` of an unlearning run."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils.quantization_config import QuantizationConfigMixin

from .coresets.selectors import CORESET_BUDGETS, CORESET_SIDES, check_coreset_options, feature_kind, get_selector
from .data.formats import TextFormat
from .data.formatting import PROMPT_TEMPLATE
from .redaction import redact, redact_json, register_secret

RETAIN_LOSSES = ("nll", "kl", "none")
RETAIN_KL_POSITIONS = ("answer", "all")
REFERENCE_MODES = ("auto", "adapter", "copy", "cached", "none")
DIVERGENCE_FACTOR = 10.0  # see erasus_hf.divergence
DTYPES = ("auto", "bfloat16", "float16", "float32")  # model_init_kwargs["dtype"], as TRL's create_model_from_path


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def json_dict(value: dict[str, Any] | str | None, name: str) -> dict[str, Any]:
    """A dict-valued field given as a dict, a JSON object string (the command line) or None (empty)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} is not valid JSON: {value!r}") from err
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict or a JSON object, got {type(value)}")
    return value


@dataclass
class UnlearningConfig(TrainingArguments):
    """Training arguments plus the unlearning options.

    The defaults run on a CPU out of the box (no mixed precision is forced) and follow the published setting of each
    strategy; a strategy's own hyperparameters go in `strategy_kwargs` (for example `{"beta": 0.1}` for NPO).
    """

    strategy: str = field(default="npo", metadata={"help": "Unlearning strategy, by registry name (e.g. ga, npo)."})
    strategy_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Hyperparameters of the strategy, as a dict or a JSON string (e.g. '{\"beta\": 0.1}')."},
    )
    forget_weight: float = field(default=1.0, metadata={"help": "gamma: weight of the forget term."})
    retain_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the retain term."})
    retain_loss: str = field(
        default="nll",
        metadata={
            "help": "Retain term: 'nll' (likelihood of the retain answers), 'kl' (KL(pi_ref || pi_theta) on retain "
            "answer tokens) or 'none'.",
            "choices": list(RETAIN_LOSSES),
        },
    )
    retain_kl_positions: str = field(
        default="answer",
        metadata={
            "help": "Positions of the retain_loss='kl' term: 'answer' (KL per answer token, averaged per example, "
            "then over examples) or 'all' (TOFU's and open-unlearning's: every position of the padded retain batch, "
            "prompt and padding included, one mean over all of them).",
            "choices": list(RETAIN_KL_POSITIONS),
        },
    )
    reference: str = field(
        default="auto",
        metadata={
            "help": "Frozen reference model: 'adapter' (PEFT adapter off, no extra weights), 'copy' (frozen copy), "
            "'cached' (sequence log-probs of the forget set computed once before training), 'none', or 'auto' "
            "(cached when the strategy only needs forget log-probs, else adapter with PEFT, else copy).",
            "choices": list(REFERENCE_MODES),
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Wrap the model with a LoRA adapter and train only it."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules that get a LoRA adapter; default 'all-linear' (every linear layer but the head)."},
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained`, used when the trainer's `model` is "
            'a model id or path (as TRL\'s `model_init_kwargs`): e.g. \'{"dtype": "bfloat16", '
            '"attn_implementation": "sdpa", "trust_remote_code": true, "quantization_config": '
            '{"load_in_4bit": true}}\'. `trust_remote_code` and `revision` also apply to the tokenizer.'
        },
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "save_model writes the merged model instead of the adapter alone."}
    )
    max_length: int = field(
        default=512,
        metadata={"help": "Maximum tokens of an example (prompt + answer, truncated right; a text row's window)."},
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "The column of raw-text rows (language modelling on every token), as TRL's."}
    )
    dataset_columns: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Your columns for the fields of a format, as a dict or a JSON string: e.g. "
            '\'{"question": "query", "answer": "response"}\' (fields: question, answer, prompt, completion, messages).'
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A chat template for the tokenizer, as TRL's: a .jinja/.j2 file, or a tokenizer folder or Hub id "
            "whose template is copied (no token is added)."
        },
    )
    use_chat_template: bool | None = field(
        default=None,
        metadata={
            "help": "Render question/answer rows with the tokenizer's chat template (question as the user turn); "
            "default: when the tokenizer has one. False: `prompt_template`."
        },
    )
    prompt_template: str = field(
        default=PROMPT_TEMPLATE,
        metadata={"help": "The prompt of question/answer rows without a chat template; holds '{question}'."},
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "A system turn before the question of chat-rendered question/answer rows."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "prompt/completion rows: score only the completion (default, None = True, as TRL); False scores "
            "the prompt too."
        },
    )
    assistant_only_loss: bool = field(
        default=True,
        metadata={
            "help": "messages rows: score only the assistant turns (the chat template's generation blocks, as TRL's). "
            "Default True (TRL's is False): what is unlearned is what the model said. False scores every token."
        },
    )
    window_stride: int | None = field(
        default=None,
        metadata={
            "help": "Text rows: tokens between the starts of consecutive max_length windows; default the window's "
            "length (no overlap). Overlapped tokens are scored once."
        },
    )
    coreset: str | None = field(
        default=None,
        metadata={
            "help": "Train on a coreset of one side: a selector name (random, herding, k_center, kmeans, "
            "facility_location, loss, gradient_norm, forget_similar, upcore; erasus_hf.coresets). None: every row."
        },
    )
    coreset_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of the side's examples the coreset keeps, in (0, 1]."}
    )
    coreset_side: str = field(
        default="retain", metadata={"help": "Which side the coreset reduces: 'retain', 'forget' or 'both'."}
    )
    coreset_features: str = field(
        default="auto",
        metadata={
            "help": "What the geometric selectors read: 'auto' (the selector's own: hidden-state embeddings), "
            "'embeddings' or 'gradients' (per-example gradients on the trainable parameters, sketched)."
        },
    )
    coreset_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": 'The selector\'s options as a dict or JSON (e.g. \'{"score": "el2n"}\').'}
    )
    coreset_budget: str = field(
        default="steps",
        metadata={
            "help": "A forget coreset trains for 'steps': the optimizer steps of the full forget set (Pal et al. "
            "2025), or 'epochs': num_train_epochs over the coreset (fewer steps). A max_steps you set is kept."
        },
    )
    pairing_seed: int | None = field(
        default=None, metadata={"help": "Seed of the retain-partner draw (defaults to `seed`)."}
    )
    # transformers 5 removed TrainingArguments.overwrite_output_dir; this one is erasus_hf's own
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let this run replace another run saved in output_dir (its weights, configs, tokenizer files, "
            "card and eval.json go when this run's model is saved; subfolders stay). Without it, an output_dir that "
            "holds weights is refused when the trainer is built."
        },
    )
    divergence_factor: float | None = field(
        default=DIVERGENCE_FACTOR,
        metadata={
            "help": "Stop training with TrainingDivergedError (nothing saved) at the first step whose retain loss "
            "(without a retain term: the forget loss) passes this multiple of its starting value, the start counted "
            "as at least 1. None or 0 turns the check off."
        },
    )

    # Unlearning batches are nested ({"forget": ..., "retain": ...}); the Trainer must not drop their columns.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: unlearning batches are nested dicts."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.strategy_kwargs = json_dict(self.strategy_kwargs, "strategy_kwargs")
        self.dataset_columns = json_dict(self.dataset_columns, "dataset_columns")
        self.coreset_kwargs = json_dict(self.coreset_kwargs, "coreset_kwargs")
        self._check_coreset()
        self.text_format()  # the formatting options are checked now
        self._check_model_init_kwargs()
        if self.retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"retain_loss must be one of {RETAIN_LOSSES}, got {self.retain_loss!r}")
        if self.retain_kl_positions not in RETAIN_KL_POSITIONS:
            raise ValueError(
                f"retain_kl_positions must be one of {RETAIN_KL_POSITIONS}, got {self.retain_kl_positions!r}: "
                "'answer' averages the KL over answer tokens, 'all' over every position of the batch (TOFU's code)."
            )
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns must stay False: unlearning batches are nested dicts.")
        self._check_run_values()
        self._check_divergence_factor()
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per data loader
        if self.pairing_seed is None:
            self.pairing_seed = self.seed
        register_secret(self.hub_token)

    def text_format(self) -> TextFormat:
        """How this run's causal-LM rows become tokens (`erasus_hf.data.formats.TextFormat`)."""
        return TextFormat(
            columns=self.dataset_columns,
            text_field=self.dataset_text_field,
            prompt_template=self.prompt_template,
            use_chat_template=self.use_chat_template,
            system_prompt=self.system_prompt,
            completion_only_loss=self.completion_only_loss,
            assistant_only_loss=self.assistant_only_loss,
            window_stride=self.window_stride,
        )

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> UnlearningConfig:
        """A plain `TrainingArguments` as an `UnlearningConfig`: its values (tokens included: `to_dict` masks them),
        and the unlearning options at their defaults, as TRL's trainers convert one to their own config.
        `remove_unused_columns` is set False: unlearning batches are nested dicts."""
        values = args.to_dict()
        for name in values:
            if name.endswith("_token"):
                values[name] = getattr(args, name)
        values["remove_unused_columns"] = False
        return cls(**values)

    def _check_model_init_kwargs(self) -> None:
        """`model_init_kwargs` as a dict (a JSON string parsed; a quantization config object as its dict, so the
        run's config stays JSON), with a `dtype` that `from_pretrained` takes."""
        if self.model_init_kwargs is None:
            return
        kwargs = dict(json_dict(self.model_init_kwargs, "model_init_kwargs"))  # a copy: the caller's dict stays
        dtype = kwargs.get("dtype")
        if isinstance(dtype, torch.dtype):
            kwargs["dtype"] = str(dtype).removeprefix("torch.")
        elif dtype is not None and dtype not in DTYPES:
            raise ValueError(f"model_init_kwargs['dtype'] must be one of {DTYPES} (or a torch.dtype), got {dtype!r}.")
        quantization = kwargs.get("quantization_config")
        if quantization is not None and not isinstance(quantization, dict):
            if not isinstance(quantization, QuantizationConfigMixin):
                raise ValueError(
                    "model_init_kwargs['quantization_config'] must be a dict (e.g. {'load_in_4bit': True}) or a "
                    f"transformers quantization config, got {type(quantization).__name__}."
                )
            kwargs["quantization_config"] = quantization.to_dict()
        self.model_init_kwargs = kwargs

    def _check_coreset(self) -> None:
        """The coreset options, checked before any model or data is read (the selector is built: unknown names and
        options fail here)."""
        if self.coreset is None:
            return
        selector = get_selector(self.coreset, **self.coreset_kwargs)
        if not (_finite(self.coreset_fraction) and 0 < self.coreset_fraction <= 1):
            raise ValueError(
                f"coreset_fraction must be a number in (0, 1] (the fraction of rows kept), got "
                f"{self.coreset_fraction!r}."
            )
        if self.coreset_side not in CORESET_SIDES:
            raise ValueError(f"coreset_side must be one of {CORESET_SIDES}, got {self.coreset_side!r}")
        if self.coreset_budget not in CORESET_BUDGETS:
            raise ValueError(f"coreset_budget must be one of {CORESET_BUDGETS}, got {self.coreset_budget!r}")
        feature_kind(selector, self.coreset_features)
        check_coreset_options(selector, self.coreset_side, has_retain=True)

    def _check_divergence_factor(self) -> None:
        if self.divergence_factor == 0:
            self.divergence_factor = None
        if self.divergence_factor is not None and not (_finite(self.divergence_factor) and self.divergence_factor > 1):
            raise ValueError(
                f"divergence_factor must be a number > 1 (a multiple of the starting loss), or None/0 to turn the "
                f"divergence check off; got {self.divergence_factor!r}. The default is {DIVERGENCE_FACTOR}."
            )

    def _check_run_values(self) -> None:
        """Refuse values that give a run which silently does nothing or the wrong thing: a non-positive max_length
        (a negative one cut tokens off every row), negative or non-finite loss weights, a zero learning rate or no
        training steps (an unchanged model saved as if unlearned)."""
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length <= 0:
            raise ValueError(
                f"max_length must be a positive number of tokens (prompt + answer), got {self.max_length!r}; "
                "the default is 512."
            )
        for name in ("forget_weight", "retain_weight"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ValueError(
                    f"{name} must be a finite number >= 0 (the weight of its loss term), got {value!r}; default 1."
                )
        if not _finite(self.learning_rate) or self.learning_rate <= 0:
            raise ValueError(
                f"learning_rate must be a finite number > 0, got {self.learning_rate!r}: at 0 the model would not "
                "change and be saved as if unlearned. E.g. learning_rate=1e-5."
            )
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(
                f"max_steps must be > 0 (a number of optimizer steps) or -1 (train num_train_epochs), got "
                f"{self.max_steps!r}."
            )
        if self.max_steps < 0 and (not _finite(self.num_train_epochs) or self.num_train_epochs <= 0):
            raise ValueError(
                f"num_train_epochs must be a finite number > 0 (passes over the forget set), got "
                f"{self.num_train_epochs!r}: nothing would be trained. Or set max_steps > 0."
            )

    # transformers masks the `*_token` fields in `to_dict` (so `to_json_string`: unlearning_config.json, the
    # TensorBoard args) and in `str`; redaction also covers a token inside another field (`run_name`, ...), and the
    # `repr` the dataclass decorator would generate shows every field verbatim.
    def to_dict(self) -> dict[str, Any]:
        return redact_json(super().to_dict())

    def __str__(self) -> str:
        return redact(super().__str__())

    __repr__ = __str__


def as_unlearning_config(args: TrainingArguments | None) -> UnlearningConfig:
    """The trainer's `args`: an `UnlearningConfig` as it is, None as the default one, a plain `TrainingArguments`
    converted (`UnlearningConfig.from_training_arguments`) with a warning, as TRL's trainers take one."""
    if args is None:
        return UnlearningConfig(output_dir="erasus_hf_output")
    if isinstance(args, UnlearningConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be an UnlearningConfig, got {type(args).__name__}")
    config = UnlearningConfig.from_training_arguments(args)
    warnings.warn(
        f"args is a transformers.TrainingArguments; it was converted to an UnlearningConfig with its values and the "
        f"unlearning options at their defaults (strategy={config.strategy!r}, retain_loss={config.retain_loss!r}, "
        f"max_length={config.max_length}). Pass an UnlearningConfig to set them.",
        UserWarning,
        stacklevel=3,  # the user's UnlearningTrainer(...) call
    )
    return config
