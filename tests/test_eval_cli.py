"""`erasus-hf evaluate`: the JSON it writes, its use as the reference of a later run, and the same numbers from one
process and from two (`accelerate launch`)."""

import json
import subprocess
import sys

import pytest

from erasus_hf.cli import main
from erasus_hf.evaluation.result import EvaluationResult


@pytest.fixture
def saved(tmp_path, tokenizer, tiny_llama, tofu_slice):
    """A saved model and a TOFU-shaped data folder: 12 forget rows, 12 retain rows, and real_authors/world_facts
    stand-ins (rows of the retain authors with 3 perturbed answers; the layout is what is under test), plus a holdout
    split of authors the model never saw."""
    from erasus_hf.data.tofu import load_tofu

    forget, retain = (d.select(range(12)) for d in tofu_slice)
    model_dir, data_dir = tmp_path / "model", tmp_path / "tofu"
    tiny_llama.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data_dir.mkdir()
    forget.to_json(data_dir / "forget01_perturbed.json")
    retain.to_json(data_dir / "retain_perturbed.json")
    short = retain.map(lambda r: {"perturbed_answer": r["perturbed_answer"][:3]}).select_columns(
        ["question", "answer", "perturbed_answer"]
    )
    short.select(range(6)).to_json(data_dir / "real_authors_perturbed.json")
    short.select(range(6, 12)).to_json(data_dir / "world_facts_perturbed.json")
    holdout = load_tofu("demo_retain").filter(lambda a: a >= 10, input_columns="author").select(range(12))
    holdout.to_json(data_dir / "holdout01.json")
    return model_dir, data_dir


def _evaluate_args(model_dir, data_dir, output, *extra):
    return [
        "evaluate", "--model", str(model_dir), "--data_dir", str(data_dir), "--forget_split", "forget01",
        "--benchmark", "tofu", "mia", "memorization", "--holdout_split", "holdout01", "--batch_size", "5",
        "--max_new_tokens", "16", "--generation_batch_size", "4", "--output", str(output), *extra,
    ]  # fmt: skip


def test_evaluate_writes_a_json_that_a_later_run_uses_as_reference(saved, tmp_path):
    model_dir, data_dir = saved
    assert main(_evaluate_args(model_dir, data_dir, tmp_path / "retain_eval.json")) == 0
    first = EvaluationResult.load(tmp_path / "retain_eval.json")
    assert first.meta["tofu/generation"] == {"max_new_tokens": 16, "batch_size": 4, "greedy": True}
    assert "tofu/forget_quality" not in first.summary  # no reference, no number
    assert len(first.per_example["tofu/forget_truth_ratio"]) == 12
    assert {"mia/loss_auc", "mia/min_k_plus_plus_auc", "memorization/forget_exact_memorization"} <= set(first.summary)
    args = _evaluate_args(
        model_dir, data_dir, tmp_path / "eval.json", "--reference", str(tmp_path / "retain_eval.json")
    )
    assert main(args) == 0
    second = EvaluationResult.load(tmp_path / "eval.json")
    assert second.summary["tofu/forget_quality"] == pytest.approx(1.0)  # the same model: identical truth ratios
    assert second.summary["combined_score"] == pytest.approx(second.summary["tofu/model_utility"] ** 0.5)


def test_two_processes_give_the_numbers_of_one(saved, tmp_path):
    model_dir, data_dir = saved
    assert main(_evaluate_args(model_dir, data_dir, tmp_path / "one.json")) == 0
    # torchrun, not `accelerate launch --cpu --num_processes 2` (which starts one process)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "erasus_hf.cli"]
    run = subprocess.run(
        [*launch, *_evaluate_args(model_dir, data_dir, tmp_path / "two.json")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["meta"]["num_processes"], two["meta"]["num_processes"]) == (1, 2)
    assert two["summary"].keys() == one["summary"].keys()
    for key, value in one["summary"].items():
        assert two["summary"][key] == pytest.approx(value, abs=1e-5), key
    for key, values in one["per_example"].items():
        assert two["per_example"][key] == pytest.approx(values, abs=1e-5), key


def test_evaluate_help_explains_the_generation_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--max_new_tokens" in text and "200 = open-unlearning's TOFU setting" in text
    assert "--generation_batch_size" in text and "default: --batch_size" in text
