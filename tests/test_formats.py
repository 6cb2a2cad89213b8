"""Every row format of `erasus_hf.data.formats` through `UnlearningTrainer` (issue 17: a TRL user's own data works as
in `SFTTrainer`), on real TOFU rows and tiny Llamas.

- Unlearning: for each format (question/answer plain and through a chat template, prompt/completion as text and as
  chat messages, `messages` assistant-only and whole-conversation, raw text, pre-tokenized) a tiny Llama fitted on
  the rows is unlearned with NPO and a retain side of the same format: the forget NLL rises, the retain NLL holds.
- Masks: the scored tokens are what the template's own assistant mask and TRL's `SFTTrainer` say they are.
- Text windows: a long text cut into windows of `max_length`, each starting with BOS, every token scored once.
- Bad input refused before any forward pass, naming the columns, the option and the fix.
- Mixed sides: a raw-text forget side with a question/answer retain side (the MUSE setting).

The chat template is built in memory (plain-text role tags, the assistant turn and its EOS inside `{% generation %}`),
so nothing is downloaded. The fitted models learn every token of the rows' rendering (language modelling on
question and answer), so the same fit serves the formats whose renderings share tokens: the plain one (question/answer,
prompt/completion text, raw text, pre-tokenized) and the chat one (question/answer through the template,
conversational, messages).
"""

from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch
from datasets import Dataset, concatenate_datasets

from erasus_hf import UnlearningTrainer
from erasus_hf.data.collator import QACollator
from erasus_hf.data.formats import FORMATS, TextFormat
from erasus_hf.data.formatting import format_completion, format_prompt

from .testing_utils import config, qa, small_llama

# {% generation %} marks the assistant turn and its EOS; HF renders templates with trim_blocks, so no newline follows
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
NO_MARKS_TEMPLATE = CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
NO_EOS_TEMPLATE = CHAT_TEMPLATE.replace("{{ eos_token }}", "")  # a template that does not close the answer

MAX_LENGTH = 200  # every row whole (the longest chat rendering is about 170 tokens)
N_ROWS = 8  # forget rows (the first forget author) and retain rows (the first retain author)


# ---- rows of each format, from TOFU question/answer rows


