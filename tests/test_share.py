"""Sharing a run: `UnlearningTrainer.push_to_hub` and `erasus-hf push [--merge]` against the local Hub-protocol server
(tests/hub_server.py) through the real huggingface_hub client; the card round-trips and carries no forget text."""

import io
import json

import pytest
from huggingface_hub import ModelCard
from safetensors.torch import load

from erasus_hf import UnlearningTrainer
from erasus_hf.cli import main
from erasus_hf.evaluation import MetricSuite

from .testing_utils import config, qa

TOKEN = "hf_testtoken123"


@pytest.fixture
def pushed(hub, tmp_path, tokenizer, tiny_llama, tofu_slice):
    """An NPO + LoRA run pushed with its evaluation; the base model saved beside (what --merge needs)."""
    tiny_llama.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    forget, retain = (qa(d) for d in tofu_slice)
    args = config(tmp_path, strategy="npo", use_peft=True, max_steps=2, learning_rate=1e-2)
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    trainer.train()
    evaluation = MetricSuite(["memorization"]).run(trainer.model, tokenizer, forget=forget.select(range(8)))
    url = trainer.push_to_hub("Unlearn two TOFU authors", repo_id="me/tiny-npo", token=TOKEN, evaluation=evaluation)
    return trainer, url


def test_trainer_pushes_adapter_card_and_evaluation(pushed, hub, tofu_slice):
    trainer, url = pushed
    files = hub.files("me/tiny-npo")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "eval.json"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    local = trainer.args.output_dir + "/adapter_model.safetensors"
    assert files["adapter_model.safetensors"] == open(local, "rb").read()
    card = ModelCard(files["README.md"].decode())
    assert {"erasus-hf", "unlearning", "npo"} <= set(card.data.tags) and card.data.library_name == "peft"
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    summary = json.loads(files["eval.json"])["summary"]
    assert values == pytest.approx(summary)
    text = b"".join(files.values()).decode("utf-8", errors="ignore")
    forget = tofu_slice[0]
    assert not any(q in text or a in text for q, a in zip(forget["question"], forget["answer"], strict=True))
    assert TOKEN not in text and "me/tiny-npo" in url


def test_cli_push_merged_model(pushed, hub, tmp_path, monkeypatch):
    trainer, _ = pushed
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the CLI takes the token from the environment or the saved login
    args = ["push", trainer.args.output_dir, "--repo-id", "me/tiny-npo-merged", "--merge", "--private"]
    code = main([*args, "--base_model", str(tmp_path / "base")])
    assert code == 0
    files = hub.files("me/tiny-npo-merged")
    assert "model.safetensors" in files and "adapter_model.safetensors" not in files
    assert hub.repos["me/tiny-npo-merged"].private
    merged = load(files["model.safetensors"])
    assert not any("lora" in key for key in merged)
    card = ModelCard(io.BytesIO(files["README.md"]).read().decode())
    assert card.data.library_name == "transformers" and "npo" in card.data.tags
