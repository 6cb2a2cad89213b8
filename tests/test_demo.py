"""The main job: the offline demo meets its targets and writes a usable output folder; the CLI explains itself."""

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from erasus_hf.cli import main
from erasus_hf.data.tofu import demo_splits
from erasus_hf.demo import DemoArguments, run_demo
from erasus_hf.evaluation import answer_nll

from .testing_utils import ROOT


def test_demo_meets_its_targets_and_the_adapter_reloads(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(DemoArguments(output_dir=str(out), quiet=True))
    before, after = report["before"], report["after"]
    assert after["forget_nll"] >= 3 * before["forget_nll"]  # the target
    assert after["retain_nll"] < 2 * before["retain_nll"]
    assert report["reference"] == "cached" and report["strategy"]["beta"] == 0.1
    assert json.loads((out / "report.json").read_text())["after"] == after
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "unlearning_config.json",
        "starting_model/model.safetensors",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    # The adapter applies to the saved starting model and reproduces the reported forget NLL.
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "starting_model"), out)
    forget, _ = demo_splits()
    reloaded = answer_nll(model, tokenizer, forget["question"], forget["answer"]).mean().item()
    assert abs(reloaded - after["forget_nll"]) < 1e-3


def test_cli_help_documents_the_demo_options():
    result = subprocess.run(
        [sys.executable, "-m", "erasus_hf.cli", "demo", "--help"], capture_output=True, text=True, check=True
    )
    for option in ("--model_name_or_path", "--dataset", "--data_dir", "--strategy", "--output_dir"):
        assert option in result.stdout
    assert "already learned TOFU" in result.stdout


def test_cli_unknown_command_lists_the_commands(capsys):
    assert main(["unlearnify"]) == 2
    assert "demo" in capsys.readouterr().err


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in readme


def test_demo_reads_local_tofu_files_and_a_local_model(tmp_path, tokenizer, tiny_llama):
    """The online options, exercised offline: `--data_dir` with TOFU's split files and a model path."""
    from erasus_hf.data.tofu import shared_tofu_dir
    from erasus_hf.demo import _load_data
    from erasus_hf.modeling.loading import starting_model

    data_dir = shared_tofu_dir()
    if data_dir is None:
        pytest.skip("../shared/data/tofu (the full TOFU splits) is not beside this checkout")
    forget, retain = _load_data(DemoArguments(data_dir=str(data_dir), forget_split="forget05"))
    assert (len(forget), len(retain)) == (200, 400) and "perturbed_answer" in forget.column_names
    tiny_llama.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, loaded_tokenizer = starting_model(str(tmp_path / "m"), forget, retain, str(tmp_path / "out"))
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size
    assert all(torch.equal(p, model.get_parameter(n)) for n, p in tiny_llama.named_parameters())
