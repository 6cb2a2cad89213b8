"""Robustness checks (erasus_hf.evaluation.robustness): the relearning attack and int8 / int4 quantisation.

Measured on the memorised tiny Llama (2 shared CPU cores), the numbers the bounds below leave headroom around:
GA (full model, lr 1e-3, 5 steps of 8 on the 40 forget rows) takes the forget accuracy of forget rows 10-39 from 1.0
to 0.028 (P 5.5e-5); relearning on rows 0-9 (10 AdamW steps, lr 1e-3, batch 4) brings it back to 0.893 (P 0.64),
while the same attack on an untrained Llama of the same shape reaches only 0.078. Quantised copies (optimum-quanto
through transformers' QuantoConfig) of the memorised model: forget P 0.9895 at full precision, 0.9895 at int8, 0.9866
at int4 (retain 0.9885 / 0.9885 / 0.9852); mean |logit change| on the forget answers 0.014 at int8, 0.21 at int4.
Plain GA / GradDiff / NPO unlearning of this model is NOT undone by int4 (forget P 0.146 -> 0.136 for GA at lr 5e-4;
AdamW moves every weight by about lr per step, which survives rounding on average); an update kept inside the int4
rounding buckets is undone completely (`test_int4_undoes_an_unlearning_hidden_inside_its_rounding_buckets`).
"""

from __future__ import annotations

import copy
import math
import sys
import types

import pytest
import torch
from datasets import Dataset
from optimum.quanto import QLinear
from peft import LoraConfig, get_peft_model
from torch import nn

from erasus_hf.data.collator import QACollator
from erasus_hf.evaluation.result import EvaluationResult
from erasus_hf.evaluation.robustness import (
    QuantizationEvaluator,
    RelearningEvaluator,
    attack_copy,
    forget_metrics,
    forget_stats_metrics,
    quantization_config,
    quantization_report,
    quantized_copy,
    relearning_attack,
)
from erasus_hf.evaluation.scoring import TokenStats
from erasus_hf.modeling.tiny import build_tiny_llama

from .testing_utils import small_llama, unlearn


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


def quantized_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QLinear)}


