"""`erasus-hf push OUTPUT_DIR --repo_id NAME [--private] [--merge] [--token TOKEN]`: upload an unlearning output
folder (weights as safetensors, tokenizer, configs, the model card and the evaluation JSON) to the Hugging Face Hub.
The token defaults to `HF_TOKEN` or the saved login; it is sent to the Hub only, never written or printed."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, constants

from ..hub.push import push_output
from ..redaction import redact


@dataclass
class PushArguments:
    output_dir: str = field(metadata={"help": "The unlearning output folder (also accepted as the first argument)."})
    repo_id: str = field(metadata={"help": "The Hub model repo to push to, e.g. your-name/llama-tofu-npo."})
    private: bool = field(default=False, metadata={"help": "Create the repo private (only when it is created)."})
    merge: bool = field(
        default=False, metadata={"help": "Merge the LoRA adapter into its base model and push the merged model."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of the adapter for --merge (default: the adapter config's)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Branch to push to (default: main)."})
    commit_message: str | None = field(default=None, metadata={"help": "Commit message."})
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token with write access (default: HF_TOKEN, else the saved `hf auth login`). Prefer those: "
            "a token on the command line stays in the shell history. Never written or printed."
        },
    )


def positional_output_dir(argv: list[str]) -> list[str]:
    """`push OUTPUT_DIR ...` -> `push --output_dir OUTPUT_DIR ...`."""
    if argv and not argv[0].startswith("-"):
        return ["--output_dir", argv[0], *argv[1:]]
    return argv


def merged_folder(output_dir: str, base_model: str | None, workdir: str) -> str:
    """A folder holding the adapter merged into its base (safetensors), the tokenizer, the card (now describing a
    full model) and the evaluation JSON."""
    from ..modeling.loading import load_model  # torch and transformers only for a merge

    if not os.path.isfile(os.path.join(output_dir, "adapter_config.json")):
        raise ValueError(f"--merge needs an adapter folder; {output_dir} has no adapter_config.json.")
    model, tokenizer = load_model(output_dir, base_model)
    merged_dir = os.path.join(workdir, "merged")
    model.merge_and_unload().save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    for name in ("eval.json", "strategy.json", "unlearning_config.json"):
        if os.path.isfile(os.path.join(output_dir, name)):
            shutil.copy(os.path.join(output_dir, name), merged_dir)
    card_path = os.path.join(output_dir, "README.md")
    if os.path.isfile(card_path):
        card = ModelCard(redact(ModelCard.load(card_path).content))
        card.data.library_name = "transformers"
        card.save(os.path.join(merged_dir, "README.md"))
    return merged_dir


class HubUnreachableError(ConnectionError):
    """The Hub could not be reached (offline mode, no network, a wrong HF_ENDPOINT): no commit was made and the
    local folder is intact. Its message is one line; `erasus-hf push` prints it alone, without a traceback."""


def network_errors() -> tuple[type[BaseException], ...]:
    """The exception types of a Hub that cannot be reached: offline mode (`OfflineModeIsEnabled` is a
    ConnectionError), refused or dropped connections and timeouts of the HTTP client huggingface_hub uses."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError")):
        try:
            kinds.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(kinds)


def public_endpoint() -> str:
    """The Hub endpoint in use (`HF_ENDPOINT` or huggingface.co), without any user:password part."""
    parts = urllib.parse.urlsplit(constants.ENDPOINT)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def unreachable(args: PushArguments, err: BaseException | None = None) -> HubUnreachableError:
    """The one-line error of a push that could not reach the Hub: the endpoint, the folder, that nothing changed,
    how to retry."""
    where = f"push {args.output_dir!r} to {args.repo_id!r} at {public_endpoint()}"
    intact = "No commit was made and the local folder is intact"
    if constants.HF_HUB_OFFLINE:
        return HubUnreachableError(
            f"HF_HUB_OFFLINE is set: cannot {where}. {intact}; unset HF_HUB_OFFLINE and run the same command again."
        )
    reason = str(err).splitlines()[0] if str(err) else "no answer"
    return HubUnreachableError(
        f"Cannot reach the Hub to {where} ({type(err).__name__}: {reason}). {intact}; check the network (or "
        "HF_ENDPOINT) and run the same command again."
    )


def run_push(args: PushArguments) -> str:
    """Push the folder (merged first with `--merge`) and return the commit URL. A Hub that cannot be reached raises
    `HubUnreachableError`; in offline mode before anything, the merge included, is done."""
    if constants.HF_HUB_OFFLINE:
        raise unreachable(args)
    try:
        return _push(args)
    except network_errors() as err:
        raise unreachable(args, err) from err


def _push(args: PushArguments) -> str:
    options = {
        "private": args.private,
        "revision": args.revision,
        "commit_message": args.commit_message,
        "token": args.token,
    }
    if not args.merge:
        return push_output(args.output_dir, args.repo_id, **options)
    with tempfile.TemporaryDirectory() as workdir:
        return push_output(merged_folder(args.output_dir, args.base_model, workdir), args.repo_id, **options)
