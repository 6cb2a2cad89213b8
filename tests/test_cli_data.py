"""`erasus-hf unlearn` on any dataset: local files of each row format (question/answer, prompt/completion text and
conversational, messages through a chat template, raw text) unlearned from a tiny Llama trained here on them, the
forget NLL rising; csv, parquet and a Hub-style folder through `load_dataset`; the model options going into
`model_init_kwargs`; bad sources and rows refused in one `erasus-hf: error:` line naming the option, before any
compute; and the offline MUSE recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset, load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from erasus_hf.cli import main
from erasus_hf.data.formats import TextFormat
from erasus_hf.data.loading import DataSource, DataSourceError
from erasus_hf.data.muse import shared_muse_dir
from erasus_hf.data.tofu import demo_splits
from erasus_hf.evaluation.rows import RowsEvaluator

from .testing_utils import ROOT

MUSE_RECIPE = ROOT / "trainers" / "recipes" / "muse_tiny_npo_lora.yaml"
# a chat template whose assistant turns are marked for assistant-only loss ({% generation %}), ending with EOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _qa(n: int = 6) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    forget, retain = demo_splits(1)
    return (
        list(zip(forget["question"][:n], forget["answer"][:n])),
        list(zip(retain["question"][:n], retain["answer"][:n])),
    )


ROWS = {
    "qa": lambda q, a: {"question": q, "answer": a},
    "prompt_completion": lambda q, a: {"prompt": f"Q: {q}\nA:", "completion": " " + a},
    "conversational": lambda q, a: {
        "prompt": [{"role": "user", "content": q}],
        "completion": [{"role": "assistant", "content": a}],
    },
    "messages": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "text": lambda q, a: {"text": f"{q} {a}"},
    "qa_renamed": lambda q, a: {"query": q, "response": a},  # with --dataset_columns
}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sides(tmp_path: Path, row_format: str) -> tuple[Path, Path]:
    forget, retain = _qa()
    make = ROWS[row_format]
    return (
        _write(tmp_path / "forget.jsonl", [make(q, a) for q, a in forget]),
        _write(tmp_path / "retain.jsonl", [make(q, a) for q, a in retain]),
    )


def _unlearn(out: Path, *flags: str) -> list[str]:
    """`erasus-hf unlearn` flags of a quick run: a tiny Llama fitted for 15 epochs, then 4 NPO steps."""
    return [
        "unlearn", *flags, "--starting_model_epochs", "15", "--strategy", "npo", "--learning_rate", "5e-3",
        "--lr_scheduler_type", "constant", "--max_steps", "4", "--per_device_train_batch_size", "6",
        "--output_dir", str(out), "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
        "--use_cpu",
    ]  # fmt: skip


def _forget_nll(folder: Path, rows: Dataset, text_format: TextFormat, max_length: int = 512) -> float:
    """The mean forget NLL of the model saved in `folder`, scored as the run's final evaluation scores it."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result = RowsEvaluator({"forget": rows}, text_format, max_length=max_length).evaluate(model.eval(), tokenizer)
    return result.summary["rows/forget_nll"]


@pytest.mark.parametrize("row_format", list(ROWS))
def test_unlearn_runs_on_local_jsonl_files_of_each_format(tmp_path, row_format):
    forget, retain = _sides(tmp_path, row_format)
    flags = ["--forget_dataset_name", str(forget), "--retain_dataset_name", str(retain)]
    text_format = TextFormat()
    if row_format in ("conversational", "messages"):
        (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
        flags += ["--chat_template_path", str(tmp_path / "chat.jinja")]
    if row_format == "qa_renamed":
        flags += ["--dataset_columns", '{"question": "query", "answer": "response"}']
        text_format = TextFormat(columns={"question": "query", "answer": "response"})
    out = tmp_path / "out"
    assert main(_unlearn(out, *flags)) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    detected = "qa" if row_format == "qa_renamed" else row_format
    assert evaluation["meta"]["text_format"]["rows"] == {"forget": detected, "retain": detected}
    assert evaluation["meta"]["data"] == {"forget": f"{forget} (train)", "retain": f"{retain} (train)"}
    assert len(evaluation["per_example"]["rows/forget_nll"]) == 6
    rows = load_dataset("json", data_files=str(forget), split="train")
    before = _forget_nll(out / "starting_model", rows, text_format)
    after = evaluation["summary"]["rows/forget_nll"]
    assert after == pytest.approx(_forget_nll(out, rows, text_format), rel=1e-4)  # eval.json scores the saved model
    assert after > 1.6 * before, (before, after)  # measured: 3.1-3.5 -> 6.6-6.8 nats (15 SFT epochs, 4 NPO steps)
    if row_format in ("conversational", "messages"):  # the tokenizer saved with both models carries the template
        assert AutoTokenizer.from_pretrained(out / "starting_model").chat_template == CHAT_TEMPLATE
    assert "datasets:" not in (out / "README.md").read_text().split("---")[1]  # local files are no Hub datasets


def test_csv_parquet_and_a_hub_style_folder_load_through_load_dataset(tmp_path):
    forget, retain = _qa(4)
    qa = Dataset.from_list([ROWS["qa"](q, a) for q, a in forget])
    qa.to_csv(tmp_path / "forget.csv", index=False)
    qa.to_parquet(tmp_path / "forget.parquet")
    flags = ("--forget_dataset_name", "--forget_dataset_config", "--forget_dataset_split")
    for name in ("forget.csv", "forget.parquet"):
        loaded = DataSource(str(tmp_path / name), flags=flags).load()
        assert loaded.to_list() == qa.to_list(), name
    # a folder laid out as a Hub dataset repository: a README's configs name the splits' files (no network)
    repo = tmp_path / "repo"
    (repo / "qa").mkdir(parents=True)
    _write(repo / "qa" / "forget-00000.jsonl", qa.to_list())
    _write(repo / "qa" / "retain-00000.jsonl", [ROWS["qa"](q, a) for q, a in retain])
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: qa\n  data_files:\n  - split: forget\n    path: qa/forget-00000.jsonl\n"
        "  - split: retain\n    path: qa/retain-00000.jsonl\n---\n"
    )
    assert DataSource(str(repo), "qa", "forget[:3]", flags).load().to_list() == qa.to_list()[:3]
    assert DataSource(str(repo), "qa", "retain", flags).hub_id is None  # a local folder is no Hub dataset
    assert DataSource("muse-bench/MUSE-News", "raw", "forget").hub_id == "muse-bench/MUSE-News"
    with pytest.raises(DataSourceError, match=r"--forget_dataset_split 'holdout': .* splits: \['forget', 'retain'\]"):
        DataSource(str(repo), "qa", "holdout", flags).load()


