"""DP-SGD fine-tuning with Opacus (`erasus_hf.privacy`): the accountant's epsilon reaches the target, the update is the
clipped-and-noised sum of per-example gradients (checked by hand), LoRA trains only the adapter, bad settings are
refused before any compute, and Opacus stays optional."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from erasus_hf.objectives import CausalLMObjective

from .testing_utils import qa, small_llama

opacus = pytest.importorskip("opacus", reason="opacus is an optional dependency (extra 'privacy')")

from erasus_hf.privacy import PRIVACY_FILE, DPConfig, DPReport, DPTrainer, require_opacus  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:Secure RNG turned off",
    "ignore:Optimal order is the largest alpha",
    "ignore:Full backward hook is firing",
)


def dp_config(tmp_path, **kwargs) -> DPConfig:
    defaults = dict(
        output_dir=str(tmp_path / "dp"),
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        num_train_epochs=2,
        logging_steps=5,
        seed=0,
    )
    return DPConfig(**{**defaults, **kwargs})


def rows(tofu_slice) -> Dataset:
    forget, retain = tofu_slice
    return Dataset.from_list(qa(forget).to_list() + qa(retain).to_list())  # 80 rows of 4 TOFU authors


# ---- the accountant


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_reaches_the_target_within_the_tolerance(tokenizer, tofu_slice, tmp_path, accountant):
    args = dp_config(tmp_path, target_epsilon=4.0, accountant=accountant)
    trainer = DPTrainer(small_llama(tokenizer), args, train_dataset=rows(tofu_slice), processing_class=tokenizer)
    output = trainer.train()
    report = trainer.privacy_report()
    # 80 rows, batches of 8: sampling rate 1/10, 2 epochs = 20 noisy steps, delta = 1 / (10 n)
    assert (report.steps, report.planned_steps, report.sample_rate, report.expected_batch_size) == (20, 20, 0.1, 8)
    assert report.delta == pytest.approx(1 / 800)
    assert 4.0 - args.epsilon_tolerance <= report.epsilon <= 4.0
    assert output.metrics["train_epsilon"] == report.epsilon
    # the accountant's own number for the same history: the noise was set for exactly these steps
    check = opacus.accountants.create_accountant(accountant)
    check.history = [(report.noise_multiplier, 0.1, 20)]
    assert check.get_epsilon(delta=report.delta) == pytest.approx(report.epsilon)


def test_given_noise_reports_the_accountants_epsilon(tokenizer, tofu_slice, tmp_path):
    args = dp_config(tmp_path, target_epsilon=None, noise_multiplier=1.0, accountant="rdp", max_steps=5)
    trainer = DPTrainer(small_llama(tokenizer), args, train_dataset=rows(tofu_slice), processing_class=tokenizer)
    trainer.train()
    report = trainer.privacy_report()
    check = opacus.accountants.RDPAccountant()
    check.history = [(1.0, 0.1, 5)]
    assert report.steps == 5 and report.noise_multiplier == 1.0
    assert report.epsilon == pytest.approx(check.get_epsilon(delta=1 / 800))


# ---- per-example clipping, by hand


class RecordingDPTrainer(DPTrainer):
    """Keeps each training batch (None for an empty Poisson batch)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _empty_step(self):
        self.batches.append(None)
        return super()._empty_step()