def as_format(rows: Dataset, row_format: str, tokenizer=None) -> Dataset:
    """TOFU question/answer `rows` written as `row_format` (the same question and answer in each)."""
    pairs = list(zip(rows["question"], rows["answer"], strict=True))
    if row_format == "qa":
        out = [{"question": q, "answer": a} for q, a in pairs]
    elif row_format == "prompt_completion":
        out = [{"prompt": format_prompt(q), "completion": format_completion(a)} for q, a in pairs]
    elif row_format == "conversational":
        out = [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    elif row_format == "messages":
        out = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    elif row_format == "text":  # the plain rendering as raw text: the same tokens as the qa row but the closing EOS
        out = [{"text": format_prompt(q) + format_completion(a)} for q, a in pairs]
    elif row_format == "tokenized":
        out = [TextFormat().encode(tokenizer, {"question": q, "answer": a}, MAX_LENGTH)[0] for q, a in pairs]
    else:
        raise ValueError(row_format)
    return Dataset.from_list(out)


def chat_copy(tokenizer, template: str | None = CHAT_TEMPLATE):
    """A copy of the session tokenizer with `template` (the session's own is shared by every test)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def scored(example: dict) -> list[int]:
    """The positions an example scores."""
    return [i for i, label in enumerate(example["labels"]) if label != -100]


# ---- fitting and scoring


def mean_nll(model, tokenizer, examples) -> float:
    """Mean NLL (nats per scored token) of `model` on tokenized examples (`input_ids`/`labels`)."""
    batch = QACollator(tokenizer, max_length=MAX_LENGTH)(
        [{k: e[k] for k in ("input_ids", "labels")} for e in examples]
    )
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def fit(model, tokenizer, examples, steps: int = 100, lr: float = 1e-2):
    """Plain full-batch AdamW language modelling on every token of `examples`: the model knows the rows' question
    and answer tokens by heart (mean answer NLL about 0.005)."""
    rows = [{"input_ids": e["input_ids"], "labels": e["input_ids"]} for e in examples]
    batch = QACollator(tokenizer, max_length=MAX_LENGTH)(rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    torch.manual_seed(0)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def rows(tofu_slice):
    """(forget, retain): 8 question/answer rows of one forget author and 8 of one retain author."""
    forget, retain = tofu_slice
    return qa(forget).select(range(N_ROWS)), qa(retain).select(range(N_ROWS))


@pytest.fixture(scope="module")
def fitted(tokenizer, rows):
    """{"plain": a tiny Llama (hidden 64) fitted on every token of the plain rendering of the forget and retain rows,
    "chat": one fitted on their chat-template rendering} (about 7 s each on one core)."""
    both = concatenate_datasets(list(rows))
    out = {}
    for name, tok in (("plain", tokenizer), ("chat", chat_copy(tokenizer))):
        text_format = TextFormat(use_chat_template=name == "chat")
        examples = [text_format.encode(tok, row, MAX_LENGTH)[0] for row in both]
        out[name] = fit(small_llama(tokenizer, hidden_size=64, intermediate_size=128), tok, examples)
    return out


# ---- 1. each format: fitted, then unlearned through the trainer

CASES = {
    # id: (row format, chat tokenizer, extra UnlearningConfig settings)
    "qa": ("qa", False, {}),
    "qa-chat": ("qa", True, {}),
    "prompt_completion": ("prompt_completion", False, {}),
    "conversational": ("conversational", True, {}),
    "messages": ("messages", True, {}),
    "messages-all-tokens": ("messages", True, {"assistant_only_loss": False}),
    "text": ("text", False, {}),
    "tokenized": ("tokenized", False, {}),
}


def test_every_format_is_covered():
    assert {row_format for row_format, _, _ in CASES.values()} == set(FORMATS)


@pytest.mark.parametrize("case", list(CASES))
def test_unlearning_each_format_raises_forget_nll_and_keeps_retain(tmp_path, tokenizer, rows, fitted, case):
    row_format, chat, settings = CASES[case]
    tok = chat_copy(tokenizer) if chat else tokenizer
    model = copy.deepcopy(fitted["chat" if chat else "plain"])
    forget, retain = (as_format(side, row_format, tok) for side in rows)
    args = config(
        tmp_path,
        strategy="npo",
        use_peft=False,
        learning_rate=5e-4,
        num_train_epochs=6,
        retain_weight=4.0,
        lr_scheduler_type="constant",
        max_length=MAX_LENGTH,
        **settings,
    )
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tok)
    assert trainer.row_formats == {"forget": row_format, "retain": row_format}
    forget_examples, retain_examples = trainer.train_dataset.forget, trainer.train_dataset.retain
    text_format = TextFormat(**settings)  # the run's options reach the collator
    assert forget_examples["labels"] == [e["labels"] for r in forget for e in text_format.encode(tok, r, MAX_LENGTH)]
    before = mean_nll(model, tok, forget_examples), mean_nll(model, tok, retain_examples)
    trainer.train()
    after = mean_nll(model, tok, forget_examples), mean_nll(model, tok, retain_examples)
    # measured (nats per scored token, forget / retain): before 0.004-0.039 / 0.005-0.028, after 0.76-1.89 /
    # 0.036-0.15 (an untrained model: about 6.2); the all-token formats (text, whole conversations) rise least
    assert max(before) < 0.05  # the fitted model knows the rows
    assert after[0] > 15 * before[0] and after[0] > 0.5  # forgotten
    assert after[1] < 0.25 and after[1] < after[0] / 4  # kept


# ---- 2. masks: the template's own assistant mask, and what TRL's SFTTrainer builds for the same rows


def trl_prepared(tmp_path, tokenizer, rows: Dataset, **settings) -> Dataset:
    """The `train_dataset` TRL's `SFTTrainer` builds from `rows` (its `input_ids` and `labels`, -100 where it does
    not train), for a throwaway tiny Llama."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        report_to="none",
        max_length=MAX_LENGTH,
        bf16=False,
        activation_checkpointing=False,
        **settings,
    )
    trainer = SFTTrainer(model=small_llama(tokenizer), args=args, train_dataset=rows, processing_class=tokenizer)
    return trainer.train_dataset


