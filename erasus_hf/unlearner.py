"""`ErasusUnlearner`: the Erasus front door, a thin layer over `UnlearningTrainer`."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .config import UnlearningConfig
from .trainer import UnlearningTrainer


@dataclass
class UnlearningResult:
    """What `ErasusUnlearner.fit` returns: the unlearned model and the per-logging-step loss histories."""

    model: nn.Module
    loss_history: list[float] = field(default_factory=list)
    forget_loss_history: list[float] = field(default_factory=list)
    retain_loss_history: list[float] = field(default_factory=list)
    elapsed_time: float = 0.0
    trainer: Any = None


class ErasusUnlearner:
    """`ErasusUnlearner(model, strategy="npo", tokenizer=tok, use_peft=True).fit(forget, retain, epochs=3)`.

    Keyword arguments not named here go to `UnlearningConfig` (e.g. `learning_rate`, `retain_loss`,
    `per_device_train_batch_size`); `strategy_kwargs` holds the strategy's hyperparameters. `objective` is the
    model family's objective when it is not detected (a diffusion UNet: `DiffusionObjective.from_pipeline(pipe)`).
    """

    def __init__(
        self,
        model: nn.Module | str,
        strategy: str = "npo",
        tokenizer: Any = None,
        use_peft: bool = False,
        ref_model: nn.Module | None = None,
        output_dir: str | None = None,
        objective: Any = None,
        **config_kwargs: Any,
    ) -> None:
        self.model = model
        self.objective = objective
        self.tokenizer = tokenizer
        self.ref_model = ref_model
        self.config_kwargs = {
            "strategy": strategy,
            "use_peft": use_peft,
            "output_dir": output_dir or tempfile.mkdtemp(prefix="erasus_hf_"),
            "save_strategy": "no",
            "logging_steps": 1,
            **config_kwargs,
        }

    def fit(self, forget_data: Any, retain_data: Any | None = None, epochs: float = 3) -> UnlearningResult:
        """Unlearn `forget_data` (keeping `retain_data`) for `epochs` passes over the forget set (or `max_steps`
        optimizer steps when given to the constructor)."""
        if (
            isinstance(epochs, bool)
            or not isinstance(epochs, (int, float))
            or not math.isfinite(epochs)
            or epochs <= 0
        ):
            raise ValueError(
                f"fit(epochs={epochs!r}): epochs must be a finite number > 0, the passes over the forget set (0 or "
                "less would return the model unchanged, as if unlearned); for a step count pass max_steps=N to "
                "ErasusUnlearner(...)."
            )
        args = UnlearningConfig(num_train_epochs=epochs, **self.config_kwargs)
        trainer = UnlearningTrainer(
            self.model,
            args,
            forget_dataset=forget_data,
            retain_dataset=retain_data,
            ref_model=self.ref_model,
            processing_class=self.tokenizer,
            objective=self.objective,
        )
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        self.model = trainer.model
        return UnlearningResult(
            model=trainer.model,
            loss_history=[entry["loss"] for entry in logs],
            forget_loss_history=[entry["forget_loss"] for entry in logs if "forget_loss" in entry],
            retain_loss_history=[entry["retain_loss"] for entry in logs if "retain_loss" in entry],
            elapsed_time=elapsed,
            trainer=trainer,
        )
