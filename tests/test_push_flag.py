"""The standard `TrainingArguments.push_to_hub=True` flag with `UnlearningTrainer`, end to end against the local
Hub-protocol server (tests/hub_server.py) through the real huggingface_hub client: checkpoint saves push the
weights and never a checkpoint or the trainer's state, `save_model()` and `push_to_hub()` push once (no recursion
between them), and hub strategies that would upload checkpoints are refused."""

import fnmatch
import logging
import os
import types
from concurrent.futures import Future

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.utils import _http

from erasus_hf import UnlearningTrainer

from .hub_server import HubServer
from .testing_utils import config, qa

TOKEN = "hf_testtoken123"
REPO = "me/tiny-npo-flag"
FORBIDDEN = ("checkpoint-*", "optimizer.pt", "scheduler.pt", "rng_state*", "trainer_state.json", "training_args.bin")


def flagged(tmp_path, tokenizer, model, tofu_slice, **kwargs) -> UnlearningTrainer:
    """An NPO + LoRA trainer with the Trainer's own Hub flag on."""
    forget, retain = (qa(d) for d in tofu_slice)
    kwargs = {"push_to_hub": True, "hub_model_id": REPO, "hub_token": TOKEN, **kwargs}
    args = config(tmp_path, strategy="npo", use_peft=True, learning_rate=1e-2, **kwargs)
    return UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer)


def uploaded_paths(hub: HubServer) -> list[str]:
    """Every path any commit to REPO uploaded, on any branch."""
    return [path for commit in hub.repos[REPO].commits for path in commit["paths"]]


def forbidden(paths: list[str]) -> list[str]:
    """The paths in a subfolder or naming the trainer's state."""
    return [p for p in paths if "/" in p or any(fnmatch.fnmatchcase(p, pattern) for pattern in FORBIDDEN)]


def test_steps_push_weights_never_checkpoints_then_one_final_push(hub, tmp_path, tokenizer, tiny_llama, tofu_slice):
    # hub_always_push: every save pushes (queued in order) instead of being skipped while one is in flight
    trainer = flagged(
        tmp_path, tokenizer, tiny_llama, tofu_slice, max_steps=4, save_strategy="steps", save_steps=2,
        hub_always_push=True,
    )  # fmt: skip
    assert hub.repos[REPO].commits == []  # the repo is created at construction, as the Trainer does
    trainer.train()  # no RecursionError

    out = trainer.args.output_dir
    checkpoint = os.path.join(out, "checkpoint-4")
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json", "README.md"} <= set(os.listdir(checkpoint))
    commits = hub.repos[REPO].commits
    assert [c["summary"] for c in commits] == ["Training in progress, step 2", "Training in progress, step 4"]
    paths = uploaded_paths(hub)
    assert forbidden(paths) == [] and "README.md" not in paths  # the card comes with the final push
    main = hub.files(REPO)
    assert {"adapter_model.safetensors", "adapter_config.json", "unlearning_config.json", "strategy.json"} <= set(main)
    for name, data in main.items():  # the repo holds step 4's weights, byte for byte
        assert data == open(os.path.join(checkpoint, name), "rb").read(), name
    assert not any(name.startswith("_") for name in os.listdir(out))  # the staging folders are gone

    before = hub.requests.count(("POST", f"/api/models/{REPO}/commit/release"))
    url = trainer.push_to_hub(commit_message="Unlearned two authors", blocking=True, token=TOKEN, revision="release")
    commits = hub.repos[REPO].commits
    assert len(commits) == 3 and hub.requests.count(("POST", f"/api/models/{REPO}/commit/release")) == before + 1
    final = commits[-1]
    assert final["summary"] == "Unlearned two authors" and final["revision"] == "release"
    assert url == f"{hub.url}/{REPO}/commit/{final['oid']}"
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(final["paths"])
    paths = uploaded_paths(hub)
    assert forbidden(paths) == [] and paths.count("README.md") == 1
    release = hub.files(REPO, "release")
    for name in ("README.md", "adapter_model.safetensors"):
        assert release[name] == open(os.path.join(out, name), "rb").read()
    card = ModelCard(release["README.md"].decode())
    assert {"erasus-hf", "unlearning", "npo"} <= set(card.data.tags)
    assert hub.files(REPO) == main  # main keeps the training pushes
    assert TOKEN not in b"".join(release.values()).decode("latin-1")
    assert hub.unhandled == [] and set(hub.authorizations) == {f"Bearer {TOKEN}"}