def test_sft_trains_the_collators_tokens_where_trl_renders_the_rows_otherwise(tmp_path, monkeypatch, caplog):
    """A chat template that does not end the answer with EOS: the unlearning collator appends one to QA rows
    (open-unlearning's rule), TRL's conversational rendering does not; SFT then trains the collator's tokens."""
    import logging

    from erasus_hf.data.collator import QACollator
    from erasus_hf.modeling import loading, tiny

    template = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    template += "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    rows = Dataset.from_list([ROWS["qa"](q, a) for q, a in _qa(4)[0]])
    tokenizer = loading.tiny_tokenizer([rows], TextFormat(), template)
    trainers = []
    real = tiny._sft_trainer
    monkeypatch.setattr(tiny, "_sft_trainer", lambda *a: trainers.append(real(*a)) or trainers[-1])
    model = tiny.build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    with caplog.at_level(logging.WARNING, logger="erasus_hf.modeling.tiny"):
        tiny.sft_train(model, tokenizer, rows, output_dir=str(tmp_path), max_steps=1, disable_tqdm=True)
    assert "4 of 4 'qa' rows: the tokens SFTTrainer builds differ from the QACollator layout" in caplog.text
    expected = tiny.collator_examples(rows, QACollator(tokenizer, max_length=256, text_format=TextFormat()))
    assert all(e["input_ids"][-1] == tokenizer.eos_token_id for e in expected)  # the collator's closing EOS
    assert len(trainers) == 2  # TRL's own rendering first, then the collator's tokens
    trained = trainers[-1].train_dataset
    assert [list(i) for i in trained["input_ids"]] == [e["input_ids"] for e in expected]
    assert [list(label) for label in trained["labels"]] == [e["labels"] for e in expected]


