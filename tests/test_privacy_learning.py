"""DP-SGD still learns: at a generous epsilon a tiny Llama's answer NLL on its 80 TOFU training rows falls clearly."""

from __future__ import annotations

import pytest
from datasets import Dataset

from .testing_utils import nll, qa, small_llama

pytest.importorskip("opacus", reason="opacus is an optional dependency (extra 'privacy')")

from erasus_hf.privacy import DPConfig, DPTrainer  # noqa: E402


@pytest.mark.slow
@pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off", "ignore:Optimal order is the", "ignore:Full backward hook is firing"
)
def test_model_learns_at_a_generous_epsilon(tokenizer, tofu_slice, tmp_path):
    """Measured (2 shared CPU cores, seed 0): 6.25 -> 5.18 nats per answer token in 100 noisy steps at epsilon 100
    (noise multiplier 0.29, clipping 1.0, rdp), about 10 s of training. A random model starts at ln(512) = 6.24."""
    forget, retain = tofu_slice
    rows = Dataset.from_list(qa(forget).to_list() + qa(retain).to_list())
    model = small_llama(tokenizer)
    before = nll(model, tokenizer, rows)
    args = DPConfig(
        output_dir=str(tmp_path / "dp"),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        target_epsilon=100.0,
        accountant="rdp",
        max_grad_norm=1.0,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        num_train_epochs=10,
        logging_steps=50,
        seed=0,
    )
    trainer = DPTrainer(model, args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    after = nll(trainer.model, tokenizer, rows)
    report = trainer.privacy_report()
    assert report.steps == 100 and 99.99 <= report.epsilon <= 100.0
    assert after < 0.9 * before, (before, after)