def test_update_is_the_clipped_sum_of_per_example_gradients(tokenizer, tofu_slice, tmp_path):
    """One step with noise 0: the gradient the optimizer applies equals sum_i min(1, C / |g_i|) g_i / (q n), with g_i
    each example's own gradient computed alone on a copy of the starting model, and C below some norms, above
    others."""
    model = small_llama(tokenizer)
    start = copy.deepcopy(model)
    clip = 1.0
    args = dp_config(
        tmp_path,
        target_epsilon=None,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        max_steps=1,
        optim="sgd",
        seed=0,
        per_device_train_batch_size=8,
    )
    trainer = RecordingDPTrainer(
        model, args, train_dataset=rows(tofu_slice).select(range(16)), processing_class=tokenizer
    )
    applied = {}

    class GradAfterStep(TrainerCallback):  # p.grad after the private step, before the Trainer zeroes it
        def on_optimizer_step(self, args, state, control, **kwargs):
            applied.update({n: p.grad.detach().clone() for n, p in model.named_parameters()})

    trainer.add_callback(GradAfterStep())
    trainer.train()
    (batch,) = trainer.batches
    assert batch is not None and len(batch["input_ids"]) >= 2  # seed 0 draws a batch of several rows

    params = dict(start.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    norms = []
    for i in range(len(batch["input_ids"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = CausalLMObjective().score(start, one).mean_nll[0]
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm.item())
        factor = min(1.0, clip / (norm.item() + 1e-6))
        for (name, _), g in zip(params.items(), grads):
            expected[name] += factor * g
    assert min(norms) < clip < max(norms), norms  # both branches of the clipping rule are exercised
    expected_batch = 8  # 16 rows, batches of 8: q = 1/2
    for name, grad in expected.items():
        torch.testing.assert_close(applied[name], grad / expected_batch, rtol=1e-4, atol=1e-7, msg=name)


def test_empty_poisson_batches_are_noise_only_steps(tokenizer, tofu_slice, tmp_path):
    """4 rows, batches of 1: a quarter of each row per step, so about a third of the batches are empty. Each is a step
    of noise alone, which the accountant counts."""
    model = small_llama(tokenizer)
    args = dp_config(
        tmp_path, target_epsilon=None, noise_multiplier=1.0, per_device_train_batch_size=1, max_steps=12, seed=0
    )
    trainer = RecordingDPTrainer(
        model, args, train_dataset=rows(tofu_slice).select(range(4)), processing_class=tokenizer
    )
    moved = []

    class MovedOnEmptyStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.before = model.lm_head.weight.detach().clone()

        def on_step_end(self, args, state, control, **kwargs):
            if trainer.batches[-1] is None:
                moved.append(not torch.equal(self.before, model.lm_head.weight))

    trainer.add_callback(MovedOnEmptyStep())
    trainer.train()
    assert None in trainer.batches and any(b is not None for b in trainer.batches), trainer.batches
    assert moved and all(moved)  # the noise moved the weights on every empty step
    assert trainer.privacy_report().steps == 12


# ---- LoRA, hooks and the saved report


def test_lora_trains_only_the_adapter_and_detaches_opacus(tokenizer, tofu_slice, tmp_path):
    from peft import LoraConfig

    model = small_llama(tokenizer)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dp_config(tmp_path, max_steps=3, target_epsilon=8.0)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = DPTrainer(
        model, args, train_dataset=rows(tofu_slice), processing_class=tokenizer, peft_config=peft_config
    )
    trainer.train()
    trained = trainer.model
    adapter, frozen = {}, {}
    for name, p in trained.named_parameters():
        (adapter if "lora_" in name else frozen)[name] = p.detach()
    assert adapter and all(not trained.get_parameter(n).requires_grad for n in frozen)
    for name, p in frozen.items():
        plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(p, base[plain]), name
    assert any(p.abs().sum() > 0 for n, p in adapter.items() if "lora_B" in n)  # B starts at zero
    report = trainer.privacy_report()
    assert report.trained == "LoRA adapter"
    assert report.trainable_parameters == sum(p.numel() for p in adapter.values())
    # Opacus is detached: no per-sample attributes, and a plain backward pass works on the model
    assert not any(hasattr(p, "grad_sample") for p in trained.parameters())
    batch = trainer.data_collator(trainer.train_dataset.with_format(None).select(range(4)).to_list())
    trained.train()
    CausalLMObjective().score(trained, batch).mean_nll.mean().backward()
    assert not any(hasattr(p, "grad_sample") for p in trained.parameters())

    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / PRIVACY_FILE).read_text())
    assert DPReport.from_dict(saved) == report
    assert (tmp_path / "saved" / "adapter_model.safetensors").is_file()


def test_report_group_privacy_and_card_by_hand():
    report = DPReport(
        epsilon=2.0,
        delta=1e-4,
        accountant="prv",
        noise_multiplier=0.9,
        max_grad_norm=1.0,
        sample_rate=0.1,
        expected_batch_size=8,
        steps=20,
        planned_steps=20,
        examples=80,
        target_epsilon=2.0,
        epsilon_tolerance=0.01,
        trained="full model",
        trainable_parameters=1000,
        secure_mode=False,
        opacus_version="1.6.0",
    )
    # (k eps, k e^((k-1) eps) delta): k = 3 -> (6, 3 e^4 1e-4)
    assert report.group(3) == pytest.approx((6.0, 3 * math.exp(4.0) * 1e-4))
    assert report.group(1) == (2.0, 1e-4)
    with pytest.raises(ValueError, match="positive number of rows"):
        report.group(0)
    card = report.card_section()
    assert "(epsilon = 2, delta = 0.0001)-DP per training row" in card
    assert "| noise multiplier | 0.9 |" in card and "does not give" in card
    unbounded = DPReport.from_dict({**report.to_dict(), "epsilon": None})
    assert math.isinf(unbounded.epsilon) and unbounded.to_dict()["epsilon"] is None
    json.dumps(report.to_dict(), allow_nan=False)


# ---- refused before any compute


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(noise_multiplier=1.0), "Give one of target_epsilon"),
        (dict(target_epsilon=None), "Give one of target_epsilon"),
        (dict(accountant="gdp"), "accountant must be one of"),
        (dict(max_grad_norm=0.0), "per-example clipping bound"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
        (dict(target_delta=1.5), "target_delta must be in"),
        (dict(target_epsilon=-1.0), "target_epsilon must be"),
    ],
)
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        dp_config(tmp_path, **settings)