def row_groups(weight: torch.Tensor) -> torch.Tensor:
    """`weight` as (rows, groups, inputs per group): quanto's int4 groups of 128 inputs (a whole row when shorter)."""
    rows, cols = weight.shape
    return weight.reshape(rows, -1, min(cols, 128))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_copy_rounds_the_linear_weights_to_the_bit_grid(tokenizer, tiny_llama, bits):
    """Every Linear but the output head holds a frozen quanto weight on the `bits` grid: int8 symmetric per row
    (error at most half of max|w| / 127), int4 min-max per row (at most 16 levels, error at most half of
    (max - min) / 15); int8 rows take far more than 16 levels. The caller's model keeps its float weights."""
    before = snapshot(tiny_llama)
    quantized = quantized_copy(tiny_llama, bits=bits)
    assert_unchanged(tiny_llama, before)
    linears = {name: m for name, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    qlinears = quantized_linears(quantized)
    assert set(qlinears) == set(linears) - {"lm_head"}
    assert type(quantized.lm_head) is nn.Linear
    assert torch.equal(quantized.lm_head.weight, tiny_llama.lm_head.weight)  # transformers keeps the head in float
    for name, qlinear in qlinears.items():
        weight = linears[name].weight.detach()
        grid = qlinear.weight.dequantize()
        levels = [len(torch.unique(row)) for row in grid]
        if bits == 8:
            step = weight.abs().amax(dim=1, keepdim=True) / 127
            assert min(levels) > 16, name
        else:
            step = (weight.amax(dim=1, keepdim=True) - weight.amin(dim=1, keepdim=True)) / 15
            assert max(levels) <= 16, name
        assert ((grid - weight).abs() <= step / 2 + 1e-6).all(), name
        assert not torch.equal(grid, weight), name


def test_int4_moves_the_memorised_model_further_than_int8(memorised, tokenizer, tofu_slice):
    """On the forget answers the int4 copy's logits move by 0.21 on average (13% of the mean |logit|), the int8
    copy's by 0.014 (0.9%): int4 really changes the model, int8 barely."""
    rows = [{"question": q, "answer": a} for q, a in zip(tofu_slice[0]["question"], tofu_slice[0]["answer"])]
    batch = QACollator(tokenizer)(rows)
    answer = batch["labels"] != -100
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        full = memorised(**inputs).logits[answer]
        gap = {bits: (quantized_copy(memorised, bits)(**inputs).logits[answer] - full).abs() for bits in (8, 4)}
    assert gap[4].mean().item() > 0.1  # measured 0.21 (max 3.1)
    assert gap[8].mean().item() < 0.05  # measured 0.014 (max 0.21)
    assert gap[4].mean().item() > 5 * gap[8].mean().item()  # measured 15x


def test_quantization_report_holds_forget_and_retain_metrics_at_three_precisions(memorised, tokenizer, tofu_slice):
    """The memorised model keeps its forget and retain knowledge at int8 (P 0.9895 -> 0.9895) and nearly at int4
    (0.9866); the full-precision numbers are the model's own, the differences are quantised minus full."""
    forget, retain = tofu_slice
    before = snapshot(memorised)
    out = quantization_report(memorised, tokenizer, forget, retain)
    assert_unchanged(memorised, before)
    assert out["precisions"] == ["full", "int8", "int4"] and out["bits"] == [8, 4] and out["backend"] == "quanto"
    metrics = {"forget_prob", "forget_accuracy", "retain_prob", "retain_accuracy"}
    for precision in out["precisions"]:
        assert set(out[precision]) == metrics
        for metric in metrics:
            assert len(out["per_example"][f"{metric}_{precision}"]) == 40
    full_forget, _ = forget_metrics(memorised, tokenizer, forget)
    full_retain, _ = forget_metrics(memorised, tokenizer, retain)
    assert out["full"]["forget_prob"] == pytest.approx(full_forget["forget_prob"])
    assert out["full"]["retain_accuracy"] == pytest.approx(full_retain["forget_accuracy"])
    for precision in ("int8", "int4"):
        for metric in metrics:
            assert out["difference"][precision][metric] == pytest.approx(out[precision][metric] - out["full"][metric])
    assert out["full"]["forget_prob"] > 0.95 and out["full"]["retain_prob"] > 0.95  # measured 0.9895, 0.9885
    assert abs(out["difference"]["int8"]["forget_prob"]) < 0.002  # measured 3e-5
    assert 0.002 < -out["difference"]["int4"]["forget_prob"] < 0.02  # measured 0.0029: int4 costs a little
    assert out["int4"]["forget_accuracy"] == out["int4"]["retain_accuracy"] == 1.0
    assert "recovered" not in out and "retained" not in out  # no starting model given


def hide_in_int4_buckets(original: nn.Module, unlearned: nn.Module) -> nn.Module:
    """`original` with each quantised Linear weight moved towards `unlearned`'s but kept within 0.45 of an int4 step
    of the value it rounds to, and every group's minimum and maximum left as they are: the int4 grid (min-max over
    groups of 128 inputs, 15 steps) and the rounding stay those of `original` (the unlearning update is 'smaller than
    half a quantisation step', the case Zhang et al. 2024 explain). Embeddings, norms and lm_head stay `original`'s."""
    hidden = copy.deepcopy(original)
    targets = dict(unlearned.named_modules())
    with torch.no_grad():
        for name, module in hidden.named_modules():
            if not isinstance(module, nn.Linear) or name == "lm_head":
                continue
            groups = row_groups(module.weight)
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            step = (high - low) / 15
            grid = torch.round((groups - low) / step) * step + low
            target = row_groups(targets[name].weight)
            moved = torch.minimum(torch.maximum(target, grid - 0.45 * step), grid + 0.45 * step)
            moved = torch.minimum(torch.maximum(moved, low), high)
            moved = torch.where((groups == low) | (groups == high), groups, moved)
            module.weight.copy_(moved.reshape(module.weight.shape))
    return hidden


def test_int4_undoes_an_unlearning_hidden_inside_its_rounding_buckets(memorised, tokenizer, tofu_slice, tmp_path):
    """GA's update, clipped to stay inside the int4 rounding buckets of the memorised weights, still unlearns at full
    precision (forget P 0.9895 -> 0.0016) and at int8 (recovered 0.000), and int4 rounds it away: the int4 copy is
    the memorised model's int4 copy, forget P 0.9866, recovered 0.997 of the drop."""
    forget, retain = tofu_slice
    original = copy.deepcopy(memorised)
    unlearned = unlearn(
        memorised, tokenizer, tofu_slice, tmp_path, "ga", lr=1e-3, epochs=1, use_peft=False, with_retain=False
    ).model.eval()
    hidden = hide_in_int4_buckets(original, unlearned)
    # The construction holds: the int4 copies of the hidden and of the original model have the same weights.
    original_int4 = quantized_linears(quantized_copy(original, bits=4))
    for name, qlinear in quantized_linears(quantized_copy(hidden, bits=4)).items():
        assert torch.equal(qlinear.weight.dequantize(), original_int4[name].weight.dequantize()), name

    out = quantization_report(hidden, tokenizer, forget, retain, original=original)

    start, _ = forget_metrics(original, tokenizer, forget)
    assert out["original"] == pytest.approx(start)
    assert out["full"]["forget_prob"] < 0.05 and out["full"]["forget_accuracy"] < 0.3  # measured 0.0016, 0.080
    assert out["int8"]["forget_prob"] < 0.05  # measured 0.0016: int8 steps are fine enough to keep the update
    assert out["int4"]["forget_prob"] > 0.95 and out["int4"]["forget_accuracy"] == 1.0  # measured 0.9866
    assert out["int4"]["retain_prob"] > 0.95  # measured 0.9852 (0.0127 at full precision: GA also broke retain)
    for precision in ("int8", "int4"):
        for metric in ("forget_prob", "forget_accuracy"):
            drop = start[metric] - out["full"][metric]
            undone = out[precision][metric] - out["full"][metric]
            assert out["recovered"][precision][metric] == pytest.approx(undone / drop)
    for precision in ("full", "int8", "int4"):
        assert out["retained"][precision]["forget_prob"] == pytest.approx(
            out[precision]["forget_prob"] / start["forget_prob"]
        )
    assert abs(out["recovered"]["int8"]["forget_prob"]) < 0.01  # measured -6e-6
    assert out["recovered"]["int4"]["forget_prob"] > 0.95  # measured 0.997
    assert out["recovered"]["int4"]["forget_accuracy"] > 0.95  # measured 1.0
    assert out["retained"]["full"]["forget_prob"] < 0.05 < 0.95 < out["retained"]["int4"]["forget_prob"]


def test_quantized_copy_merges_a_peft_model(tokenizer, tiny_llama):
    """The copy of a PeftModel is the quantised merge of base and adapter; the caller's PeftModel is unchanged."""
    model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = snapshot(model)
    quantized = quantized_copy(model, bits=4)
    assert_unchanged(model, before)
    merged = quantized_copy(attack_copy(model), bits=4)
    base = quantized_copy(small_llama(tokenizer), 4)
    inputs = tokenizer(["Question: Who wrote it?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        logits, merged_logits, base_logits = (m(**inputs).logits for m in (quantized, merged, base))
    assert torch.equal(logits, merged_logits)
    assert (logits - base_logits).abs().max().item() > 1e-3  # the adapter is in the quantised weights


def test_unavailable_backends_are_refused_naming_what_to_install(tiny_llama, tofu_slice, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # importing it now fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(
        RuntimeError, match=r"backend='bitsandbytes' needs bitsandbytes \(`pip install bitsandbytes`\)"
    ):
        quantized_copy(tiny_llama, bits=4, backend="bitsandbytes")
    with pytest.raises(RuntimeError, match=r"pip install torchao"):
        quantization_config(8, backend="torchao")
    with pytest.raises(RuntimeError, match="bitsandbytes"):  # refused before any scoring
        quantization_report(tiny_llama, None, tofu_slice[0], backend="bitsandbytes")
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))  # installed, but the model is on CPU
    with pytest.raises(RuntimeError, match="int4 weight-only quantisation runs on CUDA GPUs.*backend='quanto'"):
        quantization_config(4, backend="torchao", device="cpu")
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(RuntimeError, match=r"pip install optimum-quanto"):
        quantized_copy(tiny_llama, bits=8)
    with pytest.raises(ValueError, match="backend must be one of quanto, bitsandbytes, torchao; got 'gptq'"):
        quantization_config(4, backend="gptq")


def test_bad_quantisation_input_raises(tokenizer, tiny_llama, tofu_slice):
    forget = tofu_slice[0].select(range(2))
    for bits in (3, 16, True, (8, 3), ()):
        with pytest.raises(ValueError, match=r"bits must be 8 or 4 \(or a list of them"):
            quantization_report(tiny_llama, tokenizer, forget, bits=bits)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizationEvaluator(forget, bits=2)
    with pytest.raises(ValueError, match="quantized_copy takes one bit width"):
        quantized_copy(tiny_llama, bits=(8, 4))
    with pytest.raises(ValueError, match=r"missing \['forget_accuracy'\]"):
        quantization_report(tiny_llama, tokenizer, forget, original={"forget_prob": 0.9})
    with pytest.raises(ValueError, match="The retain rows is empty"):
        quantization_report(tiny_llama, tokenizer, forget, retain_rows=forget.select([]))
    with pytest.raises(TypeError, match="needs a transformers PreTrainedModel"):
        quantized_copy(nn.Sequential(nn.Linear(4, 4)), bits=8)


def test_quantization_evaluator_reports_every_precision_and_the_recovery(tokenizer, tiny_llama, tofu_slice):
    """Same numbers as quantization_report, under `quant/{metric}_{precision}` and `..._recovered`."""
    forget, retain = tofu_slice[0].select(range(4)), tofu_slice[1].select(range(4))
    original = {"forget_prob": 0.5, "forget_accuracy": 0.5}
    out = quantization_report(tiny_llama, tokenizer, forget, retain, original=original)
    result = QuantizationEvaluator(forget, retain_rows=retain, original=original).evaluate(tiny_llama, tokenizer)
    assert isinstance(result, EvaluationResult)
    for precision in ("full", "int8", "int4"):
        for metric in ("forget_prob", "forget_accuracy", "retain_prob", "retain_accuracy"):
            assert result.summary[f"quant/{metric}_{precision}"] == pytest.approx(out[precision][metric])
            assert result.per_example[f"quant/{metric}_{precision}"] == pytest.approx(
                out["per_example"][f"{metric}_{precision}"]
            )
    for precision in ("int8", "int4"):
        for metric in ("forget_prob", "forget_accuracy"):
            assert result.summary[f"quant/{metric}_{precision}_recovered"] == pytest.approx(
                out["recovered"][precision][metric], nan_ok=True
            )
    assert len(result.summary) == 12 + 4
    assert result.meta["quant"]["bits"] == [8, 4] and result.meta["quant"]["backend"] == "quanto"
    assert result.meta["quant"]["original"] == original
    assert out["recovered"]["int4"]["forget_prob"] == pytest.approx(
        (out["int4"]["forget_prob"] - out["full"]["forget_prob"]) / (0.5 - out["full"]["forget_prob"])
    )
    only_int4 = QuantizationEvaluator(forget, bits=4, name="q4").evaluate(tiny_llama, tokenizer)
    assert sorted(only_int4.summary) == [
        "q4/forget_accuracy_full",
        "q4/forget_accuracy_int4",
        "q4/forget_prob_full",
        "q4/forget_prob_int4",
    ]
