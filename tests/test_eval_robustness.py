"""Robustness checks (erasus_hf.evaluation.robustness): the relearning attack and int8 quantisation.

Measured on the memorised tiny Llama (2 shared CPU cores), the numbers the bounds below leave headroom around:
GA (full model, lr 1e-3, 5 steps of 8 on the 40 forget rows) takes the forget accuracy of forget rows 10-39 from 1.0
to 0.028 (P 5.5e-5); relearning on rows 0-9 (10 AdamW steps, lr 1e-3, batch 4) brings it back to 0.893 (P 0.64),
while the same attack on an untrained Llama of the same shape reaches only 0.078. The int8 copy of the memorised
model: forget P 0.9874 vs 0.9895 at full precision (largest per-row gap 0.0035), forget accuracy 1.0 for both.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from torch import nn

from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.evaluation.robustness import (
    QuantizationEvaluator,
    RelearningEvaluator,
    forget_metrics,
    forget_stats_metrics,
    quantized_copy,
    quantized_forget_metrics,
    relearning_attack,
)
from erasus_hf.evaluation.scoring import TokenStats
from erasus_hf.modeling.tiny import build_tiny_llama

from .conftest import unlearn

# torch.ao.quantization works in torch 2.13 but warns that it is deprecated (DeprecationWarning, ignored by the
# project's pytest settings) and that quantized tensor creation functions are deprecated (this UserWarning).
QUANT_WARNING = "ignore:torch.quantize_per_tensor:UserWarning"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def stats(logprobs: list[float], targets: list[int], argmax: list[int]) -> TokenStats:
    n = len(logprobs)
    return TokenStats(
        logprobs=torch.tensor(logprobs),
        targets=torch.tensor(targets),
        argmax=torch.tensor(argmax),
        mean=torch.zeros(n),
        std=torch.ones(n),
    )


def test_forget_metrics_match_a_hand_computation():
    """P = exp(mean log p) per example, accuracy = share of argmax hits per example, both averaged over examples."""
    first = stats([math.log(0.5), math.log(0.25)], targets=[1, 3], argmax=[1, 2])  # P = sqrt(1/8), 1 hit of 2
    second = stats([0.0], targets=[7], argmax=[7])  # P = 1, 1 hit of 1
    summary, per_example = forget_stats_metrics([first, second])
    assert per_example["forget_prob"] == pytest.approx([0.125**0.5, 1.0])
    assert per_example["forget_accuracy"] == pytest.approx([0.5, 1.0])
    assert summary["forget_prob"] == pytest.approx((0.3535533906 + 1) / 2)
    assert summary["forget_accuracy"] == pytest.approx(0.75)


def test_bad_input_raises(tokenizer, tiny_llama, tofu_slice):
    forget, _ = tofu_slice
    with pytest.raises(ValueError, match="share 2 question"):
        relearning_attack(tiny_llama, tokenizer, forget.select(range(4)), forget.select(range(2, 10)), steps=1)
    no_answer = Dataset.from_dict({"question": ["q?"], "text": ["a"]})
    with pytest.raises(ValueError, match=r"missing \['answer'\], found \['question', 'text'\]"):
        relearning_attack(tiny_llama, tokenizer, no_answer, forget.select(range(2)), steps=1)
    with pytest.raises(ValueError, match="empty"):
        forget_metrics(tiny_llama, tokenizer, forget.select([]))
    with pytest.raises(ValueError, match="steps must be at least 1"):
        relearning_attack(tiny_llama, tokenizer, forget.select(range(2)), forget.select(range(2, 4)), steps=0)
    with pytest.raises(ValueError, match="No scored examples"):
        forget_stats_metrics([])
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantized_copy(tiny_llama, bits=3)


def test_relearning_recovers_forget_accuracy_after_gradient_ascent(memorised, tokenizer, tofu_slice, tmp_path):
    """GA makes the model fail on the forget set; 10 fine-tuning steps on 10 forget rows bring the other 30 back
    (the knowledge was suppressed, not removed), far beyond what the same attack teaches an untrained model."""
    forget, _ = tofu_slice
    relearn_rows, eval_rows = forget.select(range(10)), forget.select(range(10, 40))
    unlearned = unlearn(
        memorised, tokenizer, tofu_slice, tmp_path, "ga", lr=1e-3, epochs=1, use_peft=False, with_retain=False
    ).model.eval()
    before_attack = snapshot(unlearned)

    out = relearning_attack(unlearned, tokenizer, relearn_rows, eval_rows, steps=10, learning_rate=1e-3)

    assert_unchanged(unlearned, before_attack)
    assert out["steps"] == 10 and len(out["train_loss"]) == 10
    assert out["before"]["forget_accuracy"] < 0.15  # measured 0.028: GA did unlearn
    assert out["after"]["forget_accuracy"] > 0.6  # measured 0.893
    assert out["recovered"]["forget_accuracy"] > 0.5  # measured 0.865
    assert out["after"]["forget_prob"] > 0.3 > 1e-2 > out["before"]["forget_prob"]  # measured 0.64 and 5.5e-5
    assert out["recovered"]["forget_prob"] == pytest.approx(out["after"]["forget_prob"] - out["before"]["forget_prob"])
    assert len(out["per_example"]["forget_prob_after"]) == 30
    # The "before" numbers are those of the caller's model, measured independently.
    summary, _ = forget_metrics(unlearned, tokenizer, eval_rows)
    assert out["before"] == pytest.approx(summary)

    control = build_tiny_llama(tokenizer, seed=0)  # same shape, never saw TOFU
    baseline = relearning_attack(control, tokenizer, relearn_rows, eval_rows, steps=10, learning_rate=1e-3)
    assert baseline["after"]["forget_accuracy"] < 0.25  # measured 0.078
    assert out["after"]["forget_accuracy"] - baseline["after"]["forget_accuracy"] > 0.4


def test_relearning_leaves_a_peft_model_untouched(tokenizer, tiny_llama, tofu_slice):
    """The attack merges a copy's adapter and trains the copy; the caller's PeftModel (base and LoRA) is as it was."""
    forget, _ = tofu_slice
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = snapshot(model)
    out = relearning_attack(model, tokenizer, forget.select(range(4)), forget.select(range(4, 8)), steps=2)
    assert_unchanged(model, before)
    assert any(name.endswith("lora_A.default.weight") for name in before)
    assert out["recovered"]["forget_prob"] > 0  # two steps on the same author raise its other rows' probability


def test_relearning_evaluator_reports_the_attack(tokenizer, tiny_llama, tofu_slice):
    """Same seed, same numbers as relearning_attack, under the evaluator's names."""
    forget, _ = tofu_slice
    relearn_rows, eval_rows = forget.select(range(4)), forget.select(range(4, 10))
    result = RelearningEvaluator(relearn_rows, eval_rows, steps=2, learning_rate=1e-3).evaluate(tiny_llama, tokenizer)
    out = relearning_attack(tiny_llama, tokenizer, relearn_rows, eval_rows, steps=2, learning_rate=1e-3)
    assert isinstance(result, EvaluationResult)
    assert result.summary["relearn/forget_prob_before"] == pytest.approx(out["before"]["forget_prob"])
    assert result.summary["relearn/forget_prob_after"] == pytest.approx(out["after"]["forget_prob"])
    assert result.summary["relearn/forget_accuracy_before"] == pytest.approx(out["before"]["forget_accuracy"])
    assert result.summary["relearn/forget_accuracy_after"] == pytest.approx(out["after"]["forget_accuracy"])
    assert result.per_example["relearn/forget_prob_after"] == pytest.approx(out["per_example"]["forget_prob_after"])
    assert len(result.per_example["relearn/forget_prob_after"]) == 6
    assert result.meta["relearn"]["steps"] == 2


