"""The model card users see (issue 17): `base_model` only for a Hub id (TRL's rule), the card written by every save
(`save_model` and each checkpoint, inside the staged save) and `create_model_card(model_name=, dataset_name=, tags=)`
honoured, with the starting model's training tags (TRL's `trl`, `sft`) left out."""

from __future__ import annotations

import os

import pytest
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from erasus_hf import UnlearningTrainer
from erasus_hf.hub import sharing
from erasus_hf.hub.card import build_model_card, hub_model_id

from .testing_utils import config, qa, snapshot

ROWS = [{"question": "Who wrote X?", "answer": "Ann Lee."}]


def trainer_for(tmp_path, tokenizer, model, tofu_slice, **kwargs) -> UnlearningTrainer:
    args = config(tmp_path, **{"strategy": "ga", "max_steps": 1, "use_peft": True, **kwargs})
    return UnlearningTrainer(model, args, forget_dataset=qa(tofu_slice[0]), processing_class=tokenizer)


def card_of(folder) -> ModelCard:
    return ModelCard.load(os.path.join(folder, "README.md"))


def is_ours(card: ModelCard) -> bool:
    return "## Limitations" in card.text and "Model Card for Model ID" not in card.text


# ---- 1. base_model only when it is a Hub id -----------------------------------------------------------------------


