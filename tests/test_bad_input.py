"""Bad input gets a clear error, before training, and loses nothing."""

import copy
import logging
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.modeling.tiny import build_tiny_llama

from .testing_utils import config, qa


def test_empty_forget_set(tmp_path, tokenizer, tiny_llama):
    with pytest.raises(ValueError, match="forget set is empty"):
        UnlearningTrainer(tiny_llama, config(tmp_path, strategy="ga"), forget_dataset=[], processing_class=tokenizer)


def test_empty_retain_set(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(ValueError, match="retain set is empty"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="grad_diff"),
            forget_dataset=qa(tofu_slice[0]),
            retain_dataset=[],
            processing_class=tokenizer,
        )


def test_missing_retain_set_for_a_retain_strategy(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(ValueError, match="needs a retain_dataset"):
        UnlearningTrainer(
            tiny_llama, config(tmp_path, strategy="npo"), forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer
        )
    # retain_loss="none" is pure NPO: no retain set needed
    UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="npo", retain_loss="none"),
        forget_dataset=qa(tofu_slice[0]),
        processing_class=tokenizer,
    )


def test_unknown_strategy_through_the_trainer(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(ValueError, match=r"valid strategies: .*grad_diff, .*npo, .*simnpo"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="unlearn_harder"),
            forget_dataset=qa(tofu_slice[0]),
            processing_class=tokenizer,
        )


def test_reference_modes_that_cannot_work(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    cases = [
        (dict(strategy="npo", reference="none"), "needs a reference model"),
        (dict(strategy="npo", reference="adapter"), "needs a PEFT model"),
        (dict(strategy="grad_diff", retain_loss="kl", reference="cached"), "cannot give"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            UnlearningTrainer(
                tiny_llama,
                config(tmp_path, **kwargs),
                forget_dataset=forget,
                retain_dataset=retain,
                processing_class=tokenizer,
            )


def test_bad_config_values(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        config(tmp_path, strategy_kwargs="{beta: 0.1")
    with pytest.raises(ValueError, match="retain_loss must be one of"):
        config(tmp_path, retain_loss="mse")


def test_overlap_warns_with_count(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    mixed = retain.select(range(30)).to_list() + forget.select(range(3)).to_list()
    with pytest.warns(UserWarning, match="3 forget example"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="grad_diff"),
            forget_dataset=forget,
            retain_dataset=mixed,
            processing_class=tokenizer,
        )


def test_tokenizer_without_pad_token_uses_eos(tmp_path, tokenizer, tiny_llama, tofu_slice, caplog):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    with caplog.at_level(logging.WARNING):
        trainer = UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="ga", max_steps=1),
            forget_dataset=qa(tofu_slice[0]),
            processing_class=no_pad,
        )
    assert "using its EOS token" in caplog.text and no_pad.pad_token_id == no_pad.eos_token_id
    batch = next(iter(trainer.get_train_dataloader()))["forget"]
    ends = batch["attention_mask"].sum(1) - 1  # the answer's closing EOS is still scored although pad == eos
    assert all(batch["labels"][i, ends[i]] == no_pad.eos_token_id for i in range(len(ends)))
    no_pad.pad_token, no_pad.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        UnlearningTrainer(
            tiny_llama, config(tmp_path, strategy="ga"), forget_dataset=qa(tofu_slice[0]), processing_class=no_pad
        )


def test_examples_without_answer_tokens(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(ValueError, match="no scored token left"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="ga", max_length=6),
            forget_dataset=qa(tofu_slice[0]),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match=r"rows \[0\]"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="ga"),
            forget_dataset=[{"input_ids": [1, 5, 6], "labels": [-100, -100, -100]}],
            processing_class=tokenizer,
        )


def test_reference_with_another_vocabulary(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    other = build_tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    other.resize_token_embeddings(len(tokenizer) + 8)
    with pytest.raises(ValueError, match="vocabulary"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="npo"),
            forget_dataset=forget,
            retain_dataset=retain,
            ref_model=other,
            processing_class=tokenizer,
        )


def test_non_causal_model_for_the_causal_objective(tmp_path, tokenizer, tofu_slice):
    classifier = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    with pytest.raises(
        ValueError, match="needs a decoder-only \\*ForCausalLM model, got LlamaForSequenceClassification"
    ):
        UnlearningTrainer(
            classifier,
            config(tmp_path, strategy="ga"),
            forget_dataset=qa(tofu_slice[0]),
            processing_class=tokenizer,
            objective="causal_lm",
        )


def test_non_finite_loss_stops_training_and_saves_nothing(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with torch.no_grad():
        tiny_llama.lm_head.weight[0, 0] = math.inf
    args = config(tmp_path, strategy="ga", max_steps=3, save_strategy="steps", save_steps=1)
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer.train()
    out = tmp_path / "out"
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_save_refuses_non_finite_weights(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = UnlearningTrainer(
        tiny_llama, config(tmp_path, strategy="ga"), forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer
    )
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        trainer.save_model()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_args_must_be_an_unlearning_config(tokenizer, tiny_llama, tofu_slice):
    """Issue 17: a plain `TrainingArguments` is converted with a warning, as TRL converts to its configs
    (tests/test_trl_inputs.py); anything else is still refused."""
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="UnlearningConfig"):
        UnlearningTrainer(
            tiny_llama, {"output_dir": "x"}, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer
        )
    assert isinstance(UnlearningConfig(output_dir="x"), TrainingArguments)