def test_bad_data_and_runs_are_refused(tokenizer, tofu_slice, tmp_path):
    data = rows(tofu_slice)
    with pytest.raises(ValueError, match=r"not below 1/n = 0.0125 for n=80"):
        DPTrainer(small_llama(tokenizer), dp_config(tmp_path, target_delta=0.02), data, tokenizer)
    long_text = Dataset.from_list([{"text": " ".join(data["answer"][:6])}] * 4)
    with pytest.raises(ValueError, match=r"give \d+ examples for 4 rows"):
        DPTrainer(small_llama(tokenizer), dp_config(tmp_path, max_length=64, target_delta=1e-3), long_text, tokenizer)
    trainer = DPTrainer(small_llama(tokenizer), dp_config(tmp_path), data, tokenizer)
    with pytest.raises(ValueError, match="does not resume from checkpoints"):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    with pytest.raises(RuntimeError, match="call train"):
        trainer.privacy_report()


def test_opacus_is_optional(tokenizer, tofu_slice, tmp_path, monkeypatch):
    code = "import sys, erasus_hf, erasus_hf.privacy; print('opacus' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "opacus", None)  # `import opacus` now raises ImportError
    with pytest.raises(ImportError, match="pip install opacus"):
        require_opacus()
    with pytest.raises(ImportError, match="pip install opacus"):
        DPTrainer(small_llama(tokenizer), dp_config(tmp_path), rows(tofu_slice), tokenizer)


def test_the_guarantee_travels_onto_the_unlearned_models_card(tokenizer, tofu_slice, tmp_path):
    """A model DP-trained here and saved (privacy.json beside its weights) is unlearned from its folder: the
    unlearned model's card states the starting model's guarantee under "Guarantees and verification"."""
    from huggingface_hub import ModelCard

    from erasus_hf import UnlearningTrainer

    from .testing_utils import config

    trainer = DPTrainer(
        small_llama(tokenizer),
        dp_config(tmp_path, max_steps=2),
        train_dataset=rows(tofu_slice),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "dp-model"))
    tokenizer.save_pretrained(tmp_path / "dp-model")
    report = trainer.privacy_report()

    args = config(tmp_path / "unlearn", strategy="ga", max_steps=1, use_peft=True)
    unlearner = UnlearningTrainer(str(tmp_path / "dp-model"), args, forget_dataset=qa(tofu_slice[0]).select(range(4)))
    assert unlearner.starting_privacy == report
    unlearner.train()
    unlearner.save_model()
    card = ModelCard.load(f"{args.output_dir}/README.md")
    section = card.text.split("## Guarantees and verification", 1)[1].split("## Limitations", 1)[0]
    assert "The starting model of this run" in section and f"{report.epsilon:.4g}" in section
    assert "beyond what the section above states" in card.text
