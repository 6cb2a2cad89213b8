"""`erasus-hf push OUTPUT_DIR --repo_id NAME [--private] [--merge]`: upload an unlearning output folder (weights as
safetensors, tokenizer, configs, the model card and the evaluation JSON) to the Hugging Face Hub."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from huggingface_hub import ModelCard

from ..hub.push import push_output


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


def positional_output_dir(argv: list[str]) -> list[str]:
    """`push OUTPUT_DIR ...` -> `push --output_dir OUTPUT_DIR ...`."""
    if argv and not argv[0].startswith("-"):
        return ["--output_dir", argv[0], *argv[1:]]
    return argv


def merged_folder(output_dir: str, base_model: str | None, workdir: str) -> str:
    """A folder holding the adapter merged into its base (safetensors), the tokenizer, the card (now describing a
    full model) and the evaluation JSON."""
    from .evaluate import load_model

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
        card = ModelCard.load(card_path)
        card.data.library_name = "transformers"
        card.save(os.path.join(merged_dir, "README.md"))
    return merged_dir


def run_push(args: PushArguments) -> str:
    if not args.merge:
        return push_output(
            args.output_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    with tempfile.TemporaryDirectory() as workdir:
        folder = merged_folder(args.output_dir, args.base_model, workdir)
        return push_output(
            folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message
        )