def assert_same_as_trl(prepared: Dataset, ours: list[dict]) -> None:
    assert len(prepared) == len(ours)
    for i, (theirs, mine) in enumerate(zip(prepared, ours, strict=True)):
        assert list(theirs["input_ids"]) == mine["input_ids"], f"row {i}: input_ids"
        assert list(theirs["labels"]) == mine["labels"], f"row {i}: labels"


def conversation(rows: Dataset) -> list[dict[str, str]]:
    """A system turn and two user/assistant exchanges from two TOFU rows."""
    (q1, q2), (a1, a2) = rows["question"][:2], rows["answer"][:2]
    return [
        {"role": "system", "content": "You answer questions about authors."},
        {"role": "user", "content": q1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": a2},
    ]


def test_messages_score_exactly_the_templates_assistant_mask(tokenizer, rows):
    tok = chat_copy(tokenizer)
    messages = conversation(rows[0])
    (example,) = TextFormat().encode(tok, {"messages": messages}, MAX_LENGTH)
    expected = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert example["input_ids"] == list(expected["input_ids"])
    assert [int(label != -100) for label in example["labels"]] == list(expected["assistant_masks"])
    # the two answers and the EOS closing each, nothing of the system or user turns
    a1, a2 = rows[0]["answer"][:2]
    assert tok.decode([t for t in example["labels"] if t != -100]) == f"{a1}</s>{a2}</s>"
    # the same conversation as ShareGPT `conversations` (from/value, converted by TRL) scores the same tokens
    sharegpt = {"conversations": [{"from": m["role"], "value": m["content"]} for m in messages]}
    assert TextFormat().encode(tok, sharegpt, MAX_LENGTH) == [example]
    # assistant_only_loss=False: every token of the rendering
    (whole,) = TextFormat(assistant_only_loss=False).encode(tok, {"messages": messages}, MAX_LENGTH)
    assert whole["input_ids"] == example["input_ids"] and whole["labels"] == whole["input_ids"]


TRL_CASES = {
    # id: (row format, chat tokenizer, our TextFormat options, TRL's SFTConfig options)
    "prompt_completion": ("prompt_completion", False, {}, {}),
    "prompt_completion-whole": (
        "prompt_completion",
        False,
        {"completion_only_loss": False},
        {"completion_only_loss": False},
    ),
    "conversational": ("conversational", True, {}, {}),
    "messages": ("messages", True, {}, {"assistant_only_loss": True}),
    "messages-all-tokens": ("messages", True, {"assistant_only_loss": False}, {"assistant_only_loss": False}),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_tokens_and_labels_are_those_of_trl_sft_trainer(tmp_path, tokenizer, rows, case):
    row_format, chat, ours, theirs = TRL_CASES[case]
    tok = chat_copy(tokenizer) if chat else tokenizer
    forget = as_format(rows[0], row_format)
    if row_format == "messages":  # multi-turn, with a system prompt
        forget = Dataset.from_list([{"messages": conversation(rows[0])}, {"messages": conversation(rows[1])}])
    collator = QACollator(tok, max_length=MAX_LENGTH, text_format=TextFormat(**ours))
    assert_same_as_trl(
        trl_prepared(tmp_path, copy.deepcopy(tok), forget, **theirs), [collator.tokenize(r) for r in forget]
    )


def test_plain_qa_rows_are_trls_prompt_completion_rows(tmp_path, tokenizer, rows):
    """A question/answer row is the prompt/completion row "Question: ...\\nAnswer:" / " answer" TRL trains on."""
    forget = rows[0]
    prepared = trl_prepared(tmp_path, copy.deepcopy(tokenizer), as_format(forget, "prompt_completion"))
    assert_same_as_trl(prepared, [QACollator(tokenizer, max_length=MAX_LENGTH).tokenize(r) for r in forget])


def test_encoding_a_sharegpt_row_leaves_it_as_it_was(tokenizer):
    row = {"conversations": [{"from": "user", "value": "Who?"}, {"from": "assistant", "value": "Me."}]}
    given = copy.deepcopy(row)
    first = TextFormat().encode(chat_copy(tokenizer), row, MAX_LENGTH)
    assert row == given
    assert TextFormat().encode(chat_copy(tokenizer), row, MAX_LENGTH) == first


def test_eos_rules(tokenizer, rows):
    eos = tokenizer.eos_token_id
    q, a = rows[0][0]["question"], rows[0][0]["answer"]
    plain, chat, no_eos = tokenizer, chat_copy(tokenizer), chat_copy(tokenizer, NO_EOS_TEMPLATE)

    def encode(tok, row, **options):
        (example,) = TextFormat(**options).encode(tok, row, MAX_LENGTH)
        return example

    def ends_scored_eos_once(example):
        return example["input_ids"][-1] == example["labels"][-1] == eos and example["input_ids"].count(eos) == 1

    # qa: the answer and one closing EOS, with the prompt template or through either template
    assert ends_scored_eos_once(encode(plain, {"question": q, "answer": a}))
    assert ends_scored_eos_once(encode(chat, {"question": q, "answer": a}))
    assert ends_scored_eos_once(encode(no_eos, {"question": q, "answer": a}))  # appended (open-unlearning)
    # prompt/completion text: EOS appended (TRL's add_eos), not doubled when the completion has it
    row = {"prompt": format_prompt(q), "completion": format_completion(a)}
    assert ends_scored_eos_once(encode(plain, row))
    assert encode(plain, {**row, "completion": row["completion"] + "</s>"}) == encode(plain, row)
    # conversational and messages: the template's rendering as it is, no EOS added when it closes none
    conv = {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
    assert ends_scored_eos_once(encode(chat, conv))
    for tok in (chat, no_eos):
        rendered = tok.apply_chat_template(conv["prompt"] + conv["completion"], tokenize=True, return_dict=True)
        assert encode(tok, conv)["input_ids"] == list(rendered["input_ids"])
    assert eos not in encode(no_eos, conv)["input_ids"]
    # text: no EOS (MUSE, open-unlearning)
    assert eos not in encode(plain, {"text": format_prompt(q) + format_completion(a)})["input_ids"]


# ---- 3. text windows


@pytest.fixture(scope="module")
def long_text(tofu_slice):
    """One document: the answers of the first forget author joined (1,433 tokens)."""
    return " ".join(tofu_slice[0]["answer"][:20])


@pytest.mark.parametrize("max_length", [32, 100])
def test_a_long_text_is_cut_into_windows_that_start_with_bos(tokenizer, long_text, max_length):
    body = tokenizer(long_text)["input_ids"][1:]
    windows = TextFormat().encode(tokenizer, {"text": long_text}, max_length)
    size = max_length - 1  # the BOS takes one place in each window
    assert len(windows) == math.ceil(len(body) / size)
    assert all(w["input_ids"][0] == tokenizer.bos_token_id and w["labels"][0] == -100 for w in windows)
    assert all(len(w["input_ids"]) == max_length for w in windows[:-1])
    assert 1 < len(windows[-1]["input_ids"]) < max_length  # the rest, shorter
    assert [t for w in windows for t in w["input_ids"][1:]] == body  # every token, in order, once
    assert all(w["labels"][1:] == w["input_ids"][1:] for w in windows)  # all scored


@pytest.mark.parametrize("stride", [1, 10, 25, 31, 100])
def test_overlapping_windows_score_each_token_once(tokenizer, long_text, stride):
    body = tokenizer(long_text)["input_ids"][1:]
    max_length = 32
    windows = TextFormat(window_stride=stride).encode(tokenizer, {"text": long_text}, max_length)
    effective = min(stride, max_length - 1)  # a stride past the window is the window
    assert len(windows) == 1 + math.ceil(max(len(body) - (max_length - 1), 0) / effective)
    counts = Counter()
    for k, window in enumerate(windows):
        assert window["input_ids"][0] == tokenizer.bos_token_id and len(window["input_ids"]) <= max_length
        start = k * effective
        assert window["input_ids"][1:] == body[start : start + max_length - 1]  # the window's place in the text
        for offset, label in enumerate(window["labels"][1:]):
            if label != -100:
                assert label == body[start + offset]
                counts[start + offset] += 1
    assert counts == Counter(range(len(body)))  # every token scored exactly once


def test_the_trainer_tokenizes_every_window(tmp_path, tokenizer, tiny_llama, long_text):
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="ga", retain_loss="none", max_length=64, window_stride=48),
        forget_dataset=Dataset.from_list([{"text": long_text}, {"text": long_text[:200]}]),
        processing_class=tokenizer,
    )
    expected = [
        w
        for text in (long_text, long_text[:200])
        for w in TextFormat(window_stride=48).encode(tokenizer, {"text": text}, 64)
    ]
    forget = trainer.train_dataset.forget
    assert len(expected) > 10 and len(forget) == len(expected)
    assert forget["input_ids"] == [w["input_ids"] for w in expected]
    assert forget["labels"] == [w["labels"] for w in expected]


# ---- 4. bad input, refused before any forward pass


@pytest.fixture
def no_forward(tiny_llama):
    """`tiny_llama`, failing the test on any forward pass (a refusal must come before any compute: no reference
    pass, no training step)."""

    def refuse(module, args, kwargs):
        raise AssertionError("a forward pass ran before the input was refused")

    tiny_llama.register_forward_pre_hook(refuse, with_kwargs=True)
    return tiny_llama


def refused(tmp_path, model, tokenizer, forget, retain=None, **settings) -> str:
    """The message `UnlearningTrainer` refuses these rows with."""
    settings = {"strategy": "ga", "retain_loss": "none", **settings}
    with pytest.raises(ValueError) as err:
        UnlearningTrainer(
            model,
            config(tmp_path, **settings),
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
        )
    return str(err.value)


def test_rows_of_no_format_name_their_columns_and_the_accepted_formats(tmp_path, tokenizer, no_forward, rows):
    forget = rows[0].rename_columns({"question": "query", "answer": "response"})
    message = refused(tmp_path, no_forward, tokenizer, forget)
    assert "forget" in message and "['query', 'response']" in message
    for accepted in ("'question'/'answer'", "'prompt'/'completion'", "'messages'", "'text'", "'input_ids'"):
        assert accepted in message
    assert "columns" in message  # the fix: rename them (it says `columns`, the option is `dataset_columns`)
    # the retain side is checked too
    message = refused(tmp_path, no_forward, tokenizer, rows[0], forget, strategy="npo", retain_loss="nll")
    assert "retain" in message and "['query', 'response']" in message


def test_messages_without_generation_marks_need_a_template_that_has_them(tmp_path, tokenizer, no_forward, rows):
    tok = chat_copy(tokenizer, NO_MARKS_TEMPLATE)
    forget = as_format(rows[0], "messages")
    message = refused(tmp_path, no_forward, tok, forget)
    assert "assistant_only_loss" in message and "chat_template_path" in message and "generation" in message
    # the two fixes the message names both work
    template = tmp_path / "marked.jinja"
    template.write_text(CHAT_TEMPLATE)
    trainer = UnlearningTrainer(
        no_forward,
        config(tmp_path / "a", strategy="ga", retain_loss="none", chat_template_path=str(template)),
        forget_dataset=forget,
        processing_class=tok,
    )
    assert tok.chat_template == CHAT_TEMPLATE
    assert (
        trainer.train_dataset.forget[0]["labels"]
        == TextFormat().encode(chat_copy(tokenizer), forget[0], 512)[0]["labels"]
    )
    trainer = UnlearningTrainer(
        no_forward,
        config(tmp_path / "b", strategy="ga", retain_loss="none", assistant_only_loss=False),
        forget_dataset=forget,
        processing_class=chat_copy(tokenizer, NO_MARKS_TEMPLATE),
    )
    first = trainer.train_dataset.forget[0]
    assert first["labels"] == first["input_ids"]


@pytest.mark.parametrize("row_format", ["conversational", "messages"])
def test_chat_rows_with_a_tokenizer_without_a_template(tmp_path, tokenizer, no_forward, rows, row_format):
    message = refused(tmp_path, no_forward, tokenizer, as_format(rows[0], row_format))
    assert f"'{row_format}'" in message and "chat template" in message and "chat_template_path" in message


def test_qa_rows_asked_through_a_missing_template(tmp_path, tokenizer, no_forward, rows):
    message = refused(tmp_path, no_forward, tokenizer, rows[0], use_chat_template=True)
    assert "chat_template_path" in message and "use_chat_template=False" in message


@pytest.mark.parametrize("strategy", ["dpo", "idk_dpo"])
def test_an_alternate_answer_strategy_on_text_rows(tmp_path, tokenizer, no_forward, rows, strategy):
    """DPO-style strategies replace a row's answer by an alternate one; a raw text has no answer to replace."""
    forget = as_format(rows[0], "text")
    if strategy == "dpo":  # dpo reads the user's own alternates; idk_dpo draws refusals
        forget = forget.add_column("alternate", ["I cannot say."] * len(forget))
    message = refused(tmp_path, no_forward, tokenizer, forget, strategy=strategy)
    assert "'text'" in message and "alternate" in message and "question/answer or prompt/completion" in message


@pytest.mark.parametrize("as_json", [False, True], ids=["dict", "JSON string"])
def test_dataset_columns_renames_question_and_answer(tmp_path, tokenizer, tiny_llama, rows, as_json):
    forget = rows[0].rename_columns({"question": "query", "answer": "response"})
    columns = {"question": "query", "answer": "response"}
    trainer = UnlearningTrainer(
        tiny_llama,
        config(
            tmp_path, strategy="ga", retain_loss="none", dataset_columns=json.dumps(columns) if as_json else columns
        ),
        forget_dataset=forget,
        processing_class=tokenizer,
    )
    assert trainer.row_formats == {"forget": "qa"}
    collator = QACollator(tokenizer, max_length=512)
    assert trainer.train_dataset.forget["labels"] == [collator.tokenize(r)["labels"] for r in rows[0]]
    trainer.train()  # it trains on the renamed rows
    assert trainer.state.global_step == 2


def test_an_unknown_field_in_dataset_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"renames \['query'\]; the fields it may rename are \['question', 'answer'"):
        config(tmp_path, dataset_columns={"query": "question"})


