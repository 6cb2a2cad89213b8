"""Nonsense is refused before any compute, with an error that names the culprit (side, row, column, field,
hyperparameter, folder, endpoint) and the fix: rows, configuration, strategy hyperparameters, model folders, the
reference model and an unreachable Hub."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import pytest
from datasets import Dataset, DatasetDict
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from erasus_hf import ErasusUnlearner, UnlearningTrainer
from erasus_hf.modeling.loading import load_model
from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.npo import NPO

from .testing_utils import config, fake_adapter, qa, small_llama, snapshot


def build(tmp_path, tokenizer, model, strategy="grad_diff", forget=None, retain=None, **config_kwargs):
    return UnlearningTrainer(
        model,
        config(tmp_path, strategy=strategy, **config_kwargs),
        forget_dataset=forget,
        retain_dataset=retain,
        processing_class=tokenizer,
    )


@pytest.fixture
def rows(tofu_slice):
    """Four forget and four retain question/answer rows, as lists of dicts."""
    forget, retain = (qa(d).select(range(4)).to_list() for d in tofu_slice)
    return forget, retain


# ---- rows ----


BAD_TEXT = [
    ("question", None, "is None, not text"),
    ("answer", None, "is None, not text"),
    ("answer", "", "is empty: an empty answer leaves only the closing EOS"),
    ("answer", "   ", "is empty"),
    ("question", " \n", "is empty"),
]


@pytest.mark.parametrize("side", ["forget", "retain"])
@pytest.mark.parametrize(("column", "value", "message"), BAD_TEXT)
def test_bad_text_cell_names_side_row_and_column(tmp_path, tokenizer, tiny_llama, rows, side, column, value, message):
    forget, retain = rows
    target = forget if side == "forget" else retain
    target[2] = {**target[2], column: value}
    with pytest.raises(ValueError, match=rf"The {side} set \({side}_dataset\): row 2, column '{column}' {message}"):
        build(tmp_path, tokenizer, tiny_llama, forget=forget, retain=retain)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1, 2, 3, 4], "row 0, column 'answer' is int, not text"),
        (
            [b"a", b"b", b"c", b"d"],
            r"row 0, column 'answer' is bytes, not text: decode it \(value.decode\('utf-8'\)\)",
        ),
    ],
)
def test_answer_column_of_another_type(tmp_path, tokenizer, tiny_llama, values, message):
    forget = Dataset.from_dict({"question": ["q1", "q2", "q3", "q4"], "answer": values})
    with pytest.raises(ValueError, match=rf"The forget set \(forget_dataset\): {message}"):
        build(tmp_path, tokenizer, tiny_llama, strategy="ga", forget=forget)


def test_mixed_column_types_in_a_list(tmp_path, tokenizer, tiny_llama, rows):
    forget, retain = rows
    forget[3] = {**forget[3], "answer": 5}
    with pytest.raises(ValueError, match=r"column 'answer' mixes types: row 0 holds str, row 3 holds int \(5\)"):
        build(tmp_path, tokenizer, tiny_llama, forget=forget, retain=retain)


def test_rows_with_other_columns(tmp_path, tokenizer, tiny_llama, rows):
    forget, retain = rows
    retain[1] = {"question": retain[1]["question"], "response": retain[1]["answer"]}
    with pytest.raises(
        ValueError, match=r"retain set \(retain_dataset\): row 1 has columns \['question', 'response'\]"
    ):
        build(tmp_path, tokenizer, tiny_llama, forget=forget, retain=retain)


def test_missing_text_column_names_the_columns_and_the_fix(tmp_path, tokenizer, tiny_llama):
    forget = Dataset.from_dict({"question": ["q1", "q2"], "text": ["a1", "a2"]})
    with pytest.raises(ValueError, match=r"with 'question' but without 'answer'.*rename_column"):
        build(tmp_path, tokenizer, tiny_llama, strategy="ga", forget=forget)


def token_rows(bad: dict | None = None) -> list[dict]:
    rows = [{"input_ids": [1, 40, 41, 42], "labels": [-100, 41, 42, 2]} for _ in range(4)]
    if bad is not None:
        rows[1] = bad
    return rows


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"input_ids": [1, 40, 9999, 42], "labels": [-100, 41, 42, 2]}, r"'input_ids' holds token id 9999, outside"),
        ({"input_ids": [1, -3, 41, 42], "labels": [-100, 41, 42, 2]}, r"'input_ids' holds token id -3, outside"),
        ({"input_ids": [1, 40, 41, 42], "labels": [-100, 41, 700, 2]}, r"'labels' holds 700: a label is a token id"),
        ({"input_ids": [1, 40, 41, 42], "labels": [-100, 41, 42]}, r"'labels' has 3 entries, input_ids has 4"),
    ],
)
def test_pre_tokenized_rows_outside_the_vocabulary_or_misaligned(tmp_path, tokenizer, tiny_llama, bad, message):
    """Before: an IndexError (ids) or a batch-size mismatch (labels) at the first training step."""
    vocab = tiny_llama.get_input_embeddings().num_embeddings
    assert vocab == 512
    with pytest.raises(ValueError, match=rf"The forget set \(forget_dataset\): row 1, column {message}"):
        build(tmp_path, tokenizer, tiny_llama, strategy="ga", forget=token_rows(bad))
    trainer = build(tmp_path, tokenizer, small_llama(tokenizer), strategy="ga", forget=token_rows())  # good ids pass
    assert len(trainer.train_dataset) == 4


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("data/forget.jsonl", r"is a path, 'data/forget.jsonl', not a dataset: .*load_dataset\('json'"),
        (Path("forget.csv"), r"is a path, 'forget.csv', .*load_dataset\('csv'"),
        ({"question": ["q"], "answer": ["a"]}, r"is a dict of columns \['question', 'answer'\]; .*Dataset.from_dict"),
        ({"question": "q", "answer": "a"}, r"is a single dict .*pass a list of rows"),
        (
            DatasetDict({"train": Dataset.from_dict({"question": ["q"], "answer": ["a"]})}),
            r"is a DatasetDict .*\['train'\]",
        ),
    ],
)
@pytest.mark.parametrize("side", ["forget", "retain"])
def test_what_is_not_a_dataset(tmp_path, tokenizer, tiny_llama, rows, data, message, side):
    """Before: `'str' object has no attribute 'get'` for every one of them."""
    forget, retain = rows
    sides = {"forget": forget, "retain": retain, side: data}
    with pytest.raises(ValueError, match=rf"The {side} set \({side}_dataset\) {message}"):
        build(tmp_path, tokenizer, tiny_llama, forget=sides["forget"], retain=sides["retain"])


def test_dataset_dict_says_pass_a_split(tmp_path, tokenizer, tiny_llama, rows):
    splits = DatasetDict({"train": Dataset.from_list(rows[0]), "test": Dataset.from_list(rows[0])})
    with pytest.raises(ValueError, match=r"pass one split, e.g. forget_dataset=dataset\['train'\]"):
        build(tmp_path, tokenizer, tiny_llama, strategy="ga", forget=splits)


def test_pre_tokenized_rows_for_a_strategy_that_reads_the_question(tmp_path, tokenizer, tiny_llama, rows):
    """idk_dpo tokenizes a refusal after each row's question. Before: a bare `KeyError: 'question'`."""
    with pytest.raises(ValueError, match=r"forget set \(forget_dataset\) is pre-tokenized .*idk_dpo.*Pass raw"):
        build(tmp_path, tokenizer, tiny_llama, strategy="idk_dpo", forget=token_rows(), retain=rows[1])