def _error_line(capsys, argv: list[str]) -> str:
    """Run `erasus-hf ARGV`, check that it exits 2 with one `erasus-hf: error:` line on stderr (datasets' progress
    bars of the rows loaded before the refusal aside), and return that line."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = [line for line in capsys.readouterr().err.split("\n") if line and "\r" not in line]
    assert len(lines) == 1 and lines[0].startswith("erasus-hf: error: "), lines
    return lines[0]


def test_bad_sources_and_rows_are_one_line_naming_the_option(tmp_path, capsys, monkeypatch):
    import datasets
    import huggingface_hub

    forget, retain = _sides(tmp_path, "qa")
    (tmp_path / "rows.txt").write_text("a question\n")
    _write(tmp_path / "odd.jsonl", [{"query": "q", "reply": "a"}])
    out = tmp_path / "out"

    def run(*flags: str) -> str:
        return _error_line(capsys, ["unlearn", *flags, "--output_dir", str(out), "--report_to", "none"])

    err = run("--forget_dataset_name", str(tmp_path / "missing.jsonl"), "--retain_dataset_name", str(retain))
    assert f"--forget_dataset_name '{tmp_path / 'missing.jsonl'}': no such file or folder" in err
    err = run("--forget_dataset_name", str(forget), "--retain_dataset_name", str(tmp_path / "rows.txt"))
    assert "--retain_dataset_name" in err and "a .txt file, which no loader here reads; give a .json, .jsonl" in err
    err = run("--forget_dataset_name", str(forget), "--forget_dataset_split", "forget", "--retain_loss", "none")
    assert "--forget_dataset_split 'forget'" in err and "available: ['train']" in err
    err = run("--forget_dataset_name", str(tmp_path / "odd.jsonl"), "--retain_dataset_name", str(retain))
    assert f"--forget_dataset_name '{tmp_path / 'odd.jsonl'}': " in err
    assert "fit no format: they have columns ['query', 'reply']. Accepted: 'question'/'answer'" in err
    err = run("--forget_dataset_name", str(forget))  # npo has a retain term
    assert "--strategy npo with --retain_loss nll has a retain term and needs retain rows" in err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    err = run("--forget_dataset_name", "someone/no-such-rows", "--retain_loss", "none")
    assert "--forget_dataset_name 'someone/no-such-rows': cannot reach the Hub" in err and "local copy" in err
    assert not out.exists()  # every refusal came before the starting model was trained into it


def test_chat_rows_without_a_chat_template_are_refused_before_training(tmp_path, capsys):
    forget, retain = _sides(tmp_path, "messages")
    err = _error_line(
        capsys,
        ["unlearn", "--forget_dataset_name", str(forget), "--retain_dataset_name", str(retain),
         "--output_dir", str(tmp_path / "out"), "--report_to", "none"],
    )  # fmt: skip
    assert f"--forget_dataset_name '{forget}': " in err and "need a chat template" in err
    assert "chat_template_path" in err
    assert not (tmp_path / "out" / "starting_model").exists()


def test_model_options_go_into_model_init_kwargs(tmp_path, capsys, saved_model, monkeypatch):
    from erasus_hf import model_source

    loads = []
    real = model_source.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        model_source.AutoModelForCausalLM, "from_pretrained", lambda path, **kw: loads.append(kw) or real(path, **kw)
    )
    forget, retain = _sides(tmp_path, "qa")
    out = tmp_path / "out"
    sides = ["--forget_dataset_name", str(forget), "--retain_dataset_name", str(retain)]
    argv = ["unlearn", "--model_name_or_path", str(saved_model), "--dtype", "bfloat16", "--attn_implementation",
            "eager", *sides, "--max_steps", "1", "--no_run_evaluation", "--output_dir", str(out),
            "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--disable_tqdm", "true"]  # fmt: skip
    assert main(argv) == 0
    assert loads == [{"dtype": torch.bfloat16, "attn_implementation": "eager"}]  # the trainer loaded the model so
    recorded = json.loads((out / "unlearning_config.json").read_text())["model_init_kwargs"]
    assert recorded == {"dtype": "bfloat16", "attn_implementation": "eager"}
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16  # and trained it in bfloat16
    err = _error_line(capsys, [*argv[:5], "--model_init_kwargs", '{"dtype": "float16"}', *argv[7:]])
    assert "--dtype 'bfloat16' and --model_init_kwargs {'dtype': 'float16'} disagree" in err
    err = _error_line(capsys, ["unlearn", "--dtype", "bfloat16", *sides, "--output_dir", str(tmp_path / "o2")])
    assert "apply to a model loaded from --model_name_or_path" in err


def test_evaluate_scores_any_rows_as_unlearn_trained_them(tmp_path, saved_model, tokenizer):
    forget, retain = _sides(tmp_path, "text")
    output = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(saved_model), "--forget_dataset_name", str(forget), "--retain_dataset_name",
            str(retain), "--max_length", "16", "--output", str(output), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(output.read_text())
    rows = load_dataset("json", data_files=str(forget), split="train")
    model = AutoModelForCausalLM.from_pretrained(saved_model).eval()
    expected = RowsEvaluator({"forget": rows}, TextFormat(), max_length=16).evaluate(model, tokenizer)
    assert result["summary"]["rows/forget_nll"] == pytest.approx(expected.summary["rows/forget_nll"], rel=1e-5)
    assert result["meta"]["rows"]["forget"]["examples"] > len(rows)  # the texts were cut into 16-token windows


@pytest.mark.skipif(shared_muse_dir() is None, reason="../shared/data/muse/news is not beside the checkout")
def test_the_offline_muse_recipe_runs(tmp_path):
    recipe = yaml.safe_load(MUSE_RECIPE.read_text())
    assert (ROOT / recipe["data_dir"]).resolve() == shared_muse_dir().resolve()  # its path, from the repository root
    out = tmp_path / "out"
    argv = ["unlearn", "--config", str(MUSE_RECIPE), "--data_dir", str(shared_muse_dir()), "--output_dir", str(out),
            "--starting_model_epochs", "3", "--max_steps", "2", "--eval_max_examples", "4", "--use_cpu",
            "--disable_tqdm", "true"]  # fmt: skip
    assert main(argv) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["meta"]["text_format"]["rows"] == {"forget": "text", "retain": "qa"}
    assert {"muse/verbmem_forget_rouge_f1", "muse/knowmem_retain_rouge_recall", "muse/privleak_auc"} <= set(
        evaluation["summary"]
    )
    assert evaluation["meta"]["data"] == {
        "forget": f"{shared_muse_dir()} (raw, forget[:4])",
        "retain": f"{shared_muse_dir()} (knowmem, retain_qa[:16])",
    }
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(out / "starting_model")  # `evaluate --model out` finds it
