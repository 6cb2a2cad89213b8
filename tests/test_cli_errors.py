"""`erasus-hf` on a user's mistakes and at the end of a run: a mistyped flag, an unknown strategy or one that does not
serve the command's model family end in one `erasus-hf: error:` line with exit status 2 (no usage block, no
traceback); `--help` shows the unlearning options before the inherited `TrainingArguments`; a run ends with its final
metrics on stdout; LoRA runs do not print PEFT's `is_gradient_checkpointing` FutureWarning."""

import json
import subprocess
import sys

import pytest

from erasus_hf.cli import main

from .testing_utils import TINY_RECIPE


def _error_line(capsys, argv: list[str]) -> str:
    """Run `erasus-hf ARGV`, check that it exits 2, and return its stderr, checked to be one `erasus-hf: error:`
    line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("erasus-hf: error: "), err
    return err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["unlearn", "--lerning_rate", "1e-4"], "--lerning_rate (did you mean --learning_rate?)"),
        (["unlearn", "--stratgy_kwargs={}"], "--stratgy_kwargs (did you mean --strategy_kwargs?)"),
        (["evaluate", "--model", "m", "--benchmarks", "tofu"], "--benchmarks (did you mean --benchmark?)"),
        (["push", "out", "--repo_id", "me/x", "--privte"], "--privte (did you mean --private?)"),
    ],
)
def test_an_unknown_flag_is_one_line_with_the_closest_option(capsys, argv, hint):
    assert hint in _error_line(capsys, argv)


def test_an_unknown_flag_names_the_flag_never_its_value(capsys):
    err = _error_line(capsys, ["unlearn", "--hub_tokn", "hf_abcdefghijklmnopqrstuvwxyz0123"])
    assert "--hub_tokn (did you mean --hub_token?)" in err and "abcdefghijklmnop" not in err


def test_a_value_of_the_wrong_type_is_one_line(capsys):
    assert "argument --max_steps/--max-steps: invalid int value: 'x'" in _error_line(
        capsys, ["unlearn", "--max_steps", "x"]
    )


def test_an_unknown_command_is_one_line_with_the_closest_command(capsys):
    assert main(["unlern"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "erasus-hf: error: unknown command 'unlern'; did you mean 'unlearn'?"
    )


def test_the_strategy_name_is_case_insensitive(tmp_path):
    from erasus_hf.config import UnlearningConfig
    from erasus_hf.scripts.parsing import make_parser, parse
    from erasus_hf.scripts.unlearn import UnlearnArguments

    parser = make_parser((UnlearnArguments, UnlearningConfig), "erasus-hf unlearn", "test")
    _, config = parse(parser, ["--strategy", "NPO", "--output_dir", str(tmp_path / "out")], "causal_lm")
    assert config.strategy == "npo"  # the registered name, as unlearning_config.json and the card record it


def test_an_unknown_strategy_is_one_line_with_the_closest_name_among_the_causal_lm_ones(capsys, tmp_path):
    err = _error_line(capsys, ["unlearn", "--strategy", "npoo", "--output_dir", str(tmp_path / "out")])
    assert "Unknown strategy 'npoo'; did you mean 'npo'?" in err
    listed = err.split("valid strategies for causal_lm: ")[1]
    assert "rmu" in listed and "ga" in listed
    assert "esd" not in listed and "bad_teacher" not in listed  # diffusion, classification
    assert not (tmp_path / "out").exists()


def test_a_strategy_of_another_family_is_refused_at_parsing(capsys, tmp_path):
    err = _error_line(capsys, ["unlearn", "--strategy", "esd", "--output_dir", str(tmp_path / "out")])
    assert "Strategy 'esd' does not serve causal_lm models (it serves: diffusion)" in err
    err = _error_line(capsys, ["demo", "--strategy", "Bad_Teacher", "--output_dir", str(tmp_path / "out")])
    assert "Strategy 'bad_teacher' does not serve causal_lm models (it serves: classification)" in err


def test_help_strategy_takes_any_case(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--help-strategy", "NPO"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("npo: NPO")


def test_help_lists_the_unlearning_options_before_the_training_arguments(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["unlearn", "--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "usage: erasus-hf unlearn [--config RECIPE.yaml] [--OPTION VALUE ...]"
    where = {}
    for number, line in enumerate(lines):
        option = line.split()[0] if line.startswith("  --") else line if not line.startswith(" ") else None
        where.setdefault(option, number)
    inherited = where["TrainingArguments options (inherited from transformers):"]
    for own in ("--config", "--model_name_or_path", "--dataset", "--strategy", "--use_peft", "--help-strategy"):
        assert where[own] < inherited, own
    for trainer_option in ("--output_dir", "--learning_rate", "--num_train_epochs", "--logging_steps"):
        assert where[trainer_option] > inherited, trainer_option
    assert where["--strategy"] < 60  # `erasus-hf unlearn --help | head -60` shows it


@pytest.mark.slow
def test_a_run_ends_with_its_final_metrics(tmp_path, saved_model, capfd):
    out = tmp_path / "out"
    argv = ["--config", str(TINY_RECIPE), "--model_name_or_path", str(saved_model), "--num_retain_authors", "2"]
    argv += ["--max_steps", "2", "--eval_max_examples", "2", "--output_dir", str(out), "--use_cpu"]
    assert main(["unlearn", *argv, "--disable_tqdm", "true"]) == 0
    lines = capfd.readouterr().out.rstrip("\n").splitlines()
    table = lines[lines.index(f"final evaluation (all of it in {out / 'eval.json'}):") :]
    summary = json.loads((out / "eval.json").read_text())["summary"]
    assert len(table) == 1 + len(summary) and lines[-1] == table[-1]
    for name, row in zip(summary, table[1:]):
        assert row.split() == [name, f"{summary[name]:.4g}"]


def test_lora_prints_no_is_gradient_checkpointing_warning():
    """transformers 5 deprecates `is_gradient_checkpointing`, which `PeftModel.__init__` reads on every LoRA
    wrap; a fresh interpreter (pytest's own filters hide it here) with warnings shown must print none."""
    code = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from erasus_hf.config import UnlearningConfig\n"
        "from erasus_hf.peft_utils import prepare_peft\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))\n"
        "args = UnlearningConfig(output_dir='unused', use_peft=True, use_cpu=True, report_to='none')\n"
        "wrapped, name, _ = prepare_peft(model, args)\n"
        "assert name == 'default'\n"
    )
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "is_gradient_checkpointing" not in run.stderr