# ---- configuration ----


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_length", -5, "max_length must be a positive number of tokens"),
        ("max_length", 0, "max_length must be a positive number of tokens"),
        ("forget_weight", -1.0, "forget_weight must be a finite number >= 0"),
        ("retain_weight", float("nan"), "retain_weight must be a finite number >= 0"),
        ("retain_weight", float("inf"), "retain_weight must be a finite number >= 0"),
        ("learning_rate", 0.0, "learning_rate must be a finite number > 0, got 0.0: at 0 the model would not change"),
        ("learning_rate", float("nan"), "learning_rate must be a finite number > 0"),
        ("num_train_epochs", 0, "num_train_epochs must be a finite number > 0 .*Or set max_steps > 0"),
        ("num_train_epochs", -1, "num_train_epochs must be a finite number > 0"),
        ("max_steps", 0, r"max_steps must be > 0 \(a number of optimizer steps\) or -1"),
        ("max_steps", -7, "max_steps must be > 0"),
    ],
)
def test_run_values_that_would_do_nothing_or_harm(tmp_path, field, value, message):
    """Before: max_length=-5 cut 5 tokens off every row; lr 0, 0 epochs and max_steps 0 trained nothing and saved."""
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **{field: value})


def test_epochs_do_not_matter_with_max_steps(tmp_path):
    assert config(tmp_path, num_train_epochs=0, max_steps=5).max_steps == 5


