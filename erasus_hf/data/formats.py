"""The row formats a causal LM is unlearned on, detected as TRL detects them, and how each becomes tokens.

| format | columns | scored tokens |
| --- | --- | --- |
| ``qa`` | ``question``, ``answer`` (TOFU, MUSE's KnowMem) | the answer and the closing EOS |
| ``prompt_completion`` | ``prompt``, ``completion`` (text) | the completion (and its EOS), used as written |
| ``conversational`` | ``prompt``, ``completion`` (message lists) | the completion turns, through the chat template |
| ``messages`` | ``messages`` (or ShareGPT ``conversations``) | the assistant turns, through the chat template |
| ``text`` | ``text`` (TRL's ``dataset_text_field``) | every token, in windows of ``max_length`` tokens |
| ``tokenized`` | ``input_ids`` (optional ``labels``) | as given |

Each rule follows a reference, and the places we differ are options:

- ``qa`` rows use ``prompt_template`` (``"Question: {question}\\nAnswer:"``, the answer after one space, EOS
  appended), or, when the tokenizer has a chat template (``use_chat_template=None``, auto), the template with the
  question as the user turn and the answer as the assistant turn, an optional system prompt first and EOS appended
  when the template does not end with it: open-unlearning's ``preprocess_chat_instance``, how it runs TOFU on instruct
  models.
- ``prompt_completion`` and ``conversational`` follow TRL's ``SFTTrainer``: the prompt and ``prompt + completion``
  tokenized apart and the completion starting where they diverge; EOS appended to a text completion that lacks it,
  none after a chat template (the template closes its turn). ``completion_only_loss=False`` scores the prompt too.
- ``messages`` takes the template's own assistant mask (``return_assistant_tokens_mask``, the template's
  ``{% generation %}`` blocks) as TRL's ``assistant_only_loss`` does; a template without them is swapped for TRL's
  training template of the same model (``trl.chat_template_utils.get_training_chat_template``) or refused. Unlike
  TRL, assistant-only is the default here: what is unlearned is what the model said, not what it was asked.
  ``assistant_only_loss=False`` scores the whole conversation.
- ``text`` rows are cut into windows of ``max_length`` tokens, each starting with BOS when the tokenizer adds one, as
  MUSE's training data (``swj0419/muse_bench``) is; no EOS is appended (MUSE and open-unlearning append none; TRL's
  language modelling does). ``window_stride`` below the window's length overlaps the windows, and a window then
  scores only the tokens the previous one did not (the sliding window of transformers' perplexity guide), so each
  token counts once. open-unlearning joins a whole corpus with blank lines before cutting it; here each row (one
  document) is cut on its own.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl.chat_template_utils import get_training_chat_template, has_generation_markers
from trl.data_utils import is_conversational, is_conversational_from_value, maybe_convert_to_chatml

from .formatting import PROMPT_TEMPLATE, format_completion, format_prompt

FORMATS = ("qa", "prompt_completion", "conversational", "messages", "text", "tokenized")
FIELDS = ("question", "answer", "prompt", "completion", "messages")  # the columns `columns` may rename
FORMAT_FIELDS = {
    "qa": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "conversational": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
    "tokenized": ("input_ids", "labels"),
}
"""The fields each row format is read from, under our names (a dataset's column is `TextFormat.column(name)`)."""
ACCEPTED = (
    "'question'/'answer' (text), 'prompt'/'completion' (text, or lists of chat messages), 'messages' (a list of "
    "{'role', 'content'} turns), 'text' (raw text; TRL's dataset_text_field) or 'input_ids' (pre-tokenized)"
)
CHAT_FORMATS = ("conversational", "messages")


class RowFormatError(ValueError):
    """Rows that fit no format, or a format this tokenizer cannot render."""


def common_prefix_length(ids: Sequence[int], other: Sequence[int]) -> int:
    """The number of leading tokens two sequences share (where a completion starts, as TRL finds it)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def chat_template_of(source: str) -> str:
    """The chat template at `source`, as TRL's `chat_template_path`: a ``.jinja``/``.j2`` file's text, or the
    ``chat_template`` of the tokenizer in a folder or Hub repository (copied only: no token is added to the model, so
    the template's special tokens must already be in its vocabulary)."""
    if os.path.isfile(source):
        if not source.endswith((".jinja", ".j2")):
            raise RowFormatError(
                f"chat_template_path={source!r} is a file but not a .jinja/.j2 template; pass a template file or a "
                "tokenizer folder."
            )
        with open(source, encoding="utf-8") as file:
            return file.read()
    template = AutoTokenizer.from_pretrained(source).chat_template
    if not template:
        raise RowFormatError(f"chat_template_path={source!r}: its tokenizer has no chat template.")
    return template


def template_sha256(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A short digest of the tokenizer's chat template (None without one), to record which template was used."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    return None if not template else hashlib.sha256(template.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TextFormat:
    """How rows of every format become `input_ids` and `labels` (-100 where nothing is scored); see the module doc.

    Built by `UnlearningConfig.text_format()` from TRL-style options; the trainer's collator and the evaluators share
    one, so a chat model is unlearned and scored on the same rendering.
    """

    columns: Mapping[str, str] = field(default_factory=dict)  # our field -> the dataset's column, e.g. question->query
    text_field: str = "text"
    prompt_template: str = PROMPT_TEMPLATE
    use_chat_template: bool | None = None  # qa rows through the chat template; None: when the tokenizer has one
    system_prompt: str | None = None
    completion_only_loss: bool | None = None  # None: True, as TRL
    assistant_only_loss: bool = True

    window_stride: int | None = None  # text rows: tokens between window starts; None = the window's length

    def __post_init__(self) -> None:
        unknown = sorted(set(self.columns) - set(FIELDS))
        if unknown:
            raise RowFormatError(
                f"columns (dataset_columns) renames {unknown}; the fields it may rename are {list(FIELDS)}."
            )
        if self.window_stride is not None and (
            isinstance(self.window_stride, bool) or not isinstance(self.window_stride, int) or self.window_stride < 1
        ):
            raise RowFormatError(f"window_stride must be a positive number of tokens, got {self.window_stride!r}.")
        if "{question}" not in self.prompt_template:
            raise RowFormatError(
                f"prompt_template must hold '{{question}}' (where the question goes), got {self.prompt_template!r}."
            )

    # ---- which format ----

    def column(self, name: str) -> str:
        """The dataset's column for one of `FIELDS` (or ``"text"``)."""
        return self.text_field if name == "text" else self.columns.get(name, name)

    def detect(self, example: Mapping[str, Any], what: str = "dataset") -> str:
        """The format of one row (see the module doc), in TRL's order; raises naming its columns otherwise."""
        keys = set(example)
        if "input_ids" in keys:
            return "tokenized"
        if self.column("messages") in keys or is_conversational_from_value(example):
            return "messages"
        prompt, completion = self.column("prompt"), self.column("completion")
        if prompt in keys and completion in keys:
            conversational = is_conversational({"prompt": example[prompt], "completion": example[completion]})
            return "conversational" if conversational else "prompt_completion"
        if self.column("question") in keys and self.column("answer") in keys:
            return "qa"
        for pair in (("question", "answer"), ("prompt", "completion")):
            present = [self.column(f) for f in pair if self.column(f) in keys]
            if len(present) == 1:  # half a pair is a misnamed column far more often than a text corpus
                missing = next(self.column(f) for f in pair if self.column(f) not in keys)
                raise RowFormatError(
                    f"The {what} rows have columns {sorted(keys)}, with {present[0]!r} but without {missing!r}: a "
                    f"{pair[0]}/{pair[1]} row needs both. Rename the column (dataset.rename_column) or map it with "
                    f"dataset_columns (e.g. {{{pair[1]!r}: 'your_column'}})."
                )
        if self.text_field in keys:
            return "text"
        renamed = f" (renamed by dataset_columns={dict(self.columns)})" if self.columns else ""
        raise RowFormatError(
            f"The {what} rows fit no format: they have columns {sorted(keys)}. Accepted: {ACCEPTED}{renamed}. "
            "Map your columns with dataset_columns (e.g. {'question': 'query', 'answer': 'response'}) or "
            "dataset_text_field."
        )

    def chat(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        """Whether `qa` rows go through the chat template (`use_chat_template`, auto: when the tokenizer has one)."""
        if self.use_chat_template is None:
            return bool(tokenizer.chat_template)
        return self.use_chat_template

    def check_tokenizer(self, tokenizer: PreTrainedTokenizerBase, row_format: str, what: str) -> None:
        """Refuse, before any compute, a format this tokenizer cannot render."""
        needs_template = row_format in CHAT_FORMATS or (row_format == "qa" and self.use_chat_template)
        if needs_template and not tokenizer.chat_template:
            raise RowFormatError(
                f"The {what} rows are {row_format!r} and need a chat template, but the tokenizer has none: set "
                "tokenizer.chat_template, or chat_template_path=<a .jinja file or a tokenizer folder>."
                + (" Or use_chat_template=False for the plain prompt template." if row_format == "qa" else "")
            )
        if row_format in ("qa", "prompt_completion") and tokenizer.eos_token_id is None:
            raise RowFormatError(f"The {what} rows are {row_format!r}: the tokenizer needs an EOS token to end them.")

    def training_template(self, tokenizer: PreTrainedTokenizerBase, row_format: str) -> str | None:
        """The chat template `messages` rows are rendered with when only assistant turns are scored: None (the
        tokenizer's own) when it marks them with `{% generation %}`, else TRL's training template of the model;
        refused when TRL has none."""
        if row_format != "messages" or not self.assistant_only_loss or has_generation_markers(tokenizer.chat_template):
            return None
        try:
            return get_training_chat_template(tokenizer)
        except ValueError as err:
            raise RowFormatError(
                "assistant_only_loss=True scores only the assistant turns of 'messages' rows, and needs a chat "
                "template that marks them with {% generation %} ... {% endgeneration %}; this tokenizer's template "
                "has no such marks and TRL has no training version of it. Pass chat_template_path=<a template with "
                "generation marks>, or assistant_only_loss=False to score every token of the conversation."
            ) from err

    # ---- tokens ----

    def encode(
        self, tokenizer: PreTrainedTokenizerBase, example: Mapping[str, Any], max_length: int
    ) -> list[dict[str, list[int]]]:
        """One row -> its examples' `input_ids` and `labels` (several for a `text` row longer than a window; one
        otherwise), cut on the right to `max_length`."""
        row_format = self.detect(example)
        if row_format == "tokenized":
            ids = list(example["input_ids"])
            return [{"input_ids": ids, "labels": list(example.get("labels") or ids)}]
        if row_format == "text":
            return self.windows(tokenizer, example[self.text_field], max_length)
        if row_format == "messages":
            ids, labels = self.messages_tokens(tokenizer, example)
        else:
            prompt_ids, ids = self.prompt_and_full(tokenizer, example, row_format)
            start = common_prefix_length(prompt_ids, ids)
            completion_only = self.completion_only_loss is not False or row_format == "qa"
            labels = [-100] * start + ids[start:] if completion_only else list(ids)
        return [{"input_ids": ids[:max_length], "labels": labels[:max_length]}]

    def prompt_and_full(
        self, tokenizer: PreTrainedTokenizerBase, example: Mapping[str, Any], row_format: str
    ) -> tuple[list[int], list[int]]:
        """(prompt ids, prompt + completion ids) of a `qa`, `prompt_completion` or `conversational` row."""
        if row_format == "qa":
            question, answer = example[self.column("question")], example[self.column("answer")]
            if self.chat(tokenizer):
                prompt = self.chat_prompt(question)
                full = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": answer}])
                if full[-1] != tokenizer.eos_token_id:  # open-unlearning's preprocess_chat_instance
                    full = full + [tokenizer.eos_token_id]
                return chat_ids(tokenizer, prompt, add_generation_prompt=True), full
            prompt_ids = tokenizer(format_prompt(question, self.prompt_template))["input_ids"]
            answer_ids = tokenizer(format_completion(answer), add_special_tokens=False)["input_ids"]
            return prompt_ids, prompt_ids + answer_ids + [tokenizer.eos_token_id]
        prompt, completion = example[self.column("prompt")], example[self.column("completion")]
        if row_format == "conversational":
            return chat_ids(tokenizer, prompt, add_generation_prompt=True), chat_ids(tokenizer, prompt + completion)
        if not completion.endswith(tokenizer.eos_token):  # TRL's add_eos
            completion = completion + tokenizer.eos_token
        return tokenizer(prompt)["input_ids"], tokenizer(prompt + completion)["input_ids"]

    def messages_tokens(
        self, tokenizer: PreTrainedTokenizerBase, example: Mapping[str, Any]
    ) -> tuple[list[int], list[int]]:
        """(ids, labels) of a `messages` row: the assistant turns scored (the template's mask), or every token."""
        messages = self.messages_of(example)
        if not self.assistant_only_loss:
            ids = chat_ids(tokenizer, messages)
            return ids, list(ids)
        encoded = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=self.training_template(tokenizer, "messages"),
        )
        ids = list(encoded["input_ids"])
        return ids, [t if m else -100 for t, m in zip(ids, encoded["assistant_masks"], strict=True)]

    def messages_of(self, example: Mapping[str, Any]) -> list[dict[str, Any]]:
        """A row's conversation as ChatML messages (ShareGPT ``conversations`` converted by TRL)."""
        if self.column("messages") in example:
            return list(example[self.column("messages")])
        return maybe_convert_to_chatml(copy.deepcopy(dict(example)))["messages"]  # TRL renames keys in place

    def windows(self, tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[dict[str, list[int]]]:
        """A text cut into windows of `max_length` tokens (BOS first when the tokenizer adds one), `window_stride`
        apart; tokens an earlier window scored are masked in the next."""
        ids = tokenizer(text)["input_ids"]
        head = ids[:1] if ids and ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id is not None else []
        body = ids[len(head) :]
        size = max_length - len(head)
        if size < 1:
            raise RowFormatError(f"max_length={max_length} leaves no room for text after the BOS token.")
        stride = min(self.window_stride or size, size)
        out, scored_until = [], 0
        for start in range(0, max(len(body), 1), stride):
            if start and scored_until >= len(body):
                break
            piece = body[start : start + size]
            labels = [t if start + k >= scored_until else -100 for k, t in enumerate(piece)]
            out.append({"input_ids": head + piece, "labels": [-100] * len(head) + labels})
            scored_until = start + len(piece)
        return out

    # ---- prompts for generation ----

    def chat_prompt(self, question: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
        """The messages before the answer of a `qa` row: the system prompt, any few-shot turns, the question."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for q, a in shots:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages + [{"role": "user", "content": question}]

    def generation_prompt(
        self, tokenizer: PreTrainedTokenizerBase, question: str, shots: Sequence[tuple[str, str]] = ()
    ) -> list[int]:
        """The token ids a model answers `question` from, as its `qa` rows are trained: the chat template with the
        generation prompt, or `prompt_template` (few-shot `shots` before it: earlier turns, or blank-line separated
        question/answer pairs)."""
        if self.chat(tokenizer):
            return chat_ids(tokenizer, self.chat_prompt(question, shots), add_generation_prompt=True)
        text = "".join(format_prompt(q, self.prompt_template) + format_completion(a) + "\n\n" for q, a in shots)
        return tokenizer(text + format_prompt(question, self.prompt_template))["input_ids"]

    def describe(self, tokenizer: PreTrainedTokenizerBase, row_formats: Mapping[str, str] | None = None) -> dict:
        """What a result's meta and the card record: the formats seen and how `qa` rows were rendered."""
        chat = self.chat(tokenizer)
        out: dict[str, Any] = {
            "qa": "chat template" if chat else "prompt template",
            "prompt_template": None if chat else self.prompt_template,
            "chat_template_sha256": template_sha256(tokenizer),
            "system_prompt": self.system_prompt if chat else None,
        }
        if row_formats:
            out["rows"] = dict(row_formats)
        return out


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
) -> list[int]:
    """`messages` through the tokenizer's chat template, as token ids."""
    encoded = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"])
