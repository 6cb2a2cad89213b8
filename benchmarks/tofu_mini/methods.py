"""The catalogue's LLM strategies as the benchmark runs them: hyperparameters, and learning rates for LoRA and full
fine-tuning. Every method gets the same epoch budget (the preset's `unlearn_epochs`) and batch; only the learning
rate is set per method and mode, as TOFU's authors and the open-unlearning leaderboard do.

Not run: `dpo` (needs an `alternate` answer per forget row, which TOFU does not have; `idk_dpo` is its TOFU form),
and the compositions `ensemble` and `pipeline` (combinations of the methods below, not methods of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from erasus_hf import UnlearningConfig

RECIPE_DIR = Path(__file__).resolve().parents[2] / "trainers" / "recipes" / "tofu_mini"
"""One recipe per method and mode (`<method>_<mode>.yaml`), found by `benchmarks.tofu_mini.tune`."""


@dataclass(frozen=True)
class Method:
    strategy: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    lora_lr: float = 2e-3
    full_lr: float = 1e-4
    retain_loss: str = "nll"
    config: dict[str, Any] = field(default_factory=dict)  # further UnlearningConfig fields
    epochs: float | None = None  # None: the preset's unlearn_epochs


def method_config(
    method: Method, mode: str, preset, output_dir: str, seed: int, quiet: bool = True, use_cpu: bool = True
) -> UnlearningConfig:
    """The `UnlearningConfig` of one run of `method` in `mode` ("lora" or "full"): the benchmark's fixed settings
    (LoRA r 8, alpha 16; constant learning rate; no divergence stop, so a collapse is reported) and the method's.
    `seed` sets the adapter's initialisation, the data order and the forget/retain pairing (`pairing_seed`)."""
    if mode not in ("lora", "full"):
        raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")
    return UnlearningConfig(
        output_dir=output_dir,
        divergence_factor=None,  # the table reports what each method does, a collapse included
        strategy=method.strategy,
        strategy_kwargs=method.kwargs,
        retain_loss=method.retain_loss,
        use_peft=mode == "lora",
        lora_r=8,
        lora_alpha=16,
        learning_rate=method.lora_lr if mode == "lora" else method.full_lr,
        num_train_epochs=method.epochs or preset.unlearn_epochs,
        per_device_train_batch_size=preset.batch_size,
        per_device_eval_batch_size=preset.eval_batch_size,
        lr_scheduler_type="constant",
        save_strategy="no",
        logging_steps=5,
        report_to="none",
        disable_tqdm=quiet,
        use_cpu=use_cpu,
        seed=seed,
        **method.config,
    )


RECIPE_KEYS = {
    "strategy",
    "strategy_kwargs",
    "retain_loss",
    "use_peft",
    "lora_r",
    "lora_alpha",
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "lr_scheduler_type",
}


def recipe_method(path: str | Path, num_layers: int) -> tuple[Method, str]:
    """(the Method, its mode) a recipe of `RECIPE_DIR` describes: `methods()`' entry with the recipe's values."""
    recipe = yaml.safe_load(Path(path).read_text())
    base = methods(num_layers)[recipe["strategy"]]
    mode = "lora" if recipe.get("use_peft") else "full"
    lr = float(recipe["learning_rate"])
    config = {k: v for k, v in recipe.items() if k not in RECIPE_KEYS}
    method = replace(
        base,
        kwargs={**base.kwargs, **recipe.get("strategy_kwargs", {})},
        retain_loss=recipe.get("retain_loss", base.retain_loss),
        lora_lr=lr if mode == "lora" else base.lora_lr,
        full_lr=lr if mode == "full" else base.full_lr,
        config={**base.config, **config},
        epochs=float(recipe["num_train_epochs"]),
    )
    return method, mode


def recipes(num_layers: int, recipe_dir: str | Path = RECIPE_DIR) -> dict[tuple[str, str], Method]:
    """Every recipe of `recipe_dir` by (method, mode)."""
    found = {}
    for path in sorted(Path(recipe_dir).glob("*.yaml")):
        method, mode = recipe_method(path, num_layers)
        found[(method.strategy, mode)] = method
    return found


def _rmu(num_layers: int) -> dict[str, Any]:
    # The last layer's output, c = 10: the tiny model's activations have norm ~3, so the published c = 6.5 (for
    # Zephyr-7B's layer 7) is scaled up; alpha = 10 (see tests/test_rmu_pdu.py for the measurements behind both).
    return {"layer_id": num_layers - 1, "steering_coeff": 10.0, "alpha": 10.0}


def methods(num_layers: int) -> dict[str, Method]:
    """Every method by name; `num_layers` places RMU's steered layer."""
    return {
        m.strategy: m
        for m in (
            Method("ga", lora_lr=2e-3, full_lr=5e-5, retain_loss="none"),
            Method("grad_diff", lora_lr=2e-3, full_lr=1e-4),
            Method("npo", lora_lr=5e-3, full_lr=2e-4),
            Method("simnpo", lora_lr=5e-3, full_lr=2e-4),
            Method("idk_dpo", lora_lr=2e-3, full_lr=1e-4),
            Method("wga", lora_lr=2e-3, full_lr=1e-4),
            Method("satimp", lora_lr=3e-3, full_lr=1e-4, config={"forget_weight": 10.0}),
            Method("undial", lora_lr=2e-3, full_lr=1e-4),
            Method("ce_u", lora_lr=2e-3, full_lr=1e-4),
            Method("rmu", _rmu(num_layers), lora_lr=2e-2, full_lr=1e-2),
            Method("pdu", {"epsilon": 0.1}, lora_lr=2e-3, full_lr=1e-4),
            Method("scrub", {"max_epochs": 4}, lora_lr=5e-3, full_lr=2e-4),
            Method("task_vector", {"scaling": 1.0}, lora_lr=1e-2, full_lr=1e-3, retain_loss="none"),
            Method("whp", {"alpha": 5.0}, lora_lr=1e-3, full_lr=1e-4, retain_loss="none"),
        )
    }
