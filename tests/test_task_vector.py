"""Task-vector negation: theta_base - lambda (theta_ft - theta_base), with full weights and as a negated LoRA delta."""

import copy

import torch

from erasus_hf import UnlearningTrainer
from erasus_hf.evaluation import answer_nll
from erasus_hf.strategies import get_strategy
from erasus_hf.strategies.task_vector import finetune_on_forget

from .conftest import qa
from .test_trainer import config


def test_full_weights_are_base_minus_lambda_task_vector(tmp_path, tokenizer, tiny_llama, tofu_slice):
    forget = qa(tofu_slice[0]).select(range(16))
    base = {n: p.detach().clone() for n, p in tiny_llama.named_parameters()}
    # The same fine-tune the strategy runs (same args, same seed), done by hand on a copy:
    args = config(tmp_path, strategy="task_vector", strategy_kwargs={"scaling": 0.5}, max_steps=3, learning_rate=1e-2)
    trainer = UnlearningTrainer(tiny_llama, args, forget_dataset=forget, processing_class=tokenizer)
    finetuned = finetune_on_forget(trainer, copy.deepcopy(tiny_llama))
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
