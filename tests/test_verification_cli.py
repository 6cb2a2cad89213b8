"""`erasus-hf verify` end to end through `erasus_hf.scripts.verify.main`: saved tiny models (the audited one, the
retrained model, IN and OUT references) and rows in JSON-lines files; the verification JSON and the card's markdown;
and its refusals, each before any model is loaded."""

from __future__ import annotations

import json

import pytest

from erasus_hf.data.tofu import load_tofu
from erasus_hf.evaluation.mia import MIAEvaluator
from erasus_hf.scripts import verify as verify_script
from erasus_hf.verification import VerificationResult

from .testing_utils import qa, small_llama

pytestmark = pytest.mark.filterwarnings("ignore:Membership inference. only:UserWarning")  # 8 rows a side, on purpose


@pytest.fixture
def files(tmp_path, tokenizer, tofu_slice):
    forget, _ = tofu_slice
    holdout = load_tofu("demo_retain").filter(lambda a: a == 10, input_columns="author")
    paths = {"forget": tmp_path / "forget.jsonl", "holdout": tmp_path / "holdout.jsonl"}
    qa(forget).select(range(8)).to_json(paths["forget"])
    qa(holdout).select(range(8)).to_json(paths["holdout"])
    for name, seed in (("model", 0), ("retrained", 1), ("in", 2), ("out1", 3), ("out2", 4)):
        small_llama(tokenizer, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    paths["output"] = tmp_path / "verification.json"
    return paths


def argv(files, *extra: str) -> list[str]:
    return [
        "--model", str(files["model"]),
        "--forget_dataset_name", str(files["forget"]),
        "--holdout_dataset_name", str(files["holdout"]),
        "--attacks", "loss", "min_k",
        "--bootstrap_resamples", "50",
        "--relearn_steps", "1", "2",
        "--device", "cpu",
        "--output", str(files["output"]),
        *extra,
    ]  # fmt: skip


def test_verify_command_end_to_end(files, capsys):
    extra = ["--retrained", str(files["retrained"]), "--reference_in_models", str(files["in"])]
    extra += ["--reference_out_models", str(files["out1"]), str(files["out2"])]
    assert verify_script.main(argv(files, *extra)) == 0
    result = VerificationResult.load(files["output"])
    names = [c.name for c in result.checks]
    assert names[:4] == ["mia_auc/loss", "mia_auc_vs_retrained/loss", "ks/loss", "mann_whitney/loss"]
    assert {"epsilon/holdout", "epsilon/retrained", "lira", "relearning"} <= set(names)
    assert result.skipped == {}
    lira = result["lira"]
    assert lira.details["in_count"] == [1] * 8 and lira.details["out_count"] == [2] * 8
    assert result["relearning"].details["curve"]["steps"] == [0, 1, 2]
    assert result.meta["model_path"] == str(files["model"]) and result.meta["forget_rows"] == 8
    assert result.meta["control"] is not None  # the first OUT reference serves as the control
    data = json.loads(files["output"].read_text())
    assert all({"statistic", "value", "alpha", "verdict", "tests", "null"} <= set(c) for c in data["checks"])
    printed = capsys.readouterr().out
    assert printed.startswith("### Unlearning verification") and "| `lira` |" in printed


def test_verify_command_with_the_retrained_evaluation_json(files, tokenizer, tmp_path):
    forget, holdout = (load_rows(files[side]) for side in ("forget", "holdout"))
    retrained = small_llama(tokenizer, seed=1)
    path = tmp_path / "retain_eval.json"
    MIAEvaluator(forget, holdout, attacks=("loss", "min_k")).evaluate(retrained, tokenizer).save(path)
    assert verify_script.main(argv(files, "--retrained", str(path))) == 0
    result = VerificationResult.load(files["output"])
    assert "mia_auc_vs_retrained/min_k" in [c.name for c in result.checks]
    assert set(result.skipped) == {"lira", "relearning"}  # relearning needs the retrained model itself


def load_rows(path):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train")


def test_verify_command_refuses_bad_input_before_loading_a_model(files, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(verify_script, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    forget, holdout = (load_rows(files[side]) for side in ("forget", "holdout"))
    other_rows = tmp_path / "other_eval.json"
    MIAEvaluator(forget.select(range(5)), holdout, attacks=("loss", "min_k")).evaluate(
        small_llama(tokenizer), tokenizer
    ).save(other_rows)
    cases = [
        (["--retrained", str(other_rows)], "did not score the same 'mia/members' rows"),
        (["--holdout_dataset_name", str(tmp_path / "missing.jsonl")], "--holdout_dataset_name"),
        (["--reference_out_models", str(files["out1"])], "at least two models trained without the forget rows"),
        (["--retrained", str(tmp_path / "nowhere")], "--retrained"),
        (["--attacks", "reference"], "choose from"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            verify_script.main(argv(files, *extra))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, extra
    assert not files["output"].exists()


def test_verify_adds_its_result_to_the_models_card_once(files):
    """A model folder holding an erasus-hf card gets the verification under "Guarantees and verification"; a second
    verification replaces the first; --no_update_card leaves the card as it is."""
    from huggingface_hub import ModelCard

    from erasus_hf.hub.card import build_model_card, write_model_card

    card = build_model_card(
        strategy_name="npo", paper="p", hyperparameters={}, training_args={}, forget_rows=[{"q": 1}], retain_count=0,
        base_model=None, is_adapter=False, evaluation=None, reference_note=None, command=None, datasets=None,
        model_name=None,
    )  # fmt: skip
    write_model_card(card, files["model"])
    extra = ["--retrained", str(files["retrained"])]
    for _ in range(2):
        assert verify_script.main(argv(files, *extra)) == 0
    text = ModelCard.load(files["model"] / "README.md").text
    section = text.split("## Guarantees and verification", 1)[1].split("## Limitations", 1)[0]
    assert section.count("### Unlearning verification") == 1 and "| `mia_auc/loss` |" in section
    assert text.count("## Guarantees and verification") == 1
    before = (files["model"] / "README.md").read_text()
    assert verify_script.main(argv(files, *extra, "--no_update_card")) == 0
    assert (files["model"] / "README.md").read_text() == before
