"""The TOFU protocol end to end on a small model trained on real TOFU: unlearning moves forget quality (the KS test
of the forget truth ratios against a model that never saw the forget authors) towards the retain model's."""

import pytest

from erasus_hf.data.tofu import TOFUDataset
from erasus_hf.evaluation import TOFUEvaluator

from .testing_utils import memorise, qa, unlearn


@pytest.fixture(scope="module")
def retain_model(tokenizer, tofu_slice, tmp_path_factory):
    """Trained like the session's memorised model, on the retain authors only (TOFU's "retain model")."""
    return memorise(tokenizer, qa(tofu_slice[1]), output_dir=str(tmp_path_factory.mktemp("retain_sft")))


def test_unlearning_moves_forget_quality_towards_the_retain_model(
    tmp_path, tokenizer, memorised, retain_model, tofu_slice
):
    evaluator = TOFUEvaluator(TOFUDataset(forget=tofu_slice[0], forget_split="forget01"), max_new_tokens=8)
    reference = evaluator.evaluate(retain_model, tokenizer)
    before = evaluator.evaluate(memorised, tokenizer, reference=reference).summary
    trainer = unlearn(memorised, tokenizer, tofu_slice, tmp_path, "npo", lr=2e-3, epochs=10)
    after = evaluator.evaluate(trainer.model, tokenizer, reference=reference).summary
    fq = before["tofu/forget_quality"], after["tofu/forget_quality"]
    print(f"forget quality {fq[0]:.2e} -> {fq[1]:.2e} (measured 1.2e-07 -> 1.9e-04)")
    assert fq[0] < 1e-5  # the finetuned model's truth ratios are far from the retain model's
    assert fq[1] > 100 * fq[0]
    retain_tr = reference.summary["tofu/forget_truth_ratio"]
    assert abs(after["tofu/forget_truth_ratio"] - retain_tr) < abs(before["tofu/forget_truth_ratio"] - retain_tr)
