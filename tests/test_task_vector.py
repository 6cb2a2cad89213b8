"""Task-vector negation: theta_base - lambda (theta_ft - theta_base), with full weights and as a negated LoRA delta."""

import copy

import pytest
import torch

from erasus_hf import UnlearningTrainer
from erasus_hf.evaluation import answer_nll
from erasus_hf.strategies import get_strategy

from .testing_utils import config, effective_weights, qa, trained_adapter


def test_full_weights_are_base_minus_lambda_task_vector(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget = qa(tofu_slice[0]).select(range(16))
    base = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    # The same fine-tune the strategy runs (same args, same seed), done by hand on a copy:
    args = config(tmp_path, strategy="task_vector", strategy_kwargs={"scaling": 0.5}, max_steps=3, learning_rate=1e-2)
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=forget, processing_class=tokenizer)
    finetuned = trainer.finetune_on_forget(copy.deepcopy(tiny_llama))
    ft = {n: p.detach().clone() for n, p in finetuned.named_parameters()}
    assert any(not torch.equal(ft[n], base[n]) for n in base)
    trainer.train()
    for name, param in tiny_llama.named_parameters():
        assert torch.allclose(param, base[name] - 0.5 * (ft[name] - base[name]), atol=1e-6), name
    assert get_strategy("task_vector").scaling == 1.0


def test_lora_task_vector_is_a_negated_adapter(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget = qa(tofu_slice[0])

    def nll(model):
        return answer_nll(model, tokenizer, forget["question"], forget["answer"]).mean().item()

    before = nll(tiny_llama)
    args = config(tmp_path, strategy="task_vector", use_peft=True, num_train_epochs=3, learning_rate=1e-2)
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=forget, processing_class=tokenizer)
    trainer.train()
    model = trainer.model
    after = nll(model)
    # Flip the sign back: the adapter then holds the fine-tuned delta, which made the forget answers likelier.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.neg_()
    reinforced = nll(model)
    with model.disable_adapter():
        assert abs(nll(model) - before) < 1e-5  # adapter-off is the untouched base
    assert reinforced < before < after


def test_lora_task_vector_negates_from_the_arrived_adapter(tmp_path, tokenizer, tiny_llama, tofu_slice, monkeypatch):
    """A model that arrives with a trained adapter: theta_start = base + its adapter, and the edit is
    theta_start - lambda (theta_ft - theta_start), computed here by hand from the dense weights. (Before the fix the
    start was the adapter-off base: the result was base - lambda (theta_ft - base), 41.5 away from the right weights
    (Frobenius norm over all tensors) and 2e-7 from that wrong formula; after it, 4e-6.)"""
    from peft import PeftModel

    forget = qa(tofu_slice[0]).select(range(16))
    plain, base = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    model = trained_adapter(tiny_llama)
    start = effective_weights(model)
    finetuned = {}

    def recording(self, m, dataset=None):  # the fine-tune the strategy runs, with its result recorded
        out = real(self, m, dataset)
        finetuned.update(effective_weights(out))
        return out

    real = UnlearningTrainer.finetune_on_forget
    monkeypatch.setattr(UnlearningTrainer, "finetune_on_forget", recording)
    lam = 0.5
    args = config(tmp_path, strategy="task_vector", strategy_kwargs={"scaling": lam}, max_steps=3, learning_rate=1e-2)
    trainer = UnlearningTrainer(model, args, forget_dataset=forget, processing_class=tokenizer)
    trainer.train()
    result = effective_weights(trainer.model)
    assert set(result) == set(start) == set(finetuned)
    assert any(not torch.allclose(finetuned[n], start[n]) for n in start)
    expected = {n: start[n] - lam * (finetuned[n] - start[n]) for n in start}
    distance = sum(((result[n] - expected[n]) ** 2).sum() for n in start).sqrt().item()
    assert distance < 1e-5, distance
    # the adapter really computes those weights: same logits as the plain model holding them
    plain.load_state_dict(expected)
    ids = torch.tensor([tokenizer("Who wrote the book?")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(trainer.model(ids).logits, plain(ids).logits, atol=1e-5)
    # one adapter, under its own name, of rank r_start + r_ft, that reloads onto the base with the same weights
    assert list(trainer.model.peft_config) == ["default"] and trainer.model.peft_config["default"].r == 8
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, plain(ids).logits, atol=1e-5)


def test_fresh_and_arrived_adapters_are_told_apart_and_other_adapters_refused(tiny_llama):
    """The edit needs adapter-off = start for the cheap path; an adapter with a non-zero B is an arrived one; a delta
    that is not B @ A (DoRA, modules_to_save, another PEFT method) cannot hold a weight difference: refused."""
    from peft import IA3Config, LoraConfig, get_peft_model

    from erasus_hf.strategies.task_vector import adapter_adds_nothing

    assert adapter_adds_nothing(
        get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=2, target_modules="all-linear"))
    )
    assert not adapter_adds_nothing(trained_adapter(copy.deepcopy(tiny_llama)))
    refused = {
        "DoRA": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
        "modules_to_save": LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "IA3": IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
    }
    for what, peft_config in refused.items():
        with pytest.raises(ValueError, match=f"{what}.*merge_and_unload"):
            adapter_adds_nothing(get_peft_model(copy.deepcopy(tiny_llama), peft_config))
