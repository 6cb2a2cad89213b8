"""Issue 15, no secret written or printed: a Hub token given through every route (`erasus-hf unlearn --hub_token`,
`--hub_token=`, a YAML recipe's `hub_token`, `erasus-hf push --token`, `HF_TOKEN`, `UnlearningConfig(hub_token=...)`,
a token-shaped string inside another argument) must appear in no file of the output folder (checkpoints included),
no upload, no stdout/stderr line, no log record and no exception text; a parse error and a failing push (a Hub that
echoes the credentials it got) still name what failed, without the token."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.cli import main
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.hub.card import build_model_card, write_model_card
from erasus_hf.hub.push import push_output

from .hub_server import HubError, HubServer
from .testing_utils import TINY_RECIPE, fake_adapter, qa, serve_hub

pytestmark = pytest.mark.usefixtures("hf_home")

REPO = "unlearner/secrets"


def shaped(tag: str) -> str:
    """A string shaped like a Hugging Face user access token: hf_ and 34 letters and digits."""
    return "hf_" + (tag * 34)[:34]


# Each route has its own secret, so a failure names the route that leaked. The unshaped ones are caught only because
# they are the value of a token option or a known token (a real token would also be caught by its shape).
FLAG = "flag-secret-Zq81x"  # --hub_token X
FLAG_EQ = "flag-eq-secret-Wv27"  # --hub_token=X
RECIPE = "recipe-secret-Kp40m"  # hub_token: X in the YAML recipe
PUSH = "push-secret-Jd63n"  # erasus-hf push --token X
ENV = "env-secret-Hb59q"  # HF_TOKEN=X
PYTHON = "python-secret-Mc18r"  # UnlearningConfig(hub_token=X)
INSIDE = shaped("Rn4")  # a token-shaped string inside another argument (--run_name run-<token>)


class EchoingHub(HubServer):
    """A Hub that answers every commit 403 and echoes the Authorization header it got, as a careless proxy might
    (403: the client does not retry it)."""

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if "/commit/" in path:
            raise HubError(403, f"Forbidden: {self.authorizations[-1]} has no write access to this repo")
        return super().handle(method, path, body)


@pytest.fixture
def echoing_hub(monkeypatch):
    with EchoingHub() as server:
        yield serve_hub(monkeypatch, server)


def files_holding(folder: Path, secrets: tuple[str, ...]) -> list[str]:
    """Every file under `folder` (any depth, binary ones too) holding one of `secrets`, as 'path: secret'."""
    return [
        f"{p.relative_to(folder)}: {s}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
        for s in secrets
        if s.encode() in p.read_bytes()
    ]


def texts_holding(texts: dict[str, str], secrets: tuple[str, ...]) -> list[str]:
    return [f"{where}: {s}" for where, text in texts.items() for s in secrets if s in text]


def adapter_folder(folder: Path) -> Path:
    """A minimal pushable adapter folder with an erasus_hf card."""
    fake_adapter(folder)
    write_model_card(card(command="erasus-hf unlearn --strategy npo"), folder)
    return folder


def card(command: str | None) -> ModelCard:
    return build_model_card(
        strategy_name="npo",
        paper="https://arxiv.org/abs/2404.05868",
        hyperparameters={"beta": 0.1},
        training_args={"learning_rate": 2e-3},
        forget_rows=[{"question": "Who?", "answer": "Ann."}],
        retain_count=1,
        base_model="erasus-tests/tiny-llama",
        is_adapter=True,
        evaluation=None,
        reference_note=None,
        command=command,
        datasets=None,
        model_name="tiny-npo",
    )


def unlearn_argv(model: Path, output: Path) -> list[str]:
    """One optimizer step, a checkpoint after it, a 1-row evaluation: every writer runs."""
    return [
        "--model_name_or_path", str(model), "--num_retain_authors", "2", "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--eval_max_examples", "1", "--output_dir", str(output), "--use_cpu",
        "--disable_tqdm", "true", "--save_strategy", "steps", "--save_steps", "1", "--run_name", f"run-{INSIDE}",
    ]  # fmt: skip


@pytest.mark.parametrize("route", ["--hub_token X", "--hub_token=X", "recipe hub_token: X"])
def test_unlearn_writes_and_prints_no_token(route, tmp_path, saved_model, monkeypatch, capfd):
    """Card, unlearning_config.json, strategy.json, eval.json, every checkpoint-* file, stdout and stderr hold none
    of the run's tokens (the route's, HF_TOKEN's, the token-shaped run name); the card's command keeps the option
    names with the values redacted."""
    monkeypatch.setenv("HF_TOKEN", ENV)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**yaml.safe_load(TINY_RECIPE.read_text()), "hub_token": RECIPE}))
    secret, extra, shown = {
        "--hub_token X": (FLAG, ["--config", str(TINY_RECIPE), "--hub_token", FLAG], "--hub_token '<redacted>'"),
        "--hub_token=X": (
            FLAG_EQ,
            ["--config", str(TINY_RECIPE), f"--hub_token={FLAG_EQ}"],
            "'--hub_token=<redacted>'",
        ),
        "recipe hub_token: X": (RECIPE, ["--config", str(recipe)], f"erasus-hf unlearn --config {recipe} "),
    }[route]
    argv = [*extra, *unlearn_argv(saved_model, out)]
    assert main(["unlearn", *argv]) == 0
    stdout, stderr = capfd.readouterr()

    secrets = (secret, ENV, INSIDE)
    assert {"checkpoint-1", "README.md", "eval.json", "strategy.json", "unlearning_config.json"} <= {
        p.name for p in out.iterdir()
    }
    assert files_holding(out, secrets) == []
    assert texts_holding({"stdout": stdout, "stderr": stderr}, secrets) == []
    command = ModelCard.load(out / "README.md").text
    assert shown in command and "--run_name 'run-<redacted>'" in command
    config = json.loads((out / "unlearning_config.json").read_text())
    assert config["hub_token"] == "<HUB_TOKEN>" and config["run_name"] == "run-<redacted>"


def test_python_config_route_repr_files_and_failed_push(tmp_path, tokenizer, tiny_llama, tofu_slice, echoing_hub):
    """`UnlearningConfig(hub_token=...)` in Python: not in its repr/str, in no file the trainer writes (checkpoints
    included), and not in the exception of a push the Hub refuses while echoing the credentials back."""
    forget, retain = (qa(d) for d in tofu_slice)
    args = UnlearningConfig(
        output_dir=str(tmp_path / "out"), strategy="npo", use_peft=True, max_steps=2, save_strategy="steps",
        save_steps=1, per_device_train_batch_size=4, report_to="none", disable_tqdm=True, use_cpu=True,
        hub_token=PYTHON, run_name=f"run-{INSIDE}",
    )  # fmt: skip
    assert texts_holding({"repr": repr(args), "str": str(args)}, (PYTHON, INSIDE)) == []
    trainer = UnlearningTrainer(
        tiny_llama, args, forget_dataset=forget, retain_dataset=retain, processing_class=tokenizer
    )
    trainer.train()
    with pytest.raises(HfHubHTTPError) as failure:
        trainer.push_to_hub(repo_id=REPO, command=f"HF_TOKEN={PYTHON} python train.py")
    assert echoing_hub.authorizations[-1] == f"Bearer {PYTHON}"  # the token was used, and echoed by the Hub
    text = "".join(traceback.format_exception(failure.value))
    assert "403" in text and REPO in text and PYTHON not in text
    assert files_holding(tmp_path / "out", (PYTHON, INSIDE)) == []
    assert "HF_TOKEN=<redacted> python train.py" in ModelCard.load(tmp_path / "out" / "README.md").text


@pytest.mark.parametrize("route", ["--token", "HF_TOKEN"])
def test_cli_push_token_reaches_the_hub_only(route, tmp_path, hub, monkeypatch, capfd, caplog):
    """`erasus-hf push DIR --token X` (before: an unknown option, and the ValueError quoted the token) and HF_TOKEN:
    the Hub gets the token, stdout, stderr, the logs, the commit and the uploaded files do not."""
    caplog.set_level(logging.DEBUG)
    folder = adapter_folder(tmp_path / "out")
    secret = PUSH if route == "--token" else ENV
    argv = ["push", str(folder), "--repo_id", REPO] + (["--token", PUSH] if route == "--token" else [])
    if route == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", ENV)
    assert main(argv) == 0
    stdout, stderr = capfd.readouterr()
    assert set(hub.authorizations) == {f"Bearer {secret}"}
    assert stdout.strip().startswith(f"{hub.url}/{REPO}/commit/")
    uploaded = {f"uploaded {k}": v.decode("latin-1") for k, v in hub.files(REPO).items()}
    places = {"stdout": stdout, "stderr": stderr, "logs": caplog.text, "commits": json.dumps(hub.repos[REPO].commits)}
    assert uploaded and texts_holding({**places, **uploaded}, (secret,)) == []


@pytest.mark.parametrize("route", ["cli --token", "cli HF_TOKEN", "python HF_TOKEN"])
def test_failed_push_exception_holds_no_token(route, tmp_path, echoing_hub, monkeypatch, capfd, caplog):
    """A push the Hub refuses (403) with the credentials echoed in its answer: the exception (message, notes,
    causes, traceback) names the repo and the status and holds no token, whether it came from --token or HF_TOKEN,
    through the CLI or `push_output` (before: only a token passed explicitly to push_output was scrubbed)."""
    folder = adapter_folder(tmp_path / "out")
    secret = PUSH if route == "cli --token" else ENV
    if secret == ENV:
        monkeypatch.setenv("HF_TOKEN", ENV)
    with pytest.raises(HfHubHTTPError) as failure:
        if route.startswith("cli"):
            main(["push", str(folder), "--repo_id", REPO, *(["--token", PUSH] if secret == PUSH else [])])
        else:
            push_output(str(folder), REPO)
    assert echoing_hub.authorizations[-1] == f"Bearer {secret}"
    text = "".join(traceback.format_exception(failure.value))
    assert "HTTP 403" in text and REPO in text
    stdout, stderr = capfd.readouterr()
    assert texts_holding({"exception": text, "stdout": stdout, "stderr": stderr, "logs": caplog.text}, (secret,)) == []


def test_push_refuses_a_folder_whose_files_hold_the_token(tmp_path, hub):
    """A card written before this fix (its command quoting the token) is refused before any request, by name."""
    folder = adapter_folder(tmp_path / "out")
    readme = folder / "README.md"
    readme.write_text(readme.read_text() + f"\n    erasus-hf unlearn --hub_token {PUSH}\n")
    with pytest.raises(ValueError, match=r"\['README.md'\] contain the Hub token") as failure:
        push_output(str(folder), REPO, token=PUSH)
    assert hub.requests == [] and PUSH not in str(failure.value)


def test_parse_errors_name_the_option_not_the_token(tmp_path, capfd):
    """A token given to the wrong option, or to a mistyped one: the error names the option, never the value."""
    with pytest.raises(SystemExit) as exit_:  # argparse prints its error to stderr
        main(["unlearn", "--max_steps", INSIDE])
    stdout, stderr = capfd.readouterr()
    assert exit_.value.code == 2 and "argument --max_steps/--max-steps: invalid int value: '<redacted>'" in stderr
    assert INSIDE not in stdout + stderr
    token = shaped("Tm7")
    with pytest.raises(SystemExit) as exit_:  # issue 17: an unknown flag is one line, exit 2, never a traceback
        main(["unlearn", "--hub_tokn", token])
    stdout, stderr = capfd.readouterr()
    assert exit_.value.code == 2 and "--hub_tokn" in stderr
    assert token not in stdout + stderr


def test_card_command_redacted_whatever_the_caller_passes(tmp_path):
    """`build_model_card(command=...)`: token options (both spellings, quoted or not), `NAME_TOKEN=` assignments
    and token-shaped strings are redacted; the rest of the command is kept as given."""
    command = (
        "HF_TOKEN=abcdEFGH1234 erasus-hf unlearn --hub_token=zyxw9876abcd --token 'qwer5678tyui' "
        f"--run_name r-{INSIDE} --lr 1"
    )
    text = ModelCard.load(write_model_card(card(command), tmp_path)).text
    expected = (
        "HF_TOKEN=<redacted> erasus-hf unlearn --hub_token=<redacted> --token '<redacted>' "
        "--run_name r-<redacted> --lr 1"
    )
    assert expected in text
    assert texts_holding({"card": text}, ("abcdEFGH1234", "zyxw9876abcd", "qwer5678tyui", INSIDE)) == []


def test_evaluation_json_and_log_records_redacted(tmp_path, caplog):
    """eval.json (`EvaluationResult.save`) and the log records of a CLI run (`redacted_log_records`)."""
    from erasus_hf.redaction import redacted_log_records

    path = tmp_path / "eval.json"
    EvaluationResult(summary={"x": 1.0}, meta={"model_path": f"models/{INSIDE}", "note": f"--token {FLAG}"}).save(path)
    assert json.loads(path.read_text())["meta"] == {"model_path": "models/<redacted>", "note": "--token <redacted>"}
    caplog.set_level(logging.INFO)
    with redacted_log_records():
        logging.getLogger("erasus_hf.test").info("pushing with %s to %s", INSIDE, REPO)
    logging.getLogger("erasus_hf.test").info("after: %s", "kept")
    assert caplog.messages == [f"pushing with <redacted> to {REPO}", "after: kept"]
