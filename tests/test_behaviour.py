"""Behaviour on a small Llama that memorised real TOFU authors: after unlearning, the forget answers really became
unlikely, and (for methods with a retain term) the retain answers stayed likely within a stated bound."""

import pytest
import torch

from erasus_hf import ErasusUnlearner

from .testing_utils import nll, qa, unlearn


def test_the_starting_model_memorised_both_sets(_memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    assert nll(_memorised, tokenizer, forget) < 0.3 and nll(_memorised, tokenizer, retain) < 0.3


# The starting model's answer NLL is ~0.01 nats/token on both sets, so bounds are stated as rises in nats/token.
# (strategy, LoRA?, learning rate, epochs, minimum forget NLL rise, maximum retain NLL rise or None)
# Measured here (forget rise / retain rise): ga 14.2 / 14.0 (no retain term: it collapses), grad_diff 3.38 / 1.22
# (0.86 with another draw of the LoRA initialisation, 1.52 at one torch thread: GradDiff's unbounded ascent runs away
# between its 4th epoch (forget rise 0.37) and its 5th, and its retain damage swings, hence its loose bound: 2.39
# with MKL's COMPATIBLE path, tests/conftest.py),
# npo 2.32 / 0.02, simnpo 4.45 / 0.004, npo full fine-tune 2.18 / 0.76.
CASES = [
    ("ga", True, 2e-3, 5, 5.0, None),
    ("grad_diff", True, 1e-3, 5, 1.5, 3.0),
    ("npo", True, 2e-3, 10, 1.5, 0.1),
    ("simnpo", True, 2e-3, 10, 2.0, 0.1),
    ("npo", False, 1e-4, 5, 1.5, 1.0),
]


@pytest.mark.parametrize(("strategy", "lora", "lr", "epochs", "min_forget_rise", "max_retain_rise"), CASES)
def test_unlearning_raises_forget_nll_and_holds_retain(
    tmp_path, memorised, tokenizer, tofu_slice, strategy, lora, lr, epochs, min_forget_rise, max_retain_rise
):
    forget, retain = tofu_slice
    forget_before, retain_before = nll(memorised, tokenizer, forget), nll(memorised, tokenizer, retain)
    trainer = unlearn(
        memorised,
        tokenizer,
        tofu_slice,
        tmp_path,
        strategy,
        lr=lr,
        epochs=epochs,
        use_peft=lora,
        with_retain=strategy != "ga",
    )
    forget_after, retain_after = nll(trainer.model, tokenizer, forget), nll(trainer.model, tokenizer, retain)
    print(
        f"{strategy} lora={lora}: forget {forget_before:.3f}->{forget_after:.3f}, "
        f"retain {retain_before:.3f}->{retain_after:.3f}"
    )
    assert forget_after - forget_before > min_forget_rise
    assert forget_after > 3 * forget_before
    if max_retain_rise is not None:
        assert retain_after - retain_before < max_retain_rise


def test_erasus_unlearner_front_door(memorised, tokenizer, tofu_slice):
    forget, retain = tofu_slice
    before = {name: p.detach().clone() for name, p in memorised.named_parameters()}
    forget_before = nll(memorised, tokenizer, forget)  # measured first: PEFT injects LoRA into `memorised` in place
    result = ErasusUnlearner(
        memorised,
        strategy="npo",
        tokenizer=tokenizer,
        use_peft=True,
        learning_rate=2e-3,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    ).fit(qa(forget), qa(retain), epochs=6)
    assert nll(result.model, tokenizer, forget) - forget_before > 0.5
    assert len(result.forget_loss_history) == len(result.retain_loss_history) == 30  # 40 rows / batch 8 x 6 epochs
    assert result.forget_loss_history[-1] < result.forget_loss_history[0]  # NPO's loss falls as y_f gets unlikely
    assert result.elapsed_time > 0
    with result.model.disable_adapter():  # base weights untouched: LoRA only
        for name, p in result.model.get_base_model().named_parameters():
            if "lora_" not in name:
                assert torch.equal(p, before[name.replace(".base_layer", "")])