@pytest.mark.filterwarnings(QUANT_WARNING)
def test_quantized_copy_holds_int8_linear_weights(tokenizer, tiny_llama):
    """Every Linear of the copy is torch's dynamic int8 Linear whose weight is the float weight rounded to its int8
    grid (error at most half a step); the original keeps its float Linears and weights; logits stay close."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    before = snapshot(tiny_llama)
    linears = {name: m for name, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    quantized = quantized_copy(tiny_llama, bits=8)
    assert_unchanged(tiny_llama, before)
    assert all(type(m) is nn.Linear for m in linears.values())
    modules = dict(quantized.named_modules())
    assert not any(type(m) is nn.Linear for m in modules.values())
    for name, linear in linears.items():
        qlinear = modules[name]
        assert isinstance(qlinear, DynamicInt8Linear), name
        weight = qlinear.weight()
        assert weight.dtype == torch.qint8
        assert weight.int_repr().dtype == torch.int8
        error = (weight.dequantize() - linear.weight.detach()).abs().max().item()
        assert error <= weight.q_scale() / 2 + 1e-6, name
    inputs = tokenizer(["Question: Who wrote it?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        full, quant = tiny_llama(**inputs).logits, quantized(**inputs).logits
    assert (full - quant).abs().max().item() < 0.05 * full.abs().max().item()


def test_four_bits_raise_naming_what_to_install(tiny_llama):
    with pytest.raises(RuntimeError, match="torchao"):
        quantized_copy(tiny_llama, bits=4)


@pytest.mark.filterwarnings(QUANT_WARNING)
def test_int8_copy_keeps_the_forget_metrics_of_the_memorised_model(memorised, tokenizer, tofu_slice):
    """An int8 copy of a model that memorised the forget set still knows it (measured P 0.9874 vs 0.9895)."""
    forget, _ = tofu_slice
    before = snapshot(memorised)
    out = quantized_forget_metrics(memorised, tokenizer, forget, bits=8)
    assert_unchanged(memorised, before)
    assert out["bits"] == 8
    assert out["full"]["forget_prob"] > 0.95
    assert abs(out["difference"]["forget_prob"]) < 0.01
    assert abs(out["difference"]["forget_accuracy"]) <= 0.01
    gaps = [
        abs(q - f)
        for q, f in zip(
            out["per_example"]["forget_prob_quantized"], out["per_example"]["forget_prob_full"], strict=True
        )
    ]
    assert max(gaps) < 0.02  # measured 0.0035
    assert out["difference"]["forget_prob"] != 0  # the copy really runs different (quantised) weights


@pytest.mark.filterwarnings(QUANT_WARNING)
def test_quantization_evaluator_reports_both_precisions(tokenizer, tiny_llama, tofu_slice):
    rows = tofu_slice[0].select(range(4))
    out = quantized_forget_metrics(tiny_llama, tokenizer, rows, bits=8)
    result = QuantizationEvaluator(rows, bits=8).evaluate(tiny_llama, tokenizer)
    assert isinstance(result, EvaluationResult)
    for metric in ("forget_prob", "forget_accuracy"):
        assert result.summary[f"quant8/{metric}_full"] == pytest.approx(out["full"][metric])
        assert result.summary[f"quant8/{metric}_quantized"] == pytest.approx(out["quantized"][metric])
    assert result.per_example["quant8/forget_prob_quantized"] == pytest.approx(
        out["per_example"]["forget_prob_quantized"]
    )
    assert result.meta["quant8"]["bits"] == 8