def test_save_model_with_the_flag_pushes_once(hub, tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = flagged(tmp_path, tokenizer, tiny_llama, tofu_slice)
    trainer.save_model()  # the Trainer's save_model pushes with the flag on; ours must not recurse
    commits = hub.repos[REPO].commits
    assert [c["summary"] for c in commits] == ["Model save"]  # the Trainer's message
    assert {"README.md", "adapter_model.safetensors", "adapter_config.json"} <= set(commits[0]["paths"])
    assert forbidden(commits[0]["paths"]) == []

    elsewhere = tmp_path / "elsewhere"
    trainer.save_model(str(elsewhere))  # saved there; the push is of output_dir, as the Trainer's
    assert (elsewhere / "adapter_model.safetensors").is_file()
    assert [c["summary"] for c in hub.repos[REPO].commits] == ["Model save", "Model save"]


def test_failed_training_push_is_logged_and_training_goes_on(
    hub, tmp_path, tokenizer, tiny_llama, tofu_slice, monkeypatch, caplog
):
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda s: None))  # the client's retry backoff
    trainer = flagged(tmp_path, tokenizer, tiny_llama, tofu_slice, max_steps=2, save_strategy="steps", save_steps=2)
    hub.fail_next_commit_with, hub.fail_commit_count = 500, 100  # the Hub stays down through the client's retries
    with caplog.at_level(logging.WARNING, logger="erasus_hf.hub.sharing"):
        trainer.train()
    assert "Training in progress, step 2: pushing to me/tiny-npo-flag failed" in caplog.text
    assert TOKEN not in caplog.text and hub.repos[REPO].commits == []
    assert not any(name.startswith("_") for name in os.listdir(trainer.args.output_dir))

    hub.fail_next_commit_with = None  # the Hub is back: the final push carries everything
    trainer.push_to_hub(token=TOKEN)
    assert {"README.md", "adapter_model.safetensors"} <= set(hub.files(REPO))


def test_non_blocking_push_returns_a_future(hub, tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = flagged(tmp_path, tokenizer, tiny_llama, tofu_slice, push_to_hub=False)
    future = trainer.push_to_hub("Unlearned", False, TOKEN, repo_id=REPO)  # the Trainer's positional order
    assert isinstance(future, Future)
    url = future.result(timeout=60)
    commit = hub.repos[REPO].commits[-1]
    assert url == f"{hub.url}/{REPO}/commit/{commit['oid']}" and commit["summary"] == "Unlearned"
    assert "adapter_model.safetensors" in hub.files(REPO)


@pytest.mark.parametrize("strategy", ["checkpoint", "all_checkpoints"])
def test_hub_strategies_that_upload_checkpoints_refused(hub, tmp_path, tokenizer, tiny_llama, tofu_slice, strategy):
    with pytest.raises(ValueError, match=f"hub_strategy='{strategy}'.*every_save"):
        flagged(tmp_path, tokenizer, tiny_llama, tofu_slice, save_strategy="steps", hub_strategy=strategy)
    assert hub.requests == []


def test_push_without_a_repo_refused_before_saving(hub, tmp_path, tokenizer, tiny_llama, tofu_slice):
    trainer = flagged(tmp_path, tokenizer, tiny_llama, tofu_slice, push_to_hub=False, hub_model_id=None)
    with pytest.raises(ValueError, match="needs a repo_id"):
        trainer.push_to_hub(token=TOKEN)
    assert not os.path.exists(os.path.join(trainer.args.output_dir, "adapter_model.safetensors"))
    assert hub.requests == []
