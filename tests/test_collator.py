import torch

from erasus_hf.data.collator import NestedCollator, QACollator
from erasus_hf.data.formatting import format_completion, format_prompt
from erasus_hf.data.pairing import ForgetRetainDataset
from erasus_hf.objectives import CausalLMObjective

ROWS = [
    {"question": "Who wrote it?", "answer": "Jaime Vasquez wrote it."},
    {"question": "When was the author born, and where?", "answer": "In 1958, in Santiago."},
]


def test_prompt_is_masked_and_answer_with_eos_is_scored(tokenizer):
    collator = QACollator(tokenizer)
    tokenized = collator.tokenize(ROWS[0])
    prompt_ids = tokenizer(format_prompt(ROWS[0]["question"]))["input_ids"]
    answer_ids = tokenizer(format_completion(ROWS[0]["answer"]), add_special_tokens=False)["input_ids"]
    assert tokenized["input_ids"] == prompt_ids + answer_ids + [tokenizer.eos_token_id]
    assert tokenized["labels"] == [-100] * len(prompt_ids) + answer_ids + [tokenizer.eos_token_id]
    assert tokenized["input_ids"][0] == tokenizer.bos_token_id


def test_padding_right_and_left(tokenizer):
    collator = QACollator(tokenizer)
    right = collator(ROWS)
    short = int(right["attention_mask"].sum(1).argmin())
    n = int(right["attention_mask"][short].sum())
    assert right["attention_mask"][short, :n].all() and not right["attention_mask"][short, n:].any()
    assert (right["labels"][short, n:] == -100).all()
    assert (right["input_ids"][short, n:] == tokenizer.pad_token_id).all()
    tokenizer.padding_side = "left"
    try:
        left = collator(ROWS)
    finally:
        tokenizer.padding_side = "right"
    width = left["input_ids"].shape[1]
    assert not left["attention_mask"][short, : width - n].any() and left["attention_mask"][short, width - n :].all()
    assert left["position_ids"][short, -n:].tolist() == list(range(n))


def test_left_and_right_padding_score_the_same(tokenizer, tiny_llama):
    collator, objective = QACollator(tokenizer), CausalLMObjective()
    right = objective.score(tiny_llama, collator(ROWS)).mean_nll
    tokenizer.padding_side = "left"
    try:
        left = objective.score(tiny_llama, collator(ROWS)).mean_nll
    finally:
        tokenizer.padding_side = "right"
    assert torch.allclose(left, right, atol=1e-5)


def test_causal_lm_nll_matches_transformers_shifted_loss(tokenizer, tiny_llama):
    batch = QACollator(tokenizer)([ROWS[0]])
    ours = CausalLMObjective().score(tiny_llama, batch).mean_nll.item()
    theirs = tiny_llama(input_ids=batch["input_ids"], labels=batch["labels"]).loss.item()
    assert abs(ours - theirs) < 1e-5


def test_pretokenized_rows_pass_through(tokenizer):
    collator = QACollator(tokenizer)
    rows = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 9]}]
    batch = collator(rows)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, tokenizer.pad_token_id, tokenizer.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [1, 9, -100, -100]]


def test_truncation_keeps_max_length(tokenizer):
    batch = QACollator(tokenizer, max_length=12)(ROWS)
    assert batch["input_ids"].shape[1] == 12


def test_pairing_is_seeded_and_redrawn_each_epoch():
    forget = [{"question": f"f{i}", "answer": "a"} for i in range(10)]
    retain = [{"question": f"r{i}", "answer": "a"} for i in range(4)]
    a, b = ForgetRetainDataset(forget, retain, seed=3), ForgetRetainDataset(forget, retain, seed=3)
    first = [a[i]["retain"]["question"] for i in range(10)]
    assert first == [b[i]["retain"]["question"] for i in range(10)]
    assert set(first[:4]) == {f"r{i}" for i in range(4)}  # a permutation: every retain row before any repeats
    a.set_epoch(1)
    assert [a[i]["retain"]["question"] for i in range(10)] != first
    assert [a[i]["forget"]["index"] for i in range(10)] == list(range(10))


def test_nested_collator_keeps_index(tokenizer):
    pairs = ForgetRetainDataset(ROWS, ROWS, seed=0, index_offset=5)
    batch = NestedCollator(QACollator(tokenizer))([pairs[0], pairs[1]])
    assert batch["forget"]["index"].tolist() == [5, 6]
    assert "index" not in batch["retain"]
