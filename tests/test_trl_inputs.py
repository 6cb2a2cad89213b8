"""The trainer's inputs as a TRL user passes them (issue 17): `eval_dataset` as one dataset (the forget side), a
`DatasetDict` refused before any compute with the split to pass, `model_init_kwargs` honoured for a model id or path
(dtype, attention implementation, remote code, quantization config) and refused for a model object, and a plain
`TrainingArguments` converted to `UnlearningConfig` with a warning."""

import json

import pytest
import torch
from datasets import DatasetDict
from transformers import TrainingArguments

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.evaluation import answer_nll

from .testing_utils import config, nll, qa

# ---- eval_dataset: one dataset is the forget side


@pytest.mark.parametrize("as_rows", [False, True], ids=["Dataset", "list of rows"])
def test_eval_dataset_as_one_dataset_is_the_eval_forget_side(tmp_path, tokenizer, tiny_llama, tofu_slice, as_rows):
    """Before: `TypeError: unhashable type: 'dict'` (a Dataset read as the {'forget', 'retain'} dict)."""
    forget, retain = (qa(d) for d in tofu_slice)
    train_forget, eval_forget = forget.select(range(20)), forget.select(range(20, 36))
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="npo"),
        forget_dataset=train_forget,
        retain_dataset=retain,
        processing_class=tokenizer,
        eval_dataset=eval_forget.to_list() if as_rows else eval_forget,
    )
    assert len(trainer.eval_dataset) == 16
    assert trainer.reference.logprobs.shape[0] == 36  # the eval rows have their own cache entries
    metrics = trainer.evaluate()
    expected = answer_nll(tiny_llama, tokenizer, eval_forget["question"], eval_forget["answer"]).mean().item()
    assert metrics["eval_forget_nll"] == pytest.approx(expected, rel=1e-5)
    # paired with the training retain set
    assert metrics["eval_retain_nll"] == pytest.approx(nll(tiny_llama, tokenizer, retain), rel=0.25)


def test_eval_dataset_dict_of_forget_and_retain_splits_is_read_as_the_sides(
    tmp_path, tokenizer, tiny_llama, tofu_slice
):
    forget, retain = (qa(d) for d in tofu_slice)
    eval_forget = forget.select(range(20, 36))
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="ga", retain_loss="none"),
        forget_dataset=forget.select(range(20)),
        processing_class=tokenizer,
        eval_dataset=DatasetDict({"forget": eval_forget, "retain": retain.select(range(8))}),
    )
    metrics = trainer.evaluate()
    expected = answer_nll(tiny_llama, tokenizer, eval_forget["question"], eval_forget["answer"]).mean().item()
    assert metrics["eval_forget_nll"] == pytest.approx(expected, rel=1e-5)
    assert "eval_retain_nll" in metrics


# ---- DatasetDict: pass one split, before any compute


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if the trainer loads the model (a refused run must cost nothing)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was refused")

    monkeypatch.setattr("erasus_hf.trainer.load_causal_lm", refuse)


@pytest.mark.parametrize(
    ("side", "argument"),
    [("forget", "forget_dataset"), ("retain", "retain_dataset"), ("eval", "eval_dataset")],
)
def test_a_dataset_dict_says_pass_dataset_train(
    tmp_path, tokenizer, saved_model, tofu_slice, no_model_loading, side, argument
):
    """Before: the first split was suggested (`dataset['validation']`), and for eval_dataset a bare "eval_dataset
    must be {'forget': ...}" after both sides were tokenized."""
    forget, retain = (qa(d) for d in tofu_slice)
    splits = DatasetDict({"validation": forget.select(range(4)), "train": forget.select(range(4, 8))})
    sides = {"forget": forget, "retain": retain, "eval": None, side: splits}
    message = (
        rf"is a DatasetDict with splits \['validation', 'train'\]; pass one split, e.g. {argument}=dataset\['train'\]"
    )
    with pytest.raises(ValueError, match=message):
        UnlearningTrainer(
            str(saved_model),
            config(tmp_path, strategy="npo"),
            forget_dataset=sides["forget"],
            retain_dataset=sides["retain"],
            eval_dataset=sides["eval"],
        )


# ---- model_init_kwargs


