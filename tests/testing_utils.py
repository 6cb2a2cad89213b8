"""What the tests share besides fixtures (those are in conftest.py): the repository's paths and examples, the TOFU
rows and the small Llamas trained on them, the behavioural tests' unlearning run, hand-checkable stand-ins for a model
family (logits in the batch), the real digits, launching a test file's worker in one and in two processes, and the
local Hub server's wiring.

Import from here (`from .testing_utils import qa`), never from conftest.py or from another test file."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.evaluation import answer_nll
from erasus_hf.modeling.tiny import build_tiny_llama, sft_train
from erasus_hf.objectives import Objective, Scores, token_logprobs_from_logits
from erasus_hf.reference import Reference
from erasus_hf.strategies import StrategyContext

from .hub_server import HubServer

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftModel
    from torch import nn
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

# ---- the repository

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY_RECIPE = ROOT / "trainers" / "recipes" / "tofu_tiny_npo_lora.yaml"


def load_example(name: str) -> ModuleType:
    """The example script `examples/<name>.py`, loaded by path (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- TOFU rows and small Llamas


def qa(dataset: Dataset) -> Dataset:
    """Only the question/answer columns (what the unlearning collator reads)."""
    return dataset.select_columns(["question", "answer"])


def nll(model: nn.Module, tokenizer: PreTrainedTokenizerBase, dataset: Dataset) -> float:
    """Mean answer NLL (nats per answer token) of `model` on TOFU rows."""
    return answer_nll(model, tokenizer, dataset["question"], dataset["answer"]).mean().item()


def small_llama(tokenizer: PreTrainedTokenizerBase, **overrides) -> LlamaForCausalLM:
    """A random tiny Llama (hidden 32, 2 layers, 2 heads, MLP 64, seed 0: same seed, same weights); `overrides` win."""
    sizes = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=0)
    return build_tiny_llama(tokenizer, **{**sizes, **overrides})


def memorise(tokenizer: PreTrainedTokenizerBase, rows: Dataset, output_dir: str) -> LlamaForCausalLM:
    """The demo's 0.85M-parameter Llama (seed 0) after 50 epochs of TRL's SFT on `rows`: it knows them by heart."""
    model = build_tiny_llama(tokenizer, seed=0)
    return sft_train(model, tokenizer, rows, output_dir=output_dir, num_train_epochs=50, disable_tqdm=True)


def trained_adapter(model: nn.Module, seed: int = 0, scale: float = 0.5) -> PeftModel:
    """`model` with a LoRA adapter whose B matrices are non-zero: a model that arrives carrying a trained adapter
    (as `PeftModel.from_pretrained` would give it), so adapter-off is *not* the starting model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # LoRA's A initialisation
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn(param.shape, generator=generator))
    return model


def effective_weights(model: PeftModel) -> dict[str, torch.Tensor]:
    """The dense weights a PeftModel computes with, by hand: every base weight, plus scaling * B @ A of the active
    LoRA adapter on each adapted linear layer (no PEFT merge involved)."""
    from peft.tuners.lora import LoraLayer

    weights = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            (active,) = module.active_adapters
            delta = module.scaling[active] * module.lora_B[active].weight @ module.lora_A[active].weight
            weights[module_name.removeprefix("base_model.model.") + ".weight"] = module.base_layer.weight + delta
    for name, param in model.named_parameters():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        if "lora_" not in name and plain not in weights:
            weights[plain] = param
    return {name: w.detach().clone() for name, w in weights.items()}


# ---- trainer runs


def config(tmp_path: Path, **kwargs) -> UnlearningConfig:
    """The mechanics tests' `UnlearningConfig`: quiet, no saves, batches of 4, one epoch at lr 1e-3, seed 0."""
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        num_train_epochs=1,
        logging_steps=1,
        seed=0,
    )
    return UnlearningConfig(**{**defaults, **kwargs})


def unlearn(
    model,
    tokenizer,
    tofu_slice,
    tmp_path,
    strategy,
    kwargs=None,
    lr=2e-3,
    epochs=5,
    use_peft=True,
    with_retain=True,
    **settings,
) -> UnlearningTrainer:
    """Run `strategy` on the (forget, retain) slice with the behavioural tests' settings; return the trainer."""
    forget, retain = tofu_slice
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        strategy_kwargs=kwargs,
        use_peft=use_peft,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=8,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **settings,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=qa(forget),
        retain_dataset=qa(retain) if with_retain else None,
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer


# ---- hand-checkable losses: a model family whose "model output" is the batch's own logits


class LogitsObjective(Objective):
    """A stand-in model family whose 'model output' is the batch's own logits: exact, hand-checkable scores."""

    name = "causal_lm"

    def score(self, model, batch, hidden_layer=None):
        logprobs, mask = token_logprobs_from_logits(batch["logits"], batch["labels"])
        return Scores(token_logprobs=logprobs, mask=mask, logits=batch["logits"])


class LogitsReference(Reference):
    mode = "copy"

    def __init__(self, logits):
        self.logits = logits

    def scores(self, objective, batch, hidden_layer=None):
        return objective.score(None, {**batch, "logits": self.logits})


