"""The seq2seq objective: family detection, decoder inputs built the model's own way, the text collator, and a tiny
T5 that learned real TOFU authors forgetting one of them."""

import copy

import pytest
import torch
from datasets import concatenate_datasets
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    Wav2Vec2Config,
    Wav2Vec2ForCTC,
    Wav2Vec2ForSequenceClassification,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.modeling.tiny import build_tiny_llama
from erasus_hf.objectives import Seq2SeqObjective, Seq2SeqQACollator, SpeechSeq2SeqCollator, get_objective
from erasus_hf.objectives.seq2seq import decoder_input_ids_from_labels

MAX_LENGTH = 24  # question tokens and answer tokens (the answers' first 23 tokens + EOS): keeps training short
FORGET_AUTHOR = 198


def tiny_t5(tokenizer, seed=0):
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=64,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,  # T5's convention
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def tiny_whisper(vocab_size=40):
    config = WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=8,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=10,
        max_target_positions=12,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=1,
        decoder_start_token_id=2,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config)


def tiny_bart_config(vocab_size=40):
    return BartConfig(
        vocab_size=vocab_size,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        num_labels=3,
    )


def tiny_wav2vec2_config(**kwargs):
    return Wav2Vec2Config(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        **kwargs,
    )


def test_detection_finds_each_family(tokenizer):
    torch.manual_seed(0)
    cases = {
        "seq2seq": [tiny_t5(tokenizer), tiny_whisper(), BartForConditionalGeneration(tiny_bart_config())],
        "classification": [
            BartForSequenceClassification(tiny_bart_config()),  # encoder-decoder, but class logits
            Wav2Vec2ForSequenceClassification(tiny_wav2vec2_config(num_labels=3)),
        ],
        "ctc": [Wav2Vec2ForCTC(tiny_wav2vec2_config())],
        "causal_lm": [build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)],
    }
    for expected, models in cases.items():
        for model in models:
            assert get_objective(None, model).name == expected, type(model).__name__
    with pytest.raises(ValueError, match="encoder-decoder model with a language-modelling head"):
        get_objective("seq2seq", cases["causal_lm"][0])
    with pytest.raises(ValueError, match=r"needs a \*ForCTC speech recogniser"):
        get_objective("ctc", cases["classification"][1])


def test_decoder_inputs_and_scores_follow_the_models_own_shift(tokenizer):
    """Scores equal the model's own loss (which builds the decoder inputs from labels itself), for T5 (through its
    `prepare_decoder_input_ids_from_labels`), BART, and Whisper (no such method: the model shifts the labels)."""
    objective = Seq2SeqObjective()
    labels = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100]])
    t5 = tiny_t5(tokenizer)
    expected = torch.tensor(
        [[t5.config.decoder_start_token_id, 5, 6, 7], [t5.config.decoder_start_token_id, 9, 10, 3]]
    )
    assert tokenizer.pad_token_id == 3
    assert torch.equal(decoder_input_ids_from_labels(t5, labels), expected)
    torch.manual_seed(0)
    encoder_inputs = {
        "t5": {"input_ids": torch.randint(4, 40, (2, 5)), "attention_mask": torch.tensor([[1] * 5, [1, 1, 1, 0, 0]])},
        "bart": {"input_ids": torch.randint(4, 40, (2, 5))},
        "whisper": {"input_features": torch.randn(2, 8, 20)},
    }
    models = {"t5": t5, "bart": BartForConditionalGeneration(tiny_bart_config()), "whisper": tiny_whisper()}
    assert decoder_input_ids_from_labels(models["whisper"], labels) is None
    for name, model in models.items():
        model.eval()
        batch = {**encoder_inputs[name], "labels": labels, "index": torch.tensor([0, 1])}
        with torch.no_grad():
            scores = objective.score(model, batch, hidden_layer=-1)
            reference = model(**encoder_inputs[name], labels=labels, output_hidden_states=True)
        mean_token_nll = -scores.token_logprobs.sum() / scores.mask.sum()
        torch.testing.assert_close(mean_token_nll, reference.loss, msg=name)
        torch.testing.assert_close(scores.logits, reference.logits, msg=name)
        torch.testing.assert_close(scores.hidden_states, reference.decoder_hidden_states[-1], msg=name)
        assert scores.mask.tolist() == [[True] * 4, [True, True, False, False]]


