"""`erasus-hf unlearn`: YAML recipes with flag overrides, an offline run to an output folder, and a 2-process CPU run
(torchrun, gloo) that matches the single-process run with the same global batch."""

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from erasus_hf.cli import main
from erasus_hf.config import UnlearningConfig
from erasus_hf.scripts.parsing import make_parser, parse
from erasus_hf.scripts.unlearn import UnlearnArguments

from .testing_utils import ROOT, TINY_RECIPE


def _parser():
    return make_parser((UnlearnArguments, UnlearningConfig), "erasus-hf unlearn", "test")


def test_recipe_values_are_defaults_that_flags_override(tmp_path):
    script, config = parse(_parser(), ["--config", str(TINY_RECIPE), "--learning_rate", "5e-4"])
    recipe = yaml.safe_load(TINY_RECIPE.read_text())
    assert script.dataset == "demo" and config.strategy == "npo" and config.use_peft
    assert config.strategy_kwargs == {"beta": 0.1} and config.num_train_epochs == recipe["num_train_epochs"]
    assert config.learning_rate == 5e-4  # the flag wins


def test_unknown_recipe_keys_fail_with_the_valid_ones(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("strategy: npo\nlearning_rat: 1e-4\n")
    with pytest.raises(ValueError, match=r"Unknown keys in .*\['learning_rat'\]\. Valid keys: .*learning_rate"):
        parse(_parser(), ["--config", str(bad)])


def test_every_recipe_parses():
    for recipe in sorted((ROOT / "trainers" / "recipes").glob("*.yaml")):
        script, config = parse(_parser(), ["--config", str(recipe), "--bf16", "false"])  # no GPU here
        assert config.output_dir.startswith("outputs/") and config.strategy in recipe.read_text(), recipe


def _run_args(model, output, batch):
    return [
        "--config", str(TINY_RECIPE), "--model_name_or_path", str(model), "--num_retain_authors", "2",
        "--max_steps", "3", "--per_device_train_batch_size", str(batch), "--lora_dropout", "0",
        "--eval_max_examples", "4", "--output_dir", str(output), "--use_cpu", "--disable_tqdm", "true",
    ]  # fmt: skip


def test_recipe_runs_offline_to_an_output_folder(tmp_path, saved_model, tiny_llama):
    assert main(["unlearn", *_run_args(saved_model, tmp_path / "out", 4)]) == 0
    out = tmp_path / "out"
    assert {"adapter_model.safetensors", "adapter_config.json", "eval.json", "strategy.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(("lora_B" in k) and v.abs().max() > 0 for k, v in adapter.items())  # the adapter trained
    evaluation = json.loads((out / "eval.json").read_text())
    assert len(evaluation["per_example"]["tofu/forget_truth_ratio"]) == 4
    assert json.loads((out / "strategy.json").read_text())["name"] == "npo"
    card = ModelCard.load(out / "README.md")
    assert {"erasus-hf", "unlearning", "npo"} <= set(card.data.tags) and card.data.library_name == "peft"
    assert card.data.eval_results and "erasus-hf unlearn --config" in card.text


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, saved_model):
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run(
        [sys.executable, "-m", "erasus_hf.cli", "unlearn", *_run_args(saved_model, one, 4)],
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "erasus_hf.cli"]
    double = subprocess.run([*launch, "unlearn", *_run_args(saved_model, two, 2)], capture_output=True, text=True)
    assert double.returncode == 0, double.stderr[-3000:]
    fingerprints = dict(re.findall(r"\[rank (\d)\] trained weights sha256 (\w+)", double.stdout))
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]  # both ranks, same weights
    assert "policy wrapped as DistributedDataParallel" in double.stdout  # really data parallel
    assert re.findall(r"\[rank (\d)\] wrote", double.stdout) == ["0"]  # only rank 0 writes the output folder
    a, b = (load_file(d / "adapter_model.safetensors") for d in (one, two))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    e1, e2 = (json.loads((d / "eval.json").read_text()) for d in (one, two))
    for key, value in e1["summary"].items():
        assert e2["summary"][key] == pytest.approx(value, abs=1e-4), key


def test_a_frozen_copy_reference_is_not_wrapped_for_gradients_under_ddp(tmp_path, saved_model):
    """Full fine-tuning with a KL retain term: the reference is a frozen copy, prepared for evaluation only (not
    DistributedDataParallel, no trainable tensor) while the policy is wrapped."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "erasus_hf.cli"]
    args = [*_run_args(saved_model, tmp_path / "out", 2), "--use_peft", "false", "--retain_loss", "kl"]
    run = subprocess.run(
        [*launch, "unlearn", *args, "--reference", "copy", "--no_run_evaluation"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(re.findall(r"\[rank (\d)\] reference copy \((\w+), trainable tensors: (\d+)\)", run.stdout)) == [
        ("0", "LlamaForCausalLM", "0"),
        ("1", "LlamaForCausalLM", "0"),
    ]
    assert run.stdout.count("policy wrapped as DistributedDataParallel") == 2


def test_help_strategy_prints_the_hyperparameters_with_types_defaults_and_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--help-strategy", "npo"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "beta (float, default 0.1)" in out
    assert "Inverse temperature of the log-sigmoid" in out  # NPOConfig's help
    assert "https://arxiv.org/abs/2404.05868" in out and "Negative Preference Optimization" in out
    with pytest.raises(SystemExit):
        main(["unlearn", "--help"])
    assert "--help-strategy NAME" in capsys.readouterr().out


def test_help_strategy_of_an_unknown_name_is_one_error_line_with_the_closest_name(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--help-strategy", "npx"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("erasus-hf: error: Unknown strategy 'npx'")
    assert "did you mean 'npo'?" in err