def log_softmax_list(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


# Two examples, three positions, vocabulary of 3; -100 marks prompt/padding.
LOGITS = torch.tensor(
    [
        [[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [1.5, -0.5, 0.3]],
        [[0.2, 0.1, 3.0], [-1.0, 2.0, 0.5], [0.0, 0.0, 0.0]],
    ]
)
LABELS = torch.tensor([[-100, 1, 2], [2, 0, -100]])


def hand_token_logprobs() -> list[list[float]]:
    out = []
    for b in range(2):
        row = []
        for t in range(3):
            label = int(LABELS[b, t])
            if label != -100:
                row.append(log_softmax_list(LOGITS[b, t].tolist())[label])
        out.append(row)
    return out  # [[lp(1), lp(2)], [lp(2), lp(0)]]


def batch() -> dict[str, torch.Tensor]:
    return {"logits": LOGITS.clone().requires_grad_(), "labels": LABELS, "index": torch.tensor([0, 1])}


def context(
    objective: Objective,
    model: nn.Module | None = None,
    reference: Reference | None = None,
    gamma: float = 1.0,
    alpha: float = 1.0,
    retain_loss: str = "nll",
    step: int = 0,
    training: bool = True,
) -> StrategyContext:
    """A `StrategyContext` for calling a strategy's loss directly (gamma, alpha: the forget and retain weights)."""
    return StrategyContext(
        model=model,
        objective=objective,
        reference=reference,
        forget_weight=gamma,
        retain_weight=alpha,
        retain_loss=retain_loss,
        global_step=step,
        training=training,
    )


def ctx(
    reference: Reference | None = None, retain_loss: str = "none", gamma: float = 1.0, alpha: float = 1.0
) -> StrategyContext:
    """The context of the logits stand-in (no model, no retain term unless asked)."""
    return context(LogitsObjective(), None, reference, gamma, alpha, retain_loss)


# ---- the real handwritten digits (sklearn's load_digits)


def digit_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [N, 8, 8] in [0, 1], labels [N], train indices (1400), test indices (397)): a fixed seeded split."""
    datasets_sklearn = pytest.importorskip("sklearn.datasets", reason="scikit-learn is a dev dependency")
    data = datasets_sklearn.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images, labels, order[:1400], order[1400:]


def moving_digit_clips(images: torch.Tensor, frames: int = 4, size: int = 16) -> torch.Tensor:
    """[N, frames, 3, size, size] clips: each 8x8 digit crosses a black canvas from left to right (rows 4-11),
    one step per frame, in 3 channels, scaled to [-1, 1]."""
    clips = torch.zeros(len(images), frames, 3, size, size)
    top = (size - 8) // 2
    for frame in range(frames):
        left = frame * (size - 8) // (frames - 1)
        clips[:, frame, :, top : top + 8, left : left + 8] = images[:, None]
    return clips * 2 - 1


def pixel_rows(inputs: torch.Tensor, labels: torch.Tensor, idx: torch.Tensor) -> list[dict]:
    """The classification objective's rows: {"pixel_values", "labels"} for each index in `idx`."""
    return [{"pixel_values": inputs[i], "labels": labels[i]} for i in idx.tolist()]


# ---- one process against two (the distributed tests' workers)


def launch_one_and_two(script: Path, model_dir: Path, out_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Run `script MODEL_DIR OUT` as one plain process, then under torchrun with 2 processes (one thread each), into
    `out_dir/one` and `out_dir/two`; each process writes `rank<k>.json`. Returns the ranks' JSON of each launch."""

    def launch(command: list[str], out: Path) -> dict[int, dict]:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        command = [*command, str(script), str(model_dir), str(out)]
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        return {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}

    one = launch([sys.executable], out_dir / "one")
    two = launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], out_dir / "two"
    )
    assert set(one) == {0} and set(two) == {0, 1}
    return one, two


def assert_rank_matches_one_process(entry: dict, single: dict, name: str, atol: float, rtol: float) -> None:
    """One rank's report of a run holds the single-process run's losses, evaluation and policy log-probs, and the
    trained policy moved away from the starting model (`base_logprob`)."""
    assert entry["losses"] == pytest.approx(single["losses"], abs=atol, rel=rtol), name
    assert entry["evaluation"].keys() == single["evaluation"].keys()
    for key, value in single["evaluation"].items():
        assert entry["evaluation"][key] == pytest.approx(value, abs=atol, rel=rtol), (name, key)
    assert entry["policy_logprob"] == pytest.approx(single["policy_logprob"], abs=atol, rel=rtol)
    assert max(abs(a - b) for a, b in zip(entry["policy_logprob"], entry["base_logprob"])) > 1e-2


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str, atol: float) -> None:
    """Two saved state dicts hold the same non-empty tensors within `atol`."""
    assert a.keys() == b.keys() and len(a) > 0, what
    for key in a:
        assert a[key].shape == b[key].shape and a[key].numel() > 0, (what, key, a[key].shape, b[key].shape)
        assert torch.allclose(a[key], b[key], atol=atol), (what, key, (a[key] - b[key]).abs().max())


# ---- folders and the local Hub


def fake_adapter(folder: Path) -> Path:
    """A minimal adapter folder (safetensors + adapter_config.json), without building a model."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_A.weight": np.ones((2, 4), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    return folder


def snapshot(folder: str | Path) -> dict[str, bytes]:
    """Every file under `folder`, subfolders included (relative path -> bytes); {} for a folder that is absent."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def serve_hub(monkeypatch, server: HubServer) -> HubServer:
    """`server` as the Hub of every client built from here on (what HF_ENDPOINT sets at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
    return server