# ---- 5. mixed sides: a raw-text forget side, a question/answer retain side


def test_text_forget_side_with_a_qa_retain_side(tmp_path, tokenizer, rows, fitted):
    model = copy.deepcopy(fitted["plain"])
    args = config(
        tmp_path,
        strategy="npo",
        use_peft=False,
        learning_rate=5e-4,
        num_train_epochs=6,
        retain_weight=4.0,
        lr_scheduler_type="constant",
        max_length=MAX_LENGTH,
    )
    trainer = UnlearningTrainer(
        model, args, forget_dataset=as_format(rows[0], "text"), retain_dataset=rows[1], processing_class=tokenizer
    )
    assert trainer.row_formats == {"forget": "text", "retain": "qa"}
    assert trainer.text_format.describe(tokenizer, trainer.row_formats)["rows"] == {"forget": "text", "retain": "qa"}
    forget_examples, retain_examples = trainer.train_dataset.forget, trainer.train_dataset.retain
    assert all(set(scored(e)) == set(range(1, len(e["labels"]))) for e in forget_examples)  # every token but BOS
    assert all(e["labels"][-1] == tokenizer.eos_token_id for e in retain_examples)  # the answers and their EOS
    before = mean_nll(model, tokenizer, forget_examples), mean_nll(model, tokenizer, retain_examples)
    trainer.train()
    after = mean_nll(model, tokenizer, forget_examples), mean_nll(model, tokenizer, retain_examples)
    assert max(before) < 0.05
    assert after[0] > 15 * before[0] and after[0] > 0.5
    assert after[1] < 0.25 and after[1] < after[0] / 4