@pytest.mark.parametrize("epochs", [-1, 0, float("nan")])
def test_fit_with_no_epochs(tmp_path, tokenizer, tiny_llama, rows, epochs):
    """Before: fit(epochs=-1) returned the unchanged model with empty loss histories."""
    unlearner = ErasusUnlearner(tiny_llama, strategy="ga", tokenizer=tokenizer, output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match=rf"fit\(epochs={epochs}\): epochs must be a finite number > 0"):
        unlearner.fit(rows[0], epochs=epochs)
    assert not (tmp_path / "out").exists()


def test_max_length_past_the_model_positions_warns(tmp_path, tokenizer, rows):
    model = small_llama(tokenizer, max_position_embeddings=16)
    with pytest.warns(
        UserWarning, match=r"max_length=64 exceeds the model's max_position_embeddings=16, and 4 forget"
    ):
        build(tmp_path, tokenizer, model, strategy="ga", forget=rows[0], max_length=64)


# ---- strategy hyperparameters ----


def test_hyperparameter_strings_are_converted_by_their_declared_type():
    """A YAML recipe reads `1e-3` as a string, the command line gives JSON strings: converted once, by the annotation.
    Before: '<=' not supported between 'str' and 'int'; and ce_u's ignore_first_token="false" was True."""
    assert get_strategy("npo", beta="1e-3").beta == 0.001
    assert get_strategy("rmu", layer_id="3", param_layer_ids=["1", 2]).param_layer_ids == [1, 2]
    assert get_strategy("ce_u", ignore_first_token="false").ignore_first_token is False
    assert get_strategy("pdu", epsilon="0.3").epsilon == 0.3
    assert isinstance(NPO(beta=1).beta, float)
    assert get_strategy("ensemble", members=[["npo", 1.0, {"beta": "0.2"}]]).members[0][0].beta == 0.2


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("npo", {"beta": "abc"}, r"'npo': hyperparameter 'beta' must be a finite number, got 'abc' \(str\)"),
        ("npo", {"beta": float("nan")}, r"'beta' must be a finite number, got nan"),
        ("simnpo", {"beta": float("inf")}, r"'simnpo': hyperparameter 'beta' must be a finite number, got inf"),
        ("rmu", {"layer_id": 1.5}, r"'rmu': hyperparameter 'layer_id' must be an int, got 1.5"),
        ("scrub", {"max_epochs": True}, r"'max_epochs' must be an int, got True \(bool\)"),
        ("simnpo", {"margin_form": 3}, r"'margin_form' must be a string, got 3"),
        ("whp", {"anchored_terms": ["Hogwarts"]}, r"'anchored_terms' must be a dict\[str, str\]"),
        ("ce_u", {"ignore_first_token": "maybe"}, r"'ignore_first_token' must be a bool"),
    ],
)
def test_hyperparameters_of_the_wrong_type_or_not_finite(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_strategy(name, **kwargs)


def test_hyperparameters_checked_when_built_directly_and_through_the_trainer(tmp_path, tokenizer, tiny_llama, rows):
    """Before: NaN beta was accepted and the run stopped at the first step ("loss is nan, lower the learning rate")."""
    with pytest.raises(ValueError, match="'beta' must be a finite number, got nan"):
        NPO(beta=float("nan"))
    args = config(tmp_path, strategy="npo", strategy_kwargs='{"beta": "NaN"}')
    with pytest.raises(ValueError, match=r"Fix strategy_kwargs=\{'beta': \.\.\.\}"):
        UnlearningTrainer(tiny_llama, args, forget_dataset=rows[0], retain_dataset=rows[1], processing_class=tokenizer)
    trainer = build(
        tmp_path, tokenizer, small_llama(tokenizer), "npo", rows[0], rows[1], strategy_kwargs='{"beta": "0.05"}'
    )
    assert trainer.strategy.beta == 0.05


def test_recipe_hyperparameters_checked_at_parsing(tmp_path):
    """`erasus-hf unlearn` builds the strategy while parsing: a bad hyperparameter fails before the data is read or
    the starting model trained (the demo path trains one for a minute first)."""
    from erasus_hf.cli import main

    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    recipe.write_text(f"output_dir: {out}\ndataset: demo\nstrategy: npo\nstrategy_kwargs: {{beta: abc}}\n")
    with pytest.raises(ValueError, match="'npo': hyperparameter 'beta' must be a finite number, got 'abc'"):
        main(["unlearn", "--config", str(recipe), "--report_to", "none"])
    assert not out.exists()

    from erasus_hf.config import UnlearningConfig
    from erasus_hf.scripts.parsing import make_parser, parse
    from erasus_hf.scripts.unlearn import UnlearnArguments

    recipe.write_text(f"output_dir: {out}\nstrategy: npo\nstrategy_kwargs: {{beta: 1e-3}}\nlearning_rate: 1e-5\n")
    _, args = parse(make_parser((UnlearnArguments, UnlearningConfig), "x", "x"), ["--config", str(recipe)])
    assert args.learning_rate == 1e-5 and get_strategy(args.strategy, **args.strategy_kwargs).beta == 0.001


# ---- models ----


def saved_model(tokenizer, folder: Path, with_tokenizer: bool = True) -> Path:
    small_llama(tokenizer).save_pretrained(folder)
    if with_tokenizer:
        tokenizer.save_pretrained(folder)
    return folder


def test_local_model_path_that_does_not_exist(tmp_path, rows):
    """Before: huggingface_hub's "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    missing = str(tmp_path / "models" / "llama")
    for load in (
        lambda: UnlearningTrainer(missing, config(tmp_path, strategy="ga"), forget_dataset=rows[0]),
        lambda: load_model(missing),
    ):
        with pytest.raises(FileNotFoundError, match=rf"No model folder at '{missing}'.*Check the path"):
            load()


def test_folder_without_tokenizer(tmp_path, tokenizer, rows):
    """Before: "Couldn't instantiate the backend tokenizer" (a message about sentencepiece)."""
    folder = saved_model(tokenizer, tmp_path / "model", with_tokenizer=False)
    with pytest.raises(ValueError, match=rf"No tokenizer in '{folder}'.*tokenizer.save_pretrained"):
        UnlearningTrainer(str(folder), config(tmp_path, strategy="ga"), forget_dataset=rows[0])
    trainer = UnlearningTrainer(
        str(folder), config(tmp_path, strategy="ga"), forget_dataset=rows[0], processing_class=tokenizer
    )  # with the tokenizer passed, the folder loads
    assert trainer.model.config.hidden_size == 32


def test_folder_that_is_not_a_model(tmp_path, rows):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"holds neither config.json .* nor adapter_config.json"):
        load_model(str(tmp_path / "notes"))


def test_adapter_whose_base_folder_moved(tmp_path, tokenizer, rows):
    """Before: "Repo id must be in the form ..." naming the old base path, or the tokenizer message."""
    base = saved_model(tokenizer, tmp_path / "base")
    adapter = get_peft_model(small_llama(tokenizer), LoraConfig(r=2, target_modules="all-linear"))
    adapter.peft_config["default"].base_model_name_or_path = str(base)
    adapter.save_pretrained(tmp_path / "adapter")
    moved = tmp_path / "base_moved"
    base.rename(moved)
    message = rf"applies to the base model '{base}', which is not there .*--base_model"
    with pytest.raises(FileNotFoundError, match=message):
        load_model(str(tmp_path / "adapter"))
    with pytest.raises(FileNotFoundError, match=message):
        UnlearningTrainer(str(tmp_path / "adapter"), config(tmp_path, strategy="ga"), forget_dataset=rows[0])
    model, loaded_tokenizer = load_model(str(tmp_path / "adapter"), base_model=str(moved))  # the fix it names
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size and hasattr(model, "peft_config")


@pytest.mark.parametrize(
    ("strategy", "other", "message"),
    [
        ("rmu", dict(hidden_size=64), "hidden_size 64 vs 32"),  # before: a shape error at the first step
        ("npo", dict(hidden_size=64), "hidden_size 64 vs 32"),  # before: trained against an unrelated model
        ("npo", dict(num_layers=1), "num_hidden_layers 1 vs 2"),
    ],
)
def test_reference_model_of_another_architecture(tmp_path, tokenizer, tiny_llama, rows, strategy, other, message):
    ref_model = small_llama(tokenizer, **other)
    kwargs = {"layer_id": 1} if strategy == "rmu" else {}
    args = config(tmp_path, strategy=strategy, strategy_kwargs=kwargs, reference="copy")
    with pytest.raises(
        ValueError, match=rf"ref_model is not the model's architecture \(ref_model vs model: {message}"
    ):
        UnlearningTrainer(
            tiny_llama,
            args,
            forget_dataset=rows[0],
            retain_dataset=rows[1],
            ref_model=ref_model,
            processing_class=tokenizer,
        )


def test_reference_model_of_another_class(tmp_path, tokenizer, tiny_llama, rows):
    classifier = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    args = config(tmp_path, strategy="npo", reference="copy")
    with pytest.raises(ValueError, match="class LlamaForSequenceClassification vs LlamaForCausalLM"):
        UnlearningTrainer(
            tiny_llama,
            args,
            forget_dataset=rows[0],
            retain_dataset=rows[1],
            ref_model=classifier,
            processing_class=tokenizer,
        )


# ---- the network ----


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_folder(folder: Path) -> Path:
    fake_adapter(folder)
    (folder / "README.md").write_text("---\nlibrary_name: peft\n---\n# card\n")
    return folder


@pytest.fixture
def hub_env(hf_home, monkeypatch):
    """The Hub tests' environment (`hf_home`) without an ambient HF_HUB_OFFLINE: each case sets offline mode."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("offline", [False, True])
def test_push_to_an_unreachable_hub_is_one_line(tmp_path, monkeypatch, capsys, hub_env, offline):
    """Before: a 72-line httpx traceback (closed port) or a 36-line OfflineModeIsEnabled traceback."""
    from erasus_hf.cli import main

    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # what HF_ENDPOINT sets at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
    folder = output_folder(tmp_path / "out")
    before = snapshot(folder)
    assert main(["push", str(folder), "--repo_id", "me/tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("erasus-hf push: ") and f"to 'me/tiny' at {endpoint}" in err[0]
    assert "the local folder is intact" in err[0]
    assert "run the same command again" in err[0]
    assert ("unset HF_HUB_OFFLINE" in err[0]) == offline and ("Connection refused" in err[0]) != offline
    assert snapshot(folder) == before


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), "heavy", None])
def test_ensemble_member_weight_must_be_finite(weight):
    from erasus_hf.strategies.composition import EnsembleStrategy

    with pytest.raises(ValueError, match="weight must be a finite number"):
        EnsembleStrategy(members=[("ga", 1.0), ("npo", weight)])


def test_unlearn_cli_refuses_bad_rows_before_training_a_starting_model(tmp_path, monkeypatch):
    """`erasus-hf unlearn` without a model trains one on the data first: a bad row must be named before that."""
    import json
    import pathlib

    from erasus_hf.config import UnlearningConfig
    from erasus_hf.data.tofu import shared_tofu_dir
    from erasus_hf.scripts import unlearn

    shared = shared_tofu_dir()
    if shared is None:
        pytest.skip("../shared/data/tofu is not beside the checkout")
    for split in pathlib.Path(shared).glob("*.json"):
        (tmp_path / split.name).symlink_to(split)
    rows = [json.loads(line) for line in (tmp_path / "forget01.json").read_text().splitlines()]
    rows[2]["answer"] = None
    (tmp_path / "forget01.json").unlink()
    (tmp_path / "forget01.json").write_text("\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(unlearn, "starting_model", lambda *a, **k: pytest.fail("trained before the row check"))
    args = unlearn.UnlearnArguments(data_dir=str(tmp_path), forget_split="forget01", retain_split="retain99")
    with pytest.raises(ValueError, match=r"forget.*row 2"):
        unlearn.run_unlearn(args, UnlearningConfig(output_dir=str(tmp_path / "out"), report_to="none"))
