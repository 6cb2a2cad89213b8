"""Push an unlearning output folder to the Hugging Face Hub.

Only what a user of the model needs is shipped, from the top level of the folder: safetensors weights (the LoRA
adapter or the full model, sharded or not), the JSON configs (model, adapter, generation, tokenizer, unlearning
config, strategy, the `eval.json` evaluation), the tokenizer files and the README.md model card. Pickles are refused
(they run code when loaded); the trainer's own state (optimizer, scheduler, RNG, training arguments, trainer state)
and every subfolder (`checkpoint-*/`, `runs/`) stay local. The local folder is only read, never modified.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_WEIGHTS = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
DIFFUSION_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # erasus_hf.diffusion.saving
DIFFUSION_TRAINED_WEIGHTS = "unet_erased.safetensors"

# What we ship, matched against top-level file names (subfolders are never shipped).
SHIP_PATTERNS = (
    "*.safetensors",
    "*.json",
    "README.md",
    "*.jinja",  # chat templates
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The Trainer's own state (pickled by design, but trainer_state.json): tolerated in the folder, never shipped.
TRAINING_STATE_PATTERNS = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "training_args.bin",
    "trainer_state.json",
)


def files_to_push(output_dir: str, *, card: bool = True) -> list[str]:
    """Validate `output_dir` and return the top-level file names `push_output` ships, sorted; `card=False` leaves
    README.md out (a checkpoint folder's README.md is PEFT's generic card, not ours).

    Raises ValueError (FileNotFoundError for a missing folder) when the folder holds pickled files other than the
    trainer's state, no safetensors weights, the weights of two models (an adapter beside full weights, ...), an
    adapter without `adapter_config.json`, shards without their index or an index naming missing shards, or a
    safetensors/JSON file that does not parse.
    """
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"No output folder at {output_dir!r}.")
    names = sorted(n for n in os.listdir(output_dir) if os.path.isfile(os.path.join(output_dir, n)))

    def training_state(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in TRAINING_STATE_PATTERNS)

    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES) and not training_state(n)]
    if pickles:
        raise ValueError(
            f"Refusing to push {output_dir!r}: it holds pickle files {pickles} (pickles run code when loaded). Save "
            "the weights as safetensors (`save_pretrained` does by default) and remove the pickles from the folder."
        )

    shards = [n for n in names if fnmatch.fnmatchcase(n, "model-*.safetensors")]
    if SHARD_INDEX in names:
        with open(os.path.join(output_dir, SHARD_INDEX)) as f:
            listed = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [n for n in listed if n not in names]
        if not listed or missing:
            raise ValueError(
                f"{SHARD_INDEX} in {output_dir!r} lists shards {listed}; missing from the folder: {missing or listed}."
            )
    elif shards:
        raise ValueError(f"Sharded weights {shards} in {output_dir!r} but no {SHARD_INDEX} to tie them together.")
    kinds = {  # one saved run per folder: two of these side by side are a stale run beside a new one
        "LoRA adapter": [ADAPTER_WEIGHTS],
        "full model": [MODEL_WEIGHTS],
        "sharded full model": [SHARD_INDEX, *shards],
        "diffusion LoRA": [DIFFUSION_LORA_WEIGHTS],
        "trained UNet tensors": [DIFFUSION_TRAINED_WEIGHTS],
    }
    present = {kind: files for kind, files in kinds.items() if files[0] in names}
    if len(present) > 1:
        found = "; ".join(f"{kind}: {files}" for kind, files in present.items())
        raise ValueError(
            f"Refusing to push {output_dir!r}: it holds the weights of more than one model ({found}), so a reader "
            "could load either. Keep one run per folder: save the run again with overwrite_output_dir=True (it "
            "replaces the other run's files), or delete the stale weights and their config."
        )
    if ADAPTER_WEIGHTS in names and "adapter_config.json" not in names:
        raise ValueError(f"{ADAPTER_WEIGHTS} in {output_dir!r} has no adapter_config.json next to it.")
    if not {ADAPTER_WEIGHTS, MODEL_WEIGHTS, SHARD_INDEX} & set(names):
        raise ValueError(
            f"No safetensors weights in {output_dir!r}: expected {ADAPTER_WEIGHTS} (with adapter_config.json), "
            f"{MODEL_WEIGHTS}, or model-*.safetensors shards with {SHARD_INDEX}. Found: {names}."
        )

    ship = [
        n
        for n in names
        if any(fnmatch.fnmatchcase(n, p) for p in SHIP_PATTERNS)
        and not training_state(n)
        and (card or n != "README.md")
    ]
    for name in ship:
        path = os.path.join(output_dir, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, framework="numpy") as f:
                    f.keys()
            elif name.endswith(".json"):
                with open(path) as f:
                    json.load(f)
        except (SafetensorError, ValueError) as err:
            raise ValueError(f"{name} in {output_dir!r} is not readable ({err}); refusing to push it.") from err
    if card and "README.md" not in ship:
        logger.warning(
            "No README.md model card in %s: the Hub page will be empty (erasus_hf.hub.write_model_card writes one).",
            output_dir,
        )
    left = [n for n in names if n not in ship] + [n + "/" for n in sorted(os.listdir(output_dir)) if n not in names]
    if left:
        logger.info("Not pushed (training state, subfolders, other files): %s", left)
    return ship


def push_output(
    output_dir: str,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    card: bool = True,
) -> str:
    """Push the shippable files of an unlearning output folder (see `files_to_push`; `card=False` leaves README.md
    out) to the model repo `repo_id`, creating the repo (`private` applies only then) and, for a `revision` other
    than main, the branch; return the commit URL.

    `token` defaults to the saved login or `HF_TOKEN`; `endpoint` to `HF_ENDPOINT` or huggingface.co. The folder is
    validated before any request. A Hub error (`HfHubHTTPError`) propagates with the repo named and a note that the
    local folder is untouched; the token is never logged, written or put in a message, and a folder whose files
    hold it (a card quoting a command with `--hub_token`) is refused before any request.
    """
    files = files_to_push(output_dir, card=card)
    token = token or get_token()  # what the client would send: the saved login or HF_TOKEN
    if token and commit_message and token in commit_message:
        raise ValueError("The commit message contains the Hub token; refusing to publish it.")
    holding = [n for n in files if token and not n.endswith(".safetensors") and token.encode() in _read(output_dir, n)]
    if holding:
        raise ValueError(
            f"Refusing to push {output_dir!r}: {holding} contain the Hub token. Remove it from them (a model card "
            "written by erasus_hf.hub.write_model_card holds none) and push again."
        )
    kind = "LoRA adapter" if ADAPTER_WEIGHTS in files else "model"
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("Pushing %d files from %s to %s/%s: %s", len(files), output_dir, api.endpoint, repo_id, files)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload unlearned {kind} with erasus_hf",
            allow_patterns=[glob.escape(name) for name in files],  # exactly the validated top-level files
        )
    except HfHubHTTPError as err:
        explain(err, f"Pushing {output_dir!r} to the Hub model repo {repo_id!r}", token)
        raise
    logger.info("Pushed %s to %s", output_dir, info.commit_url)
    return info.commit_url


def _read(folder: str, name: str) -> bytes:
    with open(os.path.join(folder, name), "rb") as f:
        return f.read()


def create_model_repo(
    repo_id: str, *, private: bool | None = None, token: str | None = None, endpoint: str | None = None
) -> str:
    """Create the model repo `repo_id` if it does not exist (`private` applies only then) and return its full id
    (`namespace/name`: the Hub adds the token's user to a bare name). Token and endpoint default as in
    `push_output`; errors are explained the same way."""
    token = token or get_token()
    api = HfApi(endpoint=endpoint, token=token)
    try:
        return api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    except HfHubHTTPError as err:
        explain(err, f"Creating the Hub model repo {repo_id!r}", token)
        raise


def explain(err: HfHubHTTPError, what: str, token: str | None) -> None:
    """Add what failed and that nothing local changed to a Hub error, and scrub the token from its message."""
    status = err.response.status_code if err.response is not None else "?"
    err.append_to_message(
        f"\n\n{what} failed (HTTP {status}). The local folder was not modified; run the push again to retry."
    )
    if token:  # belt and braces: no message we raise carries the token, even if a server echoed it
        err.args = tuple(a.replace(token, "<token>") if isinstance(a, str) else a for a in err.args)
