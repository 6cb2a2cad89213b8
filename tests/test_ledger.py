"""Deletion requests over time (`erasus_hf.ledger`, `erasus-hf forget`): on the memorised tiny Llama, two requests
(one TOFU forget author each) applied one after another with NPO + LoRA, one adapter per request.

Measured (CPU, seed 0): each request's forget NLL goes from about 0.01 to about 2 nats per answer token; after both,
the first author's NLL is about 3 and the retain authors' stays under 0.1 (memorised: 0.01)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from erasus_hf.cli import main
from erasus_hf.ledger import (
    DeletionLedger,
    RequestError,
    apply_request,
    load_state,
    open_ledger,
    replay,
    state_sha256,
)
from erasus_hf.ledger import apply as apply_module
from erasus_hf.model_source import load_causal_lm

from .testing_utils import config, nll, qa, snapshot

# the request runs: NPO + LoRA, constant lr, 6 epochs over 20 rows (the behaviour); 3 steps (the mechanics)
FORGETTING = dict(
    strategy="npo", use_peft=True, learning_rate=2e-3, lr_scheduler_type="constant", num_train_epochs=6,
    per_device_train_batch_size=8, logging_steps=50,
)  # fmt: skip
QUICK = {**FORGETTING, "num_train_epochs": 1, "max_steps": 3}


def _requests(tofu_slice) -> tuple[Dataset, Dataset, Dataset]:
    """(author A's 20 forget rows, author B's 20, the 40 retain rows), question/answer only."""
    forget, retain = tofu_slice
    forget = qa(forget)
    return forget.select(range(20)), forget.select(range(20, 40)), qa(retain)


@pytest.fixture(scope="module")
def base(tmp_path_factory, _memorised, tokenizer):
    path = tmp_path_factory.mktemp("ledger") / "base"
    _memorised.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _run(folder, base, requests, retain, overrides, **ledger_options) -> tuple[DeletionLedger, list]:
    ledger = open_ledger(str(folder), base_model=base, **ledger_options)
    args = config(folder, **overrides)
    return ledger, [apply_request(ledger, rows, args, retain=retain) for rows in requests]


@pytest.fixture(scope="module")
def sequence(tmp_path_factory, base, tofu_slice):
    """Two requests applied with FORGETTING, and the files as they were after the first."""
    a, b, retain = _requests(tofu_slice)
    folder = tmp_path_factory.mktemp("sequence") / "run"
    ledger = open_ledger(str(folder), base_model=base)
    args = config(folder, **FORGETTING)
    first = apply_request(ledger, a, args, retain=retain)
    after_first = snapshot(folder / "requests" / "request-0001")
    second = apply_request(ledger, b, args, retain=retain)
    return {"folder": folder, "ledger": ledger, "outcomes": [first, second], "after_first": after_first}


@pytest.fixture(scope="module")
def quick(tmp_path_factory, base, tofu_slice):
    """Two requests of 3 steps each, adapters stacked: what the replay and merge tests compare with."""
    a, b, retain = _requests(tofu_slice)
    return _run(tmp_path_factory.mktemp("quick") / "run", base, [a, b], retain, QUICK)[0]


def _copy(ledger: DeletionLedger, tmp_path) -> tuple:
    """(a copy of `ledger`'s run folder, its ledger read from there): a test's own run to add requests to."""
    folder = tmp_path / "run"
    shutil.copytree(ledger.folder, folder)
    return folder, DeletionLedger.load(str(folder / "ledger.json"))


# ---- the requests forget, one adapter each


def test_each_request_forgets_its_rows_and_keeps_the_retain_rows(sequence, tofu_slice, tokenizer, _memorised):
    a, b, retain = _requests(tofu_slice)
    first, second = (o.record for o in sequence["outcomes"])
    for record in (first, second):
        assert record.evaluation["forget_nll_before"] < 0.2  # memorised
        assert record.evaluation["forget_nll_after"] > record.evaluation["forget_nll_before"] + 1.0
    model, _ = load_state(sequence["ledger"])
    assert nll(model, tokenizer, a) > 1.5  # the first author stays forgotten after the second request
    assert nll(model, tokenizer, b) > 1.0
    assert nll(model, tokenizer, retain) < 0.5  # measured 0.09; the memorised model's 0.01
    assert nll(_memorised, tokenizer, a) < 0.1


def test_a_request_adds_its_own_adapter_and_leaves_the_earlier_ones_and_the_base(sequence, base, tofu_slice):
    from peft import PeftModel

    folder = sequence["folder"]
    assert snapshot(folder / "requests" / "request-0001") == sequence["after_first"]
    for request in ("request-0001", "request-0002"):
        assert (folder / "requests" / request / "adapter_model.safetensors").is_file()
        assert not (folder / "requests" / request / "model.safetensors").exists()
    ledger = DeletionLedger.load(str(folder / "ledger.json"))
    assert [r.applied_as for r in ledger.requests] == ["adapter", "adapter"]
    original, _ = load_causal_lm(base)
    assert ledger.base_sha256 == state_sha256(original)

    stacked, tokenizer = load_state(ledger, merged=False)
    assert isinstance(stacked, PeftModel)
    assert stacked.base_model.active_adapters == ["request-0001", "request-0002"]
    merged, _ = load_state(ledger)
    assert state_sha256(merged) == ledger.requests[-1].state_sha256
    batch = tokenizer(list(_requests(tofu_slice)[0]["question"][:4]), return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(stacked(**batch).logits, merged(**batch).logits, atol=1e-4, rtol=1e-4)
        with stacked.disable_adapter():  # under the adapters, the original model, untouched
            torch.testing.assert_close(stacked(**batch).logits, original(**batch).logits)


def test_the_ledger_records_fingerprints_and_numbers_never_the_rows(sequence, tofu_slice):
    folder = sequence["folder"]
    text = (folder / "ledger.json").read_text()
    data = json.loads(text)
    assert (data["schema"], data["version"], data["mode"], data["reference"]) == (
        "erasus_hf.deletion_ledger", 1, "adapter", "previous",
    )  # fmt: skip
    a, b, retain = _requests(tofu_slice)
    for rows in (a, b, retain):
        for row in rows:
            assert row["answer"][:40] not in text and row["question"][:40] not in text
    first, second = data["requests"]
    assert (first["id"], first["rows"], second["rows"]) == ("request-0001", 20, 20)
    assert len(first["fingerprint"]) == 64 and len(first["row_sha256"]) == 20
    assert first["strategy"]["name"] == "npo" and first["config"]["learning_rate"] == 2e-3
    assert first["retain"]["rows"] == 40 and first["overlap"] == {}
    assert first["evaluation"]["forget_nll_after"] > 1.0
    card = (folder / "README.md").read_text()
    assert "request-0001" in card and "request-0002" in card and first["fingerprint"][:12] in card
    request_card = (folder / "requests" / "request-0002" / "README.md").read_text()
    assert "request-0002 of a deletion ledger" in request_card
    assert (folder / "requests" / "request-0002" / "eval.json").is_file()
    assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no pending folder or temporary ledger left


# ---- idempotence and overlap


def test_the_same_rows_again_are_a_no_op(sequence, tofu_slice, tmp_path):
    folder = sequence["folder"]
    a, _, retain = _requests(tofu_slice)
    again = a.shuffle(seed=1).add_column("source", ["mail"] * len(a))  # another order, another column: same rows
    before = snapshot(folder)
    outcome = apply_request(sequence["ledger"], again, config(folder, **FORGETTING), retain=retain)
    assert not outcome.applied and outcome.trainer is None
    assert outcome.record.id == "request-0001" and "applied already as request-0001" in outcome.message
    assert snapshot(folder) == before


def test_a_request_sharing_rows_says_how_many(quick, tofu_slice, tmp_path):
    a, b, retain = _requests(tofu_slice)
    folder, ledger = _copy(quick, tmp_path)
    rows = Dataset.from_list([*a.select(range(10)), *b.select(range(15))])
    outcome = apply_request(ledger, rows, config(folder, **QUICK), retain=retain)
    assert outcome.applied and outcome.record.overlap == {"request-0001": 10, "request-0002": 15}
    assert "10 of its rows were in request-0001, 15 of its rows were in request-0002" in outcome.message


def test_a_request_with_a_holdout_is_verified_and_the_result_recorded(quick, tofu_slice, tmp_path):
    forget, _ = tofu_slice
    a, _, retain = _requests(tofu_slice)
    # rows never trained on, of the same kind: author B's questions with their paraphrased answers
    holdout = forget.select(range(20, 40)).select_columns(["question", "paraphrased_answer"])
    holdout = holdout.rename_column("paraphrased_answer", "answer")
    folder, ledger = _copy(quick, tmp_path)
    kwargs = {"relearn_steps": (), "bootstrap_resamples": 50}
    outcome = apply_request(
        ledger, a.select(range(10)), config(folder, **QUICK), retain=retain, holdout=holdout, verifier_kwargs=kwargs
    )
    verification = outcome.record.verification
    assert verification["checks"] > 0 and verification["holdout_rows"] == 20
    assert "checks tell its rows from the holdout" in outcome.message
    saved = json.loads((folder / verification["file"]).read_text())
    assert len(saved["checks"]) == verification["checks"]
    assert "Guarantees and verification" in (folder / "requests" / "request-0003" / "README.md").read_text()
    assert f"of {verification['checks']} checks distinguishable" in (folder / "README.md").read_text()


# ---- replay, merging, full fine-tuning


def test_replaying_the_ledger_gives_the_same_weights(quick, tofu_slice, tmp_path):
    a, b, retain = _requests(tofu_slice)
    replayed = replay(quick, [a, b], str(tmp_path / "replayed"), retain=retain)
    assert [r.state_sha256 for r in replayed.requests] == [r.state_sha256 for r in quick.requests]
    for left, right in zip(load_state(quick)[0].state_dict().values(), load_state(replayed)[0].state_dict().values()):
        assert torch.equal(left, right)
    with pytest.raises(RequestError, match="fingerprint"):  # the rows of another request, refused before compute
        replay(quick, [b, a], str(tmp_path / "wrong"), retain=retain)


def test_merging_every_request_reaches_the_state_of_stacked_adapters(quick, base, tofu_slice, tmp_path):
    a, b, retain = _requests(tofu_slice)
    ledger, _ = _run(tmp_path / "merged", base, [a, b], retain, QUICK, merge_every=1)
    assert [m.after_request for m in ledger.merges] == ["request-0001", "request-0002"]
    assert (tmp_path / "merged" / "merges" / "request-0002" / "model.safetensors").is_file()
    assert ledger.stack() == (ledger.artifact_path("merges/request-0002"), [])
    assert [r.state_sha256 for r in ledger.requests] == [r.state_sha256 for r in quick.requests]


@pytest.mark.parametrize("reference", ["previous", "original"])
def test_full_fine_tuning_applies_requests_in_sequence_with_the_reference_asked_for(
    reference, base, tofu_slice, tmp_path
):
    a, b, retain = _requests(tofu_slice)
    overrides = {**QUICK, "use_peft": False, "reference": "copy"}  # a copy: its weights can be inspected
    ledger, (first, second) = _run(tmp_path / "run", base, [a, b], retain, overrides, mode="full", reference=reference)
    assert (tmp_path / "run" / "requests" / "request-0002" / "model.safetensors").is_file()
    assert ledger.stack() == (ledger.artifact_path("requests/request-0002"), [])
    assert state_sha256(load_state(ledger)[0]) == second.record.state_sha256 != first.record.state_sha256
    expected = ledger.base_sha256 if reference == "original" else first.record.state_sha256
    assert state_sha256(second.trainer.reference.model) == expected


# ---- interruption


class _Interrupt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt


def test_an_interrupted_request_leaves_the_ledger_and_the_state(quick, tofu_slice, tmp_path, monkeypatch):
    a, _, retain = _requests(tofu_slice)
    folder, ledger = _copy(quick, tmp_path)
    before = snapshot(folder)
    rows = a.select(range(5))  # a new request (rows of the first)
    with pytest.raises(KeyboardInterrupt):
        apply_request(ledger, rows, config(folder, **QUICK), retain=retain, callbacks=[_Interrupt()])
    assert snapshot(folder) == before and len(ledger.requests) == 2

    # killed after its folder moved into place, before the ledger was written: the folder is not part of the state
    def crash(self):
        raise RuntimeError("killed")

    monkeypatch.setattr(DeletionLedger, "save", crash)
    with pytest.raises(RuntimeError, match="killed"):
        apply_request(ledger, rows, config(folder, **QUICK), retain=retain)
    assert (folder / "requests" / "request-0003").is_dir()
    assert (folder / "ledger.json").read_bytes() == before["ledger.json"]
    reread = DeletionLedger.load(str(folder / "ledger.json"))
    assert state_sha256(load_state(reread)[0]) == quick.requests[-1].state_sha256
    monkeypatch.undo()
    # the next request clears the orphan first
    outcome = apply_request(reread, rows, config(folder, **QUICK), retain=retain)
    assert outcome.record.id == "request-0003" and len(DeletionLedger.load(str(folder / "ledger.json")).requests) == 3


# ---- refusals, before any compute


@pytest.fixture
def no_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the request was refused only after loading the model")

    monkeypatch.setattr(apply_module, "load_state", refuse)


def test_bad_requests_are_refused_before_any_compute(quick, tofu_slice, tmp_path, no_compute):
    a, b, retain = _requests(tofu_slice)
    folder, ledger = _copy(quick, tmp_path)
    before = snapshot(folder)
    new = retain.select(range(5))
    cases = [
        (new, {"use_peft": False}, {}, "use_peft must be True"),
        (new, {"coreset": "random", "coreset_fraction": 0.5}, {}, "coreset must be None"),
        (new, {"merge_adapter": True}, {}, "merge_every"),
        (new, {"push_to_hub": True, "hub_model_id": "you/model"}, {}, "erasus-hf push"),
        (a.select(range(15)), {}, {"holdout": a.select(range(3))}, "holdout"),
        (Dataset.from_dict({"question": [], "answer": []}), {}, {}, "empty"),
        ([dict(a[0]), {"text": "plain text"}], {}, {}, "row 1 has columns"),
        ([dict(a[0]), {"question": None, "answer": "x"}], {}, {}, "row 1, column 'question' is None"),
    ]
    for rows, overrides, kwargs, message in cases:
        with pytest.raises(RequestError, match=message):
            apply_request(ledger, rows, config(folder, **{**QUICK, **overrides}), **kwargs)
    assert snapshot(folder) == before
    with pytest.raises(RequestError, match="records reference='previous'"):
        open_ledger(str(folder), reference="original")
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(RequestError, match="not a deletion ledger"):
        open_ledger(str(tmp_path / "other.json"))
    with pytest.raises(RequestError, match="needs the model"):
        open_ledger(str(tmp_path / "empty"))


# ---- the command line


def test_erasus_hf_forget_runs_offline_and_is_idempotent(base, tofu_slice, tmp_path, capsys):
    a, b, retain = _requests(tofu_slice)
    for name, rows in (("a", a), ("b", b), ("retain", retain)):
        rows.to_json(str(tmp_path / f"{name}.jsonl"))
    run = str(tmp_path / "run")
    options = [
        "--output_dir", run, "--use_peft", "--strategy", "npo",
        "--retain_dataset_name", str(tmp_path / "retain.jsonl"),
        "--max_steps", "2", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    assert main(["forget", str(tmp_path / "a.jsonl"), "--model_name_or_path", base, *options]) == 0
    assert main(["forget", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), *options]) == 0
    out = capsys.readouterr().out
    assert "applied already as request-0001" in out and "Applied request-0002" in out
    ledger = DeletionLedger.load(os.path.join(run, "ledger.json"))
    assert [r.source for r in ledger.requests] == ["a.jsonl", "b.jsonl"]
    assert ledger.requests[0].config["max_steps"] == 2 and ledger.mode == "adapter"

    with pytest.raises(SystemExit) as exit_info:  # a first request without the model: one line, before compute
        main(["forget", str(tmp_path / "a.jsonl"), *options[:1], str(tmp_path / "new"), *options[2:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs --model_name_or_path" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):  # the ledger's mode is adapter: full fine-tuning is refused
        main(["forget", str(tmp_path / "retain.jsonl"), *[o for o in options if o != "--use_peft"], "--use_peft",
              "false"])  # fmt: skip
    assert "use_peft must be True" in capsys.readouterr().err
    assert len(DeletionLedger.load(os.path.join(run, "ledger.json")).requests) == 2