def test_qa_collator_layout(tokenizer):
    collator = Seq2SeqQACollator(tokenizer, max_length=64)
    rows = [{"question": "Who wrote it?", "answer": "Basil did.", "index": 4}, {"question": "Q", "answer": "A"}]
    rows[1]["index"] = 5
    batch = collator(rows)
    first_question = tokenizer("Who wrote it?")["input_ids"]
    first_answer = tokenizer("Basil did.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n_q, n_a = len(tokenizer("Q")["input_ids"]), len(tokenizer("A", add_special_tokens=False)["input_ids"]) + 1
    assert batch["input_ids"][0].tolist() == first_question
    assert batch["labels"][0].tolist() == first_answer
    assert batch["input_ids"][1, n_q:].eq(tokenizer.pad_token_id).all()
    assert batch["attention_mask"][1].tolist() == [1] * n_q + [0] * (len(first_question) - n_q)
    assert batch["labels"][1, n_a:].eq(-100).all() and batch["labels"][1, n_a - 1] == tokenizer.eos_token_id
    assert batch["index"].tolist() == [4, 5]
    with pytest.raises(ValueError, match="reads 'question'/'answer'"):
        collator([{"prompt": "x"}])


def test_speech_collator_bad_rows_and_lengths():
    collator = SpeechSeq2SeqCollator(pad_token_id=1)
    with pytest.raises(ValueError, match="Seq2SeqQACollator"):
        collator([{"question": "q", "answer": "a"}])
    rows = [
        {"input_features": [[0.0] * 4] * 2, "decoder_input_ids": [2, 7, 8], "labels": [-100, 8, 1]},
        {"input_features": [[1.0] * 4] * 2, "decoder_input_ids": [2, 7], "labels": [-100, 1]},
    ]
    batch = collator(rows)
    assert batch["decoder_input_ids"].tolist() == [[2, 7, 8], [2, 7, 1]]
    assert batch["labels"].tolist() == [[-100, 8, 1], [-100, 1, -100]]
    rows[1]["decoder_input_ids"] = [2]
    with pytest.raises(ValueError, match="as long as its labels"):
        collator(rows)


def test_peft_task_type_per_family(tokenizer):
    """PEFT's seq2seq wrapper passes input_ids to forward, which Whisper (input_features) cannot take twice."""
    objective = get_objective(None, tiny_t5(tokenizer))
    assert objective.peft_task_type == "SEQ_2_SEQ_LM"
    assert get_objective(None, tiny_whisper()).peft_task_type is None


# ---- behaviour: a T5 that learned TOFU authors forgets one ----


def answer_nll(model, collator, rows) -> float:
    model.eval()
    with torch.no_grad():
        return Seq2SeqObjective().score(model, collator(list(rows))).mean_nll.mean().item()


@pytest.fixture(scope="module")
def t5_authors(tokenizer, tofu_slice):
    """A tiny T5 trained on the questions of four TOFU authors (80 rows); (model, collator, forget, retain)."""
    forget, retain = tofu_slice
    rows = concatenate_datasets([forget, retain]).select_columns(["question", "answer", "author"])
    collator = Seq2SeqQACollator(tokenizer, max_length=MAX_LENGTH)
    data = [collator.tokenize(row) for row in rows]
    model = tiny_t5(tokenizer)
    objective = Seq2SeqObjective()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(order), 16):
            loss = objective.score(model, collator([data[i] for i in order[start : start + 16]])).mean_nll.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    by_author = rows.map(lambda author: {"forget": author == FORGET_AUTHOR}, input_columns="author")
    forget_rows = by_author.filter(lambda f: f, input_columns="forget").select_columns(["question", "answer"])
    retain_rows = by_author.filter(lambda f: not f, input_columns="forget").select_columns(["question", "answer"])
    return model.eval(), collator, forget_rows, retain_rows


@pytest.mark.parametrize(
    ("strategy", "use_peft", "lr", "epochs"),
    [("npo", True, 5e-3, 8), ("grad_diff", False, 5e-4, 6), ("undial", True, 5e-3, 8)],
)
def test_t5_forgets_one_tofu_author(tmp_path, tokenizer, t5_authors, strategy, use_peft, lr, epochs):
    trained, collator, forget, retain = t5_authors
    model = copy.deepcopy(trained)
    before_forget, before_retain = answer_nll(model, collator, forget), answer_nll(model, collator, retain)
    assert before_forget < 0.5 and before_retain < 0.5  # measured 0.27 / 0.28: the answers were learned
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        use_peft=use_peft,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=10,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        max_length=MAX_LENGTH,
    )
    # GradDiff relies on auto-detection: the T5 and its tokenizer give the seq2seq objective and the text collator
    explicit = Seq2SeqObjective(tokenizer, max_length=MAX_LENGTH) if strategy != "grad_diff" else None
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        objective=explicit,
    )
    assert trainer.model_objective.name == "seq2seq"
    if use_peft:
        assert type(trainer.model).__name__ == "PeftModelForSeq2SeqLM"
    trainer.train()
    after_forget, after_retain = (
        answer_nll(trainer.model, collator, forget),
        answer_nll(trainer.model, collator, retain),
    )
    # measured (nats per answer token): npo with LoRA forget 0.27 -> 2.81, retain 0.28 -> 0.30; grad_diff on the
    # full weights forget 0.27 -> 1.70, retain 0.28 -> 0.29; undial (reads the aligned decoder logits of the LoRA-off
    # reference) forget 0.27 -> 1.83, retain 0.28 -> 0.23
    assert after_forget > 5 * before_forget, (strategy, before_forget, after_forget)
    assert after_retain < before_retain + 0.15, (strategy, before_retain, after_retain)
