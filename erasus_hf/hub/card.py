"""The model card of an unlearned model: Hub metadata (base model, library, tags, `model-index` with every evaluation
number) and a body with the strategy, its hyperparameters, the forget set as a count and a fingerprint (never its
text), the evaluation table, the command that reproduces the run and the limits of approximate unlearning.

Order with PEFT: `PeftModel.save_pretrained` calls `create_or_update_model_card`, which loads an existing README.md
and *replaces* its `tags` with PEFT's own (`card.data["tags"] = sorted(tags)`, peft 0.21.2 `peft_model.py` line
1724) and its `base_model` with the model config's `_name_or_path`. So `write_model_card` must be the last step:
called after `save_pretrained`, it keeps PEFT's metadata (library_name, pipeline_tag, its tags) and puts ours on
top; a later `save_pretrained` into the same folder drops our tags again (the body and `model-index` survive).
PEFT does union the base model's `model_tags` into its tags, so `model.get_base_model().add_model_tags(tags)` before
saving keeps ours through a later save as well.

What the metadata may say (TRL's rules, `trl.trainer.base_trainer.BaseTrainer.create_model_card`): `base_model` only
when the starting model is a Hub id (`hub_model_id`), never a local path, which would link to
`https://huggingface.co//home/...`; the tags are erasus-hf's, the strategy's and the caller's, plus PEFT's own
(`lora`, `transformers`, `base_model:adapter:<base>` for an adapter of that Hub base), never the starting model's
training tags (`trl`, `sft`) that PEFT copies from `model_tags` into the README it writes.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence, Sized
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..data.fingerprint import forget_fingerprint
from ..evaluation.result import EvaluationResult
from ..redaction import redact

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "unlearning_card.md"

# Hub datasets of the benchmarks whose metric names start with these prefixes.
BENCHMARK_DATASETS = {"tofu": "locuslab/TOFU", "muse": "muse-bench/MUSE-News"}

# The `UnlearningConfig` fields a card reports (LoRA fields only when a LoRA adapter was trained).
TRAINING_ARG_NAMES = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "retain_loss",
    "forget_weight",
    "retain_weight",
    "reference",
    "use_peft",
    "merge_adapter",
    "max_length",
    "seed",
    "pairing_seed",
)
LORA_ARG_NAMES = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")

BASE_TAGS = ("erasus-hf", "unlearning")


def training_arguments(args: Any) -> dict[str, Any]:
    """The training arguments a card reports, read from an `UnlearningConfig` (or any object with those fields)."""
    names = TRAINING_ARG_NAMES + (LORA_ARG_NAMES if getattr(args, "use_peft", False) else ())
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    if values.get("max_steps", 0) <= 0:  # -1: the run was sized by num_train_epochs
        values.pop("max_steps", None)
    if values.get("lora_target_modules", "") is None:
        values["lora_target_modules"] = "all-linear"  # UnlearningConfig's default
    return values


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """`name_or_path` (a model config's `_name_or_path`) when it is a Hub repo id, else None: an empty name, a local
    or absolute path (`./x`, `~/x`, `/home/...`), anything that exists on disk (TRL's rule: a folder is not a Hub id)
    and a name the Hub would refuse (`validate_repo_id`) are not."""
    name = os.fspath(name_or_path) if name_or_path is not None else ""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def build_model_card(
    *,
    strategy_name: str,
    paper: str,
    hyperparameters: dict[str, Any],
    training_args: dict[str, Any],
    forget_rows: Iterable[Mapping[str, Any]],
    retain_count: int | None,
    base_model: str | None,
    is_adapter: bool,
    evaluation: EvaluationResult | None,
    reference_note: str | None,
    command: str | None,
    datasets: list[str] | None,
    model_name: str | None,
    certification: str | None = None,
    tags: Sequence[str] = (),
    forget_rows_fingerprint: str | None = None,
    text_format: Mapping[str, Any] | None = None,
    guarantees: Sequence[str] = (),
    coreset: str | None = None,
) -> ModelCard:
    """The README.md of an unlearned model, rendered from `erasus_hf/model_cards/unlearning_card.md`.

    `hyperparameters`: the strategy's (e.g. `strategy.hyperparameters`); `training_args`: e.g.
    `training_arguments(config)`; `forget_rows`: the forget set as trained on (only its count and fingerprint are
    written); `evaluation`: one `EvalResult` per summary number goes into `model-index`; `reference_note`: what
    the evaluation was compared against (defaults to the result's `meta["reference"]`); `certification`: a formal
    guarantee, if one exists, quoted in the Limitations section; `tags`: the caller's, after erasus-hf's and the
    strategy's. `forget_rows_fingerprint`: `forget_fingerprint(forget_rows)` when the caller has it already (a
    trainer writes a card at every save of one run). `base_model`: the starting model's name or path; only a Hub id
    (`hub_model_id`) becomes the metadata's `base_model` and a link, a local model is named by its folder's name,
    without a link. `text_format`: how the rows were rendered (the trainer's `text_format_record`:
    `TextFormat.describe` with the row formats under ``rows``, ``max_length``, ``window_stride``), one line of the
    card (`format_line`). `guarantees`: markdown blocks, each under the card's "Guarantees and verification"
    heading: a removal certificate (`erasus_hf.certified.RemovalCertificate.to_markdown()`), the starting model's
    differential privacy (`erasus_hf.privacy.DPReport.card_section(...)`), a verifier's result. `coreset`: what a
    coreset kept (`erasus_hf.coresets.CoresetReport.card_line`), a line of the forget-set section.

    No secret reaches the card: the whole rendered text goes through `erasus_hf.redaction.redact` (a `--hub_token`
    or `HF_TOKEN=` in `command`, a token-shaped string in any field).
    """
    rows = forget_rows if isinstance(forget_rows, Sized) else list(forget_rows)
    fingerprint = forget_rows_fingerprint or forget_fingerprint(rows)
    hub_base = hub_model_id(base_model)
    local_base = os.path.basename(os.path.normpath(base_model)) if base_model and not hub_base else None
    title = model_name or _default_model_name(strategy_name, hub_base or local_base)
    eval_results = _eval_results(evaluation, datasets) if evaluation is not None else None
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft" if is_adapter else "transformers",
        tags=list(dict.fromkeys([*BASE_TAGS, strategy_name, *tags])),
        datasets=datasets or None,
        model_name=title if eval_results else None,
        eval_results=eval_results,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        title=title,
        strategy_name=strategy_name,
        paper=paper,
        hyperparameters=_table_rows(hyperparameters),
        training_args=_table_rows(training_args),
        forget_count=len(rows),
        forget_fingerprint=fingerprint,
        retain_count=retain_count,
        row_formats=format_line(text_format) if text_format else None,
        coreset=coreset,
        datasets=datasets or [],
        base_model=hub_base,
        local_base=local_base,
        is_adapter=is_adapter,
        metrics=_metric_rows(evaluation),
        reference_note=_reference_note(evaluation, reference_note),
        missing=_missing_notes(evaluation),
        command=command,
        certification=certification,
        guarantees=[block.strip() for block in guarantees if block and block.strip()],
        framework_versions=_framework_versions(),
    )
    return ModelCard(redact(card.content))


def format_line(record: Mapping[str, Any]) -> str | None:
    """The card's line on how the rows were rendered, from a `text_format_record` (`TextFormat.describe` + the window
    settings), e.g. ``forget `text` (windows of 512 tokens), retain `qa` through the chat template (sha256 `...`)``;
    None when the record names no row format."""
    rows = record.get("rows") or {}
    return ", ".join(f"{side} {_row_format_note(row_format, record)}" for side, row_format in rows.items()) or None


def _row_format_note(row_format: str, record: Mapping[str, Any]) -> str:
    digest = record.get("chat_template_sha256")
    chat = "through the chat template" + (f" (sha256 `{digest}`)" if digest else "")
    if record.get("system_prompt"):
        chat += " with a system prompt"
    if row_format == "text":
        length, stride = record.get("max_length"), record.get("window_stride")
        windows = f"windows of {length} tokens" if length else "windows"
        if stride and length and stride < length:
            windows += f", {stride} apart"
        return f"`text` ({windows})"
    if row_format == "qa":
        if record.get("qa") == "chat template":
            return f"`qa` {chat}"
        template = str(record.get("prompt_template") or "").replace("\n", "\\n")
        return f"`qa` through the prompt template `{template}`"
    if row_format in ("messages", "conversational"):
        return f"`{row_format}` {chat}"
    if row_format == "prompt_completion":
        return "`prompt_completion` (the text as written)"
    return f"`{row_format}` (token ids as given)"


GUARANTEES_HEADING = "## Guarantees and verification"


def add_card_section(folder: str | Path, block: str, key: str) -> Path | None:
    """Put the markdown `block` under the "Guarantees and verification" heading of the erasus-hf card in `folder`
    (README.md), replacing an earlier block of the same `key` (e.g. ``"verify"``: a new verification of the same
    model replaces the last one), and return the card's path; None when `folder` holds no erasus-hf card (nothing is
    written). The heading is added before "Limitations" when the card has none; the file is replaced in one rename.
    """
    path = Path(folder) / "README.md"
    if not path.is_file():
        return None
    card = ModelCard.load(path)
    if "## Limitations" not in card.text:
        return None
    begin, end = f"<!-- erasus-hf {key} -->", f"<!-- /erasus-hf {key} -->"
    text = card.content
    if begin in text and end in text:  # the earlier block of this key goes
        head, rest = text.split(begin, 1)
        text = head.rstrip("\n") + "\n\n" + rest.split(end, 1)[1].lstrip("\n")
    marked = f"{begin}\n{block.strip()}\n{end}\n\n"
    if GUARANTEES_HEADING in text:
        head, rest = text.split(GUARANTEES_HEADING, 1)
        text = f"{head}{GUARANTEES_HEADING}\n\n{marked}{rest.lstrip(chr(10))}"
    else:
        head, rest = text.split("## Limitations", 1)
        text = f"{head}{GUARANTEES_HEADING}\n\n{marked}## Limitations{rest}"
    handle, partial = tempfile.mkstemp(prefix=".README.md.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        ModelCard(redact(text)).save(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def write_model_card(card: ModelCard, output_dir: str | Path, foreign_tags: Iterable[str] = ()) -> Path:
    """Write `card` as `output_dir/README.md` and return its path.

    Call it after `save_pretrained`: an existing README.md's metadata (PEFT's `library_name`, `pipeline_tag`,
    tags, ...) is merged in: our values win where both are set, the tags are the union (ours first) less
    `foreign_tags` (the starting model's `model_tags` that PEFT copied in, e.g. TRL's `sft`, `trl`), a
    `base_model:` tag that does not name our adapter's Hub base, and a `base_model` that is not a Hub id. Its body is
    replaced by ours. `card` itself is not modified. What is written is redacted (`erasus_hf.redaction.redact`), the
    merged-in metadata included, and replaces README.md in one rename: the old card or the new one, never half.
    """
    path = Path(output_dir) / "README.md"
    merged = ModelCard(card.content)
    if path.exists():
        _merge_metadata(merged.data, ModelCard.load(path).data, set(foreign_tags))
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=".README.md.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        ModelCard(redact(merged.content)).save(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _merge_metadata(ours: ModelCardData, theirs: ModelCardData, foreign_tags: set[str]) -> None:
    for key, value in theirs.to_dict().items():
        if key == "tags" or value in (None, "", []):
            continue
        if key == "model-index":
            if ours.eval_results is None:
                ours.eval_results, ours.model_name = theirs.eval_results, theirs.model_name
        elif key == "base_model":  # PEFT writes the config's _name_or_path, a local path as well
            if ours.base_model in (None, "") and isinstance(value, str) and hub_model_id(value):
                ours.base_model = value
        elif ours.get(key) in (None, "", []):
            ours[key] = value
    # PEFT tags the adapter `base_model:adapter:<config _name_or_path>`: right only for an adapter of our Hub base
    adapter_tag = f"base_model:adapter:{ours.base_model}" if ours.base_model and ours.library_name == "peft" else None
    their_tags = [
        t for t in theirs.tags or [] if t not in foreign_tags and (not t.startswith("base_model:") or t == adapter_tag)
    ]
    ours.tags = list(dict.fromkeys([*(ours.tags or []), *their_tags]))


def _eval_results(evaluation: EvaluationResult, datasets: list[str] | None) -> list[EvalResult]:
    if not evaluation.summary:
        raise ValueError("The evaluation has an empty summary: there is no number to report on the card.")
    results = []
    for key, value in evaluation.summary.items():
        dataset = _benchmark_dataset(key, evaluation.meta) or (datasets[0] if datasets else "custom")
        results.append(
            EvalResult(
                task_type="text-generation",
                dataset_type=dataset,
                dataset_name=dataset,
                metric_type=key,
                metric_name=key,
                metric_value=float(value),
            )
        )
    return results


def _benchmark_dataset(metric: str, meta: Mapping[str, Any]) -> str | None:
    """The Hub dataset of a benchmark metric (`tofu/...`, `muse/...`), None for the others (MIA, combined, ...)."""
    prefix = metric.split("/", 1)[0] if "/" in metric else None
    if prefix == "muse" and meta.get("muse/corpus") == "books":
        return "muse-bench/MUSE-Books"
    return BENCHMARK_DATASETS.get(prefix)


def _reference_note(evaluation: EvaluationResult | None, note: str | None) -> str:
    if note:
        return note
    reference = evaluation.meta.get("reference") if evaluation is not None else None
    if reference:
        return f"the reference evaluation `{reference}`."
    return "no reference evaluation: the numbers are absolute (forget quality and PrivLeak need one)."


def _missing_notes(evaluation: EvaluationResult | None) -> list[str]:
    """The evaluators' notes on metrics they could not compute (meta keys ending in `_missing`)."""
    if evaluation is None:
        return []
    return [f"`{key}`: {value}" for key, value in sorted(evaluation.meta.items()) if key.endswith("_missing")]


