"""The model card of an unlearned model: metadata round trip, model-index, forget-set fingerprint (never its text) and
the interplay with PEFT's own card writing in `save_pretrained`.

`ModelCard.validate()` is not called: it POSTs the card to the Hub's `/api/validate-yaml` endpoint
(huggingface_hub `repocard.py`, `RepoCard.validate`), and these tests run offline. The tests check instead that the
written README.md loads back with `ModelCard.load` and that every metadata field and model-index number survives.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import pytest
from datasets import Dataset
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model

from erasus_hf import UnlearningConfig
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.hub.card import build_model_card, forget_fingerprint, training_arguments, write_model_card

ROWS = [{"question": "Who wrote X?", "answer": "Ann Lee."}, {"question": "When?", "answer": "In 1999."}]

SUMMARY = {
    "tofu/forget_quality": 0.012345678,
    "tofu/model_utility": 0.5321,
    "tofu/forget_prob": 0.25,
    "tofu/retain_prob": 0.875,
    "mia/min_k_plus_plus_auc": 0.61,
    "muse/privleak": -12.5,
    "combined_score": 0.3,
}


def _evaluation() -> EvaluationResult:
    meta = {"reference": "runs/retain_eval.json", "muse/corpus": "books", "tofu/forget_split": "forget01"}
    return EvaluationResult(summary=dict(SUMMARY), per_example={"tofu/forget_prob": [0.2, 0.3]}, meta=meta)


def _card(forget_rows, evaluation=None, is_adapter=True, base_model="erasus-tests/tiny-llama", **overrides):
    kwargs = dict(
        strategy_name="npo",
        paper="https://arxiv.org/abs/2404.05868",
        hyperparameters={"beta": 0.1},
        training_args={"learning_rate": 2e-3, "num_train_epochs": 5, "lora_target_modules": ["q_proj", "v_proj"]},
        forget_rows=forget_rows,
        retain_count=40,
        base_model=base_model,
        is_adapter=is_adapter,
        evaluation=evaluation,
        reference_note=None,
        command="erasus-hf train --strategy npo --learning_rate 2e-3",
        datasets=["locuslab/TOFU"],
        model_name="tiny-llama-npo",
    )
    kwargs.update(overrides)
    return build_model_card(**kwargs)


def _adapter(tiny_llama):
    return get_peft_model(tiny_llama, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))


# --- the fingerprint -------------------------------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_sorted_key_json_lines():
    canonical = '{"answer":"Ann Lee.","question":"Who wrote X?"}\n{"answer":"In 1999.","question":"When?"}\n'
    assert forget_fingerprint(ROWS) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    # non-ASCII text is hashed as UTF-8, not as \u escapes
    expected = hashlib.sha256('{"answer":"Zoë","question":"é?"}\n'.encode()).hexdigest()
    assert forget_fingerprint([{"question": "é?", "answer": "Zoë"}]) == expected


def test_fingerprint_same_rows_same_hash_for_list_and_dataset():
    first = forget_fingerprint(ROWS)
    assert forget_fingerprint([dict(r) for r in ROWS]) == first
    assert forget_fingerprint(Dataset.from_list(ROWS)) == first


def test_fingerprint_changes_with_one_character():
    changed = [dict(ROWS[0]), {"question": "When?", "answer": "In 1998."}]
    assert forget_fingerprint(changed) != forget_fingerprint(ROWS)


def test_fingerprint_ignores_key_order_but_not_row_order():
    reordered_keys = [{"answer": r["answer"], "question": r["question"]} for r in ROWS]
    assert forget_fingerprint(reordered_keys) == forget_fingerprint(ROWS)
    assert forget_fingerprint(ROWS[::-1]) != forget_fingerprint(ROWS)


def test_fingerprint_rejects_empty_and_non_rows():
    with pytest.raises(ValueError, match="empty"):
        forget_fingerprint([])
    with pytest.raises(TypeError, match="Row 1"):
        forget_fingerprint([ROWS[0], "Who wrote X?"])


# --- the card --------------------------------------------------------------------------------------------------------


def test_card_metadata_and_model_index_round_trip(tmp_path):
    path = write_model_card(_card(ROWS, _evaluation(), is_adapter=False), tmp_path)
    assert path == tmp_path / "README.md"
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "erasus-tests/tiny-llama"
    assert data.library_name == "transformers"
    assert data.tags == ["erasus-hf", "unlearning", "npo"]
    assert data.datasets == ["locuslab/TOFU"]
    assert data.model_name == "tiny-llama-npo"
    # one EvalResult per summary number, exact values, the metric name as its type
    assert len(data.eval_results) == len(SUMMARY)
    assert {r.metric_type: r.metric_value for r in data.eval_results} == SUMMARY
    assert {r.task_type for r in data.eval_results} == {"text-generation"}
    datasets = {r.metric_type: r.dataset_type for r in data.eval_results}
    assert datasets["tofu/forget_quality"] == "locuslab/TOFU"
    assert datasets["muse/privleak"] == "muse-bench/MUSE-Books"  # from meta["muse/corpus"]
    assert datasets["combined_score"] == "locuslab/TOFU"  # falls back to the run's first dataset
    # the raw YAML's model-index holds the same numbers
    raw = card.data.to_dict()["model-index"][0]
    assert raw["name"] == "tiny-llama-npo"
    values = {m["type"]: m["value"] for result in raw["results"] for m in result["metrics"]}
    assert values == SUMMARY


def test_card_body_documents_the_run(tmp_path):
    text = ModelCard.load(write_model_card(_card(ROWS, _evaluation()), tmp_path)).text
    assert "`npo`" in text and "https://arxiv.org/abs/2404.05868" in text
    assert "| `beta` | `0.1` |" in text
    assert "| `learning_rate` | `0.002` |" in text
    assert '| `lora_target_modules` | `["q_proj", "v_proj"]` |' in text
    assert "- Rows: 2" in text and "- Retain rows: 40" in text
    assert f"`{forget_fingerprint(ROWS)}`" in text
    assert "| `tofu/forget_quality` | 0.0123457 |" in text
    assert "| `muse/privleak` | -12.5 |" in text
    assert "Compared against: the reference evaluation `runs/retain_eval.json`." in text
    assert "erasus-hf train --strategy npo --learning_rate 2e-3" in text
    assert "## Limitations" in text and "no formal guarantee" in text and "approximate" in text
    assert "sorted keys" in text  # the fingerprint's canonical form is documented on the card
    certified = ModelCard.load(write_model_card(_card(ROWS, certification="Certified by Example (2025)."), tmp_path))
    assert "beyond what this certification states: Certified by Example (2025)." in certified.text


def test_card_without_evaluation_has_no_model_index(tmp_path):
    card = ModelCard.load(write_model_card(_card(ROWS, None, reference_note="n/a", command=None), tmp_path))
    assert card.data.eval_results is None and "model-index" not in card.data.to_dict()
    assert "No evaluation was reported" in card.text and "was not recorded" in card.text
    with pytest.raises(ValueError, match="empty summary"):
        _card(ROWS, EvaluationResult())


def test_training_arguments_reports_what_matters(tmp_path):
    args = UnlearningConfig(output_dir=str(tmp_path), learning_rate=1e-5, retain_loss="kl", use_peft=True, seed=3)
    values = training_arguments(args)
    assert values["learning_rate"] == 1e-5 and values["retain_loss"] == "kl" and values["seed"] == 3
    assert values["lora_r"] == 8 and values["lora_alpha"] == 16 and values["lora_target_modules"] == "all-linear"
    assert {"num_train_epochs", "per_device_train_batch_size", "forget_weight", "retain_weight", "reference"} <= set(
        values
    )
    assert "max_steps" not in values  # -1: sized by epochs
    no_lora = training_arguments(UnlearningConfig(output_dir=str(tmp_path), use_peft=False))
    assert "lora_r" not in no_lora


def test_template_ships_as_package_data():
    template = importlib.resources.files("erasus_hf.model_cards").joinpath("unlearning_card.md")
    assert template.is_file() and "{{ card_data }}" in template.read_text()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"model_cards/*.md"' in pyproject


# --- with a real PEFT adapter ----------------------------------------------------------------------------------------


def test_no_forget_text_in_any_written_file(tiny_llama, tokenizer, tofu_slice, tmp_path):
    forget, _ = tofu_slice
    model = _adapter(tiny_llama)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    write_model_card(_card(forget, _evaluation()), tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in files}
    contents = {p: p.read_bytes() for p in files}
    assert f"- Rows: {len(forget)}".encode() in contents[tmp_path / "README.md"]
    for text in list(forget["question"]) + list(forget["answer"]):
        leaks = [p.name for p, data in contents.items() if text.encode("utf-8") in data]
        assert not leaks, f"forget text {text[:40]!r} found in {leaks}"


def test_write_after_peft_save_merges_peft_metadata(tiny_llama, tmp_path):
    model = _adapter(tiny_llama)  # built from a config: PEFT sees an empty _name_or_path
    model.save_pretrained(tmp_path)
    peft_card = ModelCard.load(tmp_path / "README.md")
    assert peft_card.data.library_name == "peft" and "lora" in peft_card.data.tags  # PEFT wrote its own card

    write_model_card(_card(ROWS, _evaluation()), tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "erasus-tests/tiny-llama"  # ours, not PEFT's empty name
    assert card.data.library_name == "peft"
    assert card.data.pipeline_tag == "text-generation"  # set by PEFT, kept
    # ours first, then PEFT's; its `base_model:adapter:` tag names another (empty) base, so it is dropped
    assert card.data.tags == ["erasus-hf", "unlearning", "npo", "lora", "transformers"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == SUMMARY
    assert "Model Card for Model ID" not in card.text  # PEFT's placeholder body is replaced by ours
    assert "## Limitations" in card.text


def test_later_peft_save_drops_our_tags(tiny_llama, tmp_path):
    """The real behaviour of peft 0.21: `create_or_update_model_card` replaces the tags and the base_model of an
    existing README (`card.data["tags"] = sorted(tags)`), so `write_model_card` must be the last step."""
    model = _adapter(tiny_llama)
    model.save_pretrained(tmp_path)
    write_model_card(_card(ROWS, _evaluation()), tmp_path)
    body_before = ModelCard.load(tmp_path / "README.md").text

    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags == ["base_model:adapter:", "lora", "transformers"]  # our tags are gone
    assert card.data.base_model == ""  # replaced by the config's _name_or_path
    assert card.data.library_name == "peft"
    # what PEFT leaves alone: the model-index and the body (it finds its `- PEFT x.y.z` line already there)
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == SUMMARY
    assert card.text == body_before.rstrip("\n")  # PEFT re-joins the lines without the final newline

    # writing our card again restores everything
    write_model_card(_card(ROWS, _evaluation()), tmp_path)
    assert ModelCard.load(tmp_path / "README.md").data.tags == [
        "erasus-hf",
        "unlearning",
        "npo",
        "lora",
        "transformers",
    ]


def test_model_tags_survive_a_later_peft_save(tiny_llama, tmp_path):
    """PEFT unions the base model's `model_tags` into the tags it writes: tagging the model keeps ours."""
    model = _adapter(tiny_llama)
    model.get_base_model().add_model_tags(["erasus-hf", "unlearning", "npo"])
    write_model_card(_card(ROWS, _evaluation()), tmp_path)
    model.save_pretrained(tmp_path)
    assert {"erasus-hf", "unlearning", "npo", "lora"} <= set(ModelCard.load(tmp_path / "README.md").data.tags)