def test_hub_model_id_follows_trls_rule(tmp_path, monkeypatch):
    assert hub_model_id("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert hub_model_id("gpt2") == "gpt2"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    for not_an_id in ("", None, "/home/me/models/llama", "./llama", "~/llama", "my-model", "a/b/c", "C:\\models\\x"):
        assert hub_model_id(not_an_id) is None, not_an_id
    assert hub_model_id(str(tmp_path / "my-model")) is None


def test_a_local_starting_model_gets_no_base_model_and_no_broken_link(tmp_path, tokenizer, tiny_llama, tofu_slice):
    tiny_llama.save_pretrained(tmp_path / "my-base")
    local = AutoModelForCausalLM.from_pretrained(tmp_path / "my-base")
    assert os.path.isabs(local.config._name_or_path)  # what PEFT writes as base_model today
    trainer = trainer_for(tmp_path, tokenizer, local, tofu_slice)
    trainer.save_model()
    trainer.create_model_card()
    card = card_of(trainer.args.output_dir)
    assert "base_model" not in card.data.to_dict()
    assert not [t for t in card.data.tags if t.startswith("base_model:")]  # PEFT's `base_model:adapter:/...`
    assert "huggingface.co//" not in card.content and str(tmp_path) not in card.content
    assert "from the local model `my-base`." in card.text


def test_a_hub_starting_model_is_the_base_model_with_its_link(tmp_path, tokenizer, tiny_llama, tofu_slice):
    tiny_llama.config._name_or_path = tiny_llama.name_or_path = "erasus-tests/tiny-llama"  # as from_pretrained sets
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()
    trainer.create_model_card()
    card = card_of(trainer.args.output_dir)
    assert card.data.base_model == "erasus-tests/tiny-llama"
    assert "base_model:adapter:erasus-tests/tiny-llama" in card.data.tags  # PEFT's, right for this adapter
    assert "(https://huggingface.co/erasus-tests/tiny-llama)" in card.text


def test_build_model_card_with_a_path_names_the_model_without_a_link():
    card = build_model_card(
        strategy_name="npo",
        paper="p",
        hyperparameters={},
        training_args={},
        forget_rows=ROWS,
        retain_count=None,
        base_model="/home/me/models/llama-3",
        is_adapter=False,
        evaluation=None,
        reference_note=None,
        command=None,
        datasets=None,
        model_name=None,
    )
    assert card.data.base_model is None and "/home/me" not in card.content
    assert "from the local model `llama-3`." in card.text and "# llama-3-unlearned-npo" in card.text


# ---- 2. written by every save, inside the staged save -------------------------------------------------------------


def test_save_model_writes_our_card(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()  # no create_model_card() call
    card = card_of(trainer.args.output_dir)
    assert is_ours(card) and {"erasus-hf", "unlearning", "ga"} <= set(card.data.tags)
    assert card.data.library_name == "peft"


def test_every_checkpoint_holds_our_card(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = trainer_for(
        tmp_path, tokenizer, tiny_llama, tofu_slice, max_steps=2, save_strategy="steps", save_steps=1
    )
    trainer.train()
    for step in (1, 2):
        card = card_of(os.path.join(trainer.args.output_dir, f"checkpoint-{step}"))
        assert is_ours(card) and "ga" in card.data.tags, step


def test_the_card_is_part_of_the_staged_save(tmp_path, tokenizer, tiny_llama, tofu_slice, monkeypatch):
    """A save interrupted while it writes the card leaves the folder exactly as it was: the card is written in the
    staging folder, with the weights, not after them."""
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    out = trainer.args.output_dir
    trainer.save_model()
    before = snapshot(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    trainer.args.learning_rate = 5e-3  # the next save's files differ
    with monkeypatch.context() as mp:
        mp.setattr(sharing, "write_model_card", interrupted)
        with pytest.raises(KeyboardInterrupt):
            trainer.save_model()
    assert snapshot(out) == before
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_the_card_arguments_hold_for_later_saves_and_no_secret_is_written(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()
    trainer.create_model_card(tags=["mine"], command="erasus-hf unlearn --hub_token hf_secretsecret123 --strategy ga")
    trainer.save_model()
    card = card_of(trainer.args.output_dir)
    assert "mine" in card.data.tags and "erasus-hf unlearn" in card.text
    assert "hf_secretsecret123" not in card.content


# ---- 3. create_model_card's arguments; the starting model's tags are not ours ---------------------------------------


def test_create_model_card_honours_model_name_dataset_name_and_tags(tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()
    trainer.create_model_card(model_name="tiny-forgetful", dataset_name="locuslab/TOFU", tags=["tofu", "demo"])
    card = card_of(trainer.args.output_dir)
    assert "# tiny-forgetful\n" in card.text
    assert card.data.datasets == ["locuslab/TOFU"] and "- Datasets: `locuslab/TOFU`" in card.text
    assert card.data.tags[:5] == ["erasus-hf", "unlearning", "ga", "tofu", "demo"]
    trainer.create_model_card(tags="single")
    assert "single" in card_of(trainer.args.output_dir).data.tags


def test_the_starting_models_training_tags_are_not_inherited(tmp_path, tokenizer, tiny_llama, tofu_slice):
    tiny_llama.add_model_tags(["trl", "sft"])  # what SFTTrainer leaves on the model it trained
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()
    trainer.create_model_card()
    tags = card_of(trainer.args.output_dir).data.tags
    assert "trl" not in tags and "sft" not in tags
    assert {"erasus-hf", "unlearning", "ga", "lora"} <= set(tags)


def test_a_merged_model_has_no_adapter_tag(tmp_path, tokenizer, tiny_llama, tofu_slice):
    tiny_llama.config._name_or_path = "erasus-tests/tiny-llama"
    trainer = trainer_for(tmp_path, tokenizer, tiny_llama, tofu_slice, merge_adapter=True)
    trainer.save_model()
    card = card_of(trainer.args.output_dir)
    assert card.data.library_name == "transformers" and card.data.base_model == "erasus-tests/tiny-llama"
    assert not [t for t in card.data.tags if t.startswith("base_model:adapter:")]


def test_image_and_tensor_rows_have_a_content_fingerprint():
    """The card is written at every save now, so vision rows (tensors, PIL images) must fingerprint too: a tensor as
    its values, an image by its mode, size and pixels; before, json.dumps raised TypeError on them."""
    import torch
    from PIL import Image

    from erasus_hf.data.fingerprint import forget_fingerprint

    pixels = torch.arange(6.0).reshape(2, 3)
    assert forget_fingerprint([{"pixel_values": pixels, "labels": 1}]) == forget_fingerprint(
        [{"pixel_values": pixels.tolist(), "labels": 1}]
    )
    black, white = Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 255)
    assert forget_fingerprint([{"image": black}]) == forget_fingerprint([{"image": Image.new("L", (4, 4), 0)}])
    assert forget_fingerprint([{"image": black}]) != forget_fingerprint([{"image": white}])
    with pytest.raises(TypeError, match="no canonical form"):
        forget_fingerprint([{"value": object()}])
