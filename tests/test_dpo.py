"""DPO / IdkDPO: formula, alternate-answer plumbing, cached reference, behaviour on real TOFU."""

import math

import pytest
import torch

from erasus_hf import UnlearningTrainer
from erasus_hf.evaluation import answer_nll
from erasus_hf.reference import CachedReference
from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.dpo import load_refusals

from .testing_utils import LABELS, LOGITS, batch, config, ctx, hand_token_logprobs, log_softmax_list, nll, qa, unlearn

ALT_LOGITS = torch.tensor(
    [
        [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0], [0.5, 0.5, 2.0]],
        [[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0]],
    ]
)
ALT_LABELS = torch.tensor([[0, 0, 2], [-100, 1, -100]])


def test_dpo_formula_against_hand_computation():
    beta = 0.1
    forget = batch()
    forget["alternate"] = {
        "logits": ALT_LOGITS,
        "labels": ALT_LABELS,
        "index": torch.tensor([0, 1]),
        "slot": torch.tensor([1, 1]),
    }
    ref = CachedReference(torch.tensor([[-3.0, -2.0], [-1.5, -4.0]]))  # [index, slot]
    loss, metrics = get_strategy("dpo", beta=beta).compute_loss(ctx(reference=ref), forget, None)
    forget_lp = [sum(r) for r in hand_token_logprobs()]
    alt_lp = []
    for b in range(2):
        alt_lp.append(
            sum(
                log_softmax_list(ALT_LOGITS[b, t].tolist())[int(ALT_LABELS[b, t])]
                for t in range(3)
                if ALT_LABELS[b, t] != -100
            )
        )
    per = []
    for b, (rf, ra) in enumerate([(-3.0, -2.0), (-1.5, -4.0)]):
        margin = (alt_lp[b] - ra) - (forget_lp[b] - rf)
        per.append(-(2 / beta) * math.log(1 / (1 + math.exp(-beta * margin))))
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-5)
    assert LABELS.shape == ALT_LABELS.shape
    assert metrics["dpo_margin"].item() == pytest.approx(
        sum((alt_lp[b] - [-2.0, -4.0][b]) - (forget_lp[b] - [-3.0, -1.5][b]) for b in range(2)) / 2, abs=1e-5
    )
    assert LOGITS.shape == ALT_LOGITS.shape


def test_refusals_ship_with_the_package_and_are_drawn_reproducibly(tofu_slice):
    refusals = load_refusals()
    assert len(refusals) == 100 and "I don't have that information." in refusals
    forget = qa(tofu_slice[0])
    strategy = get_strategy("idk_dpo")
    first = strategy.alternate_answers(forget, seed=0)
    assert first == strategy.alternate_answers(forget, seed=0) and len(set(first)) > 10
    assert set(first) <= set(refusals)


def test_dpo_needs_an_alternate_column(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget, retain = (qa(d) for d in tofu_slice)
    with pytest.raises(ValueError, match="needs an 'alternate' column"):
        UnlearningTrainer(
            tiny_llama,
            config(tmp_path, strategy="dpo"),
            forget_dataset=forget,
            retain_dataset=retain,
            processing_class=tokenizer,
        )
    with_alt = forget.add_column("alternate", ["It is not known."] * len(forget))
    trainer = UnlearningTrainer(
        tiny_llama,
        config(tmp_path, strategy="dpo"),
        forget_dataset=with_alt,
        retain_dataset=retain,
        processing_class=tokenizer,
    )
    alternate = next(iter(trainer.get_train_dataloader()))["forget"]["alternate"]
    assert (alternate["slot"] == 1).all() and (alternate["labels"] != -100).any()


def test_idk_dpo_makes_the_model_prefer_refusals(tmp_path, memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    refusals = [load_refusals()[0]] * len(forget)

    def idk_nll(model):
        return answer_nll(model, tokenizer, forget["question"], refusals).mean().item()

    before = nll(memorised, tokenizer, forget), idk_nll(memorised), nll(memorised, tokenizer, retain)
    model = unlearn(memorised, tokenizer, tofu_slice, tmp_path, "idk_dpo", lr=2e-3, epochs=10).model
    after = nll(model, tokenizer, forget), idk_nll(model), nll(model, tokenizer, retain)
    print(
        f"idk_dpo: forget {before[0]:.3f}->{after[0]:.3f}, refusal {before[1]:.3f}->{after[1]:.3f}, "
        f"retain {before[2]:.3f}->{after[2]:.3f}"
    )
    # Measured here: forget +0.29 nats/token (-17 nats per answer), refusal -2.8, retain +0.008. DPO moves the
    # log-ratio margin; most of it goes into making the refusal likelier.
    assert after[0] - before[0] > 0.15
    assert after[1] < before[1] - 1.5
    assert after[2] - before[2] < 0.2