def _table_rows(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(name, value) pairs, in the given order, with values as JSON-ish text safe inside a markdown table cell."""
    return [(name, _cell(value)) for name, value in values.items()]


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _metric_rows(evaluation: EvaluationResult | None) -> list[tuple[str, str]]:
    """(metric, value) rows of the evaluation table; a value with a confidence interval (`evaluation.intervals`)
    reads ``0.62 (95% CI 0.51 to 0.73)``."""
    if evaluation is None:
        return []
    rows = []
    for key, value in evaluation.summary.items():
        text = _format_number(value)
        interval = evaluation.intervals.get(key)
        if interval is not None:
            low, high = _format_number(interval["low"]), _format_number(interval["high"])
            text += f" ({float(interval.get('level', 0.95)):.0%} CI {low} to {high})"
        rows.append((key, text))
    return rows


def _format_number(value: float) -> str:
    value = float(value)
    return str(value) if not math.isfinite(value) else f"{value:.6g}"


def _default_model_name(strategy_name: str, base_model: str | None) -> str:
    base = base_model.rstrip("/").split("/")[-1] if base_model else "model"
    return f"{base}-unlearned-{strategy_name}"


def _framework_versions() -> list[str]:
    """Versions of the libraries of the run. The PEFT line has PEFT's own format (`- PEFT x.y.z`) so that a later
    `save_pretrained` finds it and leaves the body alone."""
    import peft

    names = {"erasus_hf": "erasus-hf", "transformers": "Transformers", "torch": "PyTorch", "datasets": "Datasets"}
    lines = [f"{label} {metadata.version(dist)}" for dist, label in names.items()]
    return [*lines, f"PEFT {peft.__version__}", f"huggingface_hub {metadata.version('huggingface_hub')}"]
