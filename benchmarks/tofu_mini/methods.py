"""The catalogue's LLM strategies as the benchmark runs them: hyperparameters, and learning rates for LoRA and full
fine-tuning. Every method gets the same epoch budget (the preset's `unlearn_epochs`) and batch; only the learning
rate is set per method and mode, as TOFU's authors and the open-unlearning leaderboard do.

Not run: `dpo` (needs an `alternate` answer per forget row, which TOFU does not have; `idk_dpo` is its TOFU form),
and the compositions `ensemble` and `pipeline` (combinations of the methods below, not methods of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Method:
    strategy: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    lora_lr: float = 2e-3
    full_lr: float = 1e-4
    retain_loss: str = "nll"
    config: dict[str, Any] = field(default_factory=dict)  # further UnlearningConfig fields


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
