"""`push_output` against a local Hub-protocol server (tests/hub_server.py), through the real huggingface_hub client
over real HTTP: what is shipped (byte for byte), what is refused before any request, Hub failures and retries, and
that the token reaches the server and nothing else."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http
from peft import LoraConfig, get_peft_model

from erasus_hf.hub.push import files_to_push, push_output

from .testing_utils import fake_adapter, snapshot

pytestmark = pytest.mark.usefixtures("hf_home")

TOKEN = "hf_testtoken123"
REPO = "unlearner/tiny-npo"


@pytest.fixture
def backoff_sleeps(monkeypatch):
    """huggingface_hub retries 5xx answers itself, sleeping 1, 2, 4, 8, 8 s: record the sleeps instead of waiting."""
    sleeps: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    return sleeps


def add_decoys(folder: Path) -> None:
    """What an output folder also holds and must not be shipped: trainer state, checkpoints, logs, stray files."""
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    checkpoint = folder / "checkpoint-1"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    (checkpoint / "trainer_state.json").write_text("{}")
    torch.save({}, checkpoint / "optimizer.pt")
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents.1").write_bytes(b"\x00tb")
    (folder / "notes.txt").write_text("scratch")


@pytest.fixture
def output_dir(tmp_path, tiny_llama, tokenizer):
    """A real LoRA output folder: adapter, tokenizer, model card, eval.json, plus the decoys."""
    folder = tmp_path / "out"
    model = get_peft_model(tiny_llama, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\nlibrary_name: peft\n---\n# tiny-npo\nUnlearned.\n")
    (folder / "eval.json").write_text(json.dumps({"summary": {"forget_quality": 0.42}, "per_example": {}}))
    add_decoys(folder)
    return folder


def test_push_ships_exactly_the_allowed_files(hub, output_dir):
    before = snapshot(output_dir)
    url = push_output(str(output_dir), REPO, private=True, token=TOKEN, endpoint=hub.url)

    repo = hub.repos[REPO]
    assert repo.private is True and repo.repo_type == "model"
    shipped = hub.files(REPO)
    expected = {
        name: data for name, data in before.items() if "/" not in name and name not in ("optimizer.pt", "notes.txt")
    }
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "eval.json", "tokenizer.json"} <= set(
        expected
    )
    assert shipped == expected  # same names, byte-identical content
    assert not any(name.endswith((".pt", ".txt")) or "/" in name for name in shipped)
    assert len(repo.commits) == 1 and repo.commits[0]["summary"] == "Upload unlearned LoRA adapter with erasus_hf"
    assert url == f"{hub.url}/{REPO}/commit/{repo.commits[0]['oid']}"
    assert hub.requests == [
        ("POST", "/api/repos/create"),
        ("POST", "/api/validate-yaml"),
        ("POST", f"/api/models/{REPO}/preupload/main"),
        ("POST", f"/api/models/{REPO}/commit/main"),
    ]
    assert hub.unhandled == []
    assert snapshot(output_dir) == before


def test_sharded_full_model_and_branch(hub, tmp_path, tiny_llama):
    folder = tmp_path / "merged"
    tiny_llama.save_pretrained(folder, max_shard_size="20KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()

    url = push_output(str(folder), REPO, token=TOKEN, endpoint=hub.url, revision="unlearned")
    assert hub.repos[REPO].private is False
    assert hub.files(REPO, "unlearned") == snapshot(folder)  # shards, index, config.json, generation_config.json
    assert hub.files(REPO, "main") == {}
    assert ("POST", f"/api/models/{REPO}/branch/unlearned") in hub.requests
    assert url.startswith(f"{hub.url}/{REPO}/commit/")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: (fake_adapter(d) / "pytorch_model.bin").write_bytes(b"PK"), "pytorch_model.bin"),
        (lambda d: (fake_adapter(d) / "adapter_model.pkl").write_bytes(b"\x80"), "adapter_model.pkl"),
        (lambda d: (fake_adapter(d) / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "No safetensors weights"),
        (lambda d: (fake_adapter(d) / "adapter_model.safetensors").write_bytes(b"truncated"), "not readable"),
        (lambda d: (fake_adapter(d) / "eval.json").write_text("{"), "eval.json"),
        (
            lambda d: (fake_adapter(d) / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})
            ),
            "missing from the folder",
        ),
        (lambda d: (fake_adapter(d) / "model-00001-of-00002.safetensors").write_bytes(b""), "no model.safetensors"),
    ],
)
def test_bad_folders_refused_before_any_request(hub, tmp_path, make, message):
    folder = tmp_path / "out"
    make(folder)
    before = snapshot(folder)
    with pytest.raises(ValueError, match=message):
        push_output(str(folder), REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == [] and hub.repos == {}
    assert snapshot(folder) == before


def test_missing_folder_refused(hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        push_output(str(tmp_path / "no_such_dir"), REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_trainer_state_tolerated_but_not_shipped(tmp_path):
    folder = fake_adapter(tmp_path / "out")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "rng_state_1.pth", "training_args.bin"):
        (folder / name).write_bytes(b"pickle")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    assert files_to_push(str(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
    (folder / "README.md").write_text("# a checkpoint's card\n")
    assert files_to_push(str(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert files_to_push(str(folder), card=False) == ["adapter_config.json", "adapter_model.safetensors"]


def test_transient_commit_500_is_retried_by_the_client(hub, tmp_path, backoff_sleeps):
    folder = fake_adapter(tmp_path / "out")
    hub.fail_next_commit_with = 500
    push_output(str(folder), REPO, token=TOKEN, endpoint=hub.url)
    assert hub.commit_attempts == 2 and backoff_sleeps == [1]
    assert hub.files(REPO) == snapshot(folder)


def test_commit_500_clear_error_folder_untouched_and_retry_succeeds(hub, output_dir, backoff_sleeps):
    before = snapshot(output_dir)
    hub.fail_next_commit_with, hub.fail_commit_count = 500, 100  # the Hub stays down through the client's retries
    with pytest.raises(HfHubHTTPError) as failure:
        push_output(str(output_dir), REPO, token=TOKEN, endpoint=hub.url)
    message = str(failure.value)
    assert REPO in message and "HTTP 500" in message and "local folder was not modified" in message
    assert hub.commit_attempts == 1 + len(backoff_sleeps) and len(backoff_sleeps) >= 1
    assert hub.files(REPO) == {} and hub.repos[REPO].commits == []
    assert snapshot(output_dir) == before

    hub.fail_next_commit_with = None  # the Hub is back
    push_output(str(output_dir), REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests.count(("POST", "/api/repos/create")) == 2  # the second answered 409, accepted as exist_ok
    assert set(hub.files(REPO)) >= {"adapter_model.safetensors", "README.md", "eval.json"}
    assert all(hub.files(REPO)[name] == before[name] for name in hub.files(REPO))
    assert snapshot(output_dir) == before


def test_token_reaches_the_server_and_nothing_else(hub, tmp_path, output_dir, backoff_sleeps, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    hub.fail_next_commit_with, hub.fail_commit_count = 500, 100
    with pytest.raises(HfHubHTTPError) as failure:
        push_output(str(output_dir), REPO, token=TOKEN, endpoint=hub.url)
    hub.fail_next_commit_with = None
    push_output(str(output_dir), REPO, token=TOKEN, endpoint=hub.url, commit_message="unlearned")

    assert hub.authorizations and set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert "Pushing" in caplog.text and "/commit/main" in caplog.text  # the capture works: our and client logs
    out, err = capfd.readouterr()
    places = {
        "log records": caplog.text,
        "stdout": out,
        "stderr": err,
        "exception": "".join(traceback.format_exception(failure.value)),
        "commit messages": json.dumps(hub.repos[REPO].commits),
    }
    for root in (output_dir, tmp_path / "hf_home"):
        places.update({str(p): p.read_bytes().decode("latin-1") for p in root.rglob("*") if p.is_file()})
    places.update({f"uploaded {k}": v.decode("latin-1") for k, v in hub.files(REPO).items()})
    assert [where for where, text in places.items() if TOKEN in text] == []


def test_commit_message_with_the_token_refused(hub, tmp_path):
    folder = fake_adapter(tmp_path / "out")
    with pytest.raises(ValueError, match="contains the Hub token") as failure:
        push_output(str(folder), REPO, token=TOKEN, endpoint=hub.url, commit_message=f"pushed with {TOKEN}")
    assert TOKEN not in str(failure.value) and hub.requests == []


def test_environment_route_in_a_subprocess(hub, tmp_path):
    """HF_ENDPOINT and HF_TOKEN set before huggingface_hub is imported: no endpoint or token passed to push_output.
    push.py is loaded by path to skip the package import (torch, transformers: ~10 s); it imports only the Hub libs."""
    folder = fake_adapter(tmp_path / "out")
    push_py = Path(__file__).resolve().parents[1] / "erasus_hf" / "hub" / "push.py"
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('push', {str(push_py)!r})\n"
        "push = importlib.util.module_from_spec(spec); spec.loader.exec_module(push)\n"
        "from huggingface_hub import constants\n"
        "print(constants.ENDPOINT)\n"
        "print(push.push_output(sys.argv[1], sys.argv[2]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), REPO], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    endpoint, url = done.stdout.split()[-2:]
    assert endpoint == hub.url and url == f"{hub.url}/{REPO}/commit/{hub.repos[REPO].commits[0]['oid']}"
    assert hub.files(REPO) == snapshot(folder)
    assert set(hub.authorizations) == {f"Bearer {TOKEN}"}
    assert TOKEN not in done.stdout + done.stderr