def test_model_init_kwargs_load_the_model_in_bfloat16_with_eager_attention(tmp_path, saved_model, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    kwargs = {"dtype": "bfloat16", "attn_implementation": "eager"}
    trainer = UnlearningTrainer(
        str(saved_model),
        config(tmp_path, strategy="ga", retain_loss="none", model_init_kwargs=kwargs),
        forget_dataset=forget.select(range(8)),
    )
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert trainer.model.config._attn_implementation == "eager"
    # without them: the checkpoint's float32 and the default (sdpa) attention
    plain = UnlearningTrainer(
        str(saved_model), config(tmp_path, strategy="ga", retain_loss="none"), forget_dataset=forget.select(range(8))
    )
    assert {p.dtype for p in plain.model.parameters()} == {torch.float32}
    assert plain.model.config._attn_implementation != "eager"


def test_model_init_kwargs_from_the_command_line_are_json(tmp_path):
    args = UnlearningConfig(output_dir=str(tmp_path), model_init_kwargs='{"dtype": "float16", "revision": "main"}')
    assert args.model_init_kwargs == {"dtype": "float16", "revision": "main"}
    assert json.loads(args.to_json_string())["model_init_kwargs"] == {"dtype": "float16", "revision": "main"}
    assert UnlearningConfig(
        output_dir=str(tmp_path), model_init_kwargs={"dtype": torch.bfloat16}
    ).model_init_kwargs == {"dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"model_init_kwargs\['dtype'\] must be one of \('auto', 'bfloat16'"):
        UnlearningConfig(output_dir=str(tmp_path), model_init_kwargs={"dtype": "bf16"})


CUSTOM_MODELING = """from transformers import LlamaForCausalLM


class CustomLlama(LlamaForCausalLM):
    pass
"""


def test_trust_remote_code_loads_the_model_code_shipped_in_the_folder(tmp_path, saved_model, tofu_slice):
    (saved_model / "modeling_custom.py").write_text(CUSTOM_MODELING)
    config_path = saved_model / "config.json"
    model_config = json.loads(config_path.read_text())
    model_config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLlama"}
    config_path.write_text(json.dumps(model_config))
    forget = qa(tofu_slice[0]).select(range(8))
    args = config(tmp_path, strategy="ga", retain_loss="none", model_init_kwargs={"trust_remote_code": True})
    trainer = UnlearningTrainer(str(saved_model), args, forget_dataset=forget)
    assert type(trainer.model).__name__ == "CustomLlama"


def test_quantization_config_dict_without_a_method_is_refused_before_loading(tmp_path, saved_model, tofu_slice):
    args = config(tmp_path, strategy="ga", retain_loss="none", model_init_kwargs={"quantization_config": {"bits": 4}})
    assert json.loads(args.to_json_string())["model_init_kwargs"] == {"quantization_config": {"bits": 4}}
    with pytest.raises(ValueError, match=r"quantization_config'\] = \{'bits': 4\} names no quantization method"):
        UnlearningTrainer(str(saved_model), args, forget_dataset=qa(tofu_slice[0]).select(range(8)))


def test_model_init_kwargs_with_a_model_object_are_refused(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """They would be silently ignored: the object's dtype is already set."""
    args = config(tmp_path, strategy="ga", retain_loss="none", model_init_kwargs={"dtype": "bfloat16"})
    with pytest.raises(
        ValueError, match=r"model_init_kwargs \(\['dtype'\]\) apply when the model is given as a model id"
    ):
        UnlearningTrainer(tiny_llama, args, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer)


# ---- a plain TrainingArguments


def test_training_arguments_are_converted_with_a_warning(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """Before: `TypeError: args must be an UnlearningConfig`."""
    forget, retain = (qa(d).select(range(16)) for d in tofu_slice)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        learning_rate=1e-3,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        hub_token="hf_training_arguments_token",
        seed=0,
    )
    before = nll(tiny_llama, tokenizer, forget)
    with pytest.warns(UserWarning, match="converted to an UnlearningConfig .*strategy='npo'") as caught:
        trainer = UnlearningTrainer(
            tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
        )
    assert caught[0].filename == __file__  # attributed to the user's call
    assert type(trainer.args) is UnlearningConfig
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size) == (1e-3, 4)
    assert trainer.args.hub_token == "hf_training_arguments_token"  # not to_dict's "<HUB_TOKEN>" mask
    assert trainer.args.remove_unused_columns is False
    trainer.train()
    assert trainer.state.global_step == 4
    assert nll(tiny_llama, tokenizer, forget) > before  # NPO ran: the forget answers got less likely


def test_other_args_are_still_refused(tmp_path, tokenizer, tiny_llama, tofu_slice):
    with pytest.raises(TypeError, match="args must be an UnlearningConfig, got dict"):
        UnlearningTrainer(
            tiny_llama, {"output_dir": str(tmp_path)}, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer
        )
