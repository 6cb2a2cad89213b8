"""A LoRA adapter trains under gradient checkpointing: its weights move as they do without checkpointing, the base
weights do not. With reentrant checkpointing the frozen embeddings' output carries no gradient into the checkpointed
layers, so the adapter inside them would get none (open-unlearning's issue #178: LoRA weights never moving) unless
the inputs are made to require gradients (`enable_input_require_grads`, as TRL's SFTTrainer calls it)."""

from __future__ import annotations

import pytest
import torch

from erasus_hf import UnlearningTrainer

from .testing_utils import config, qa, small_llama


def _train(tmp_path, model, tokenizer, tofu_slice, checkpointing: bool, use_reentrant: bool | None):
    forget, retain = tofu_slice
    kwargs = {} if use_reentrant is None else {"gradient_checkpointing_kwargs": {"use_reentrant": use_reentrant}}
    args = config(
        tmp_path,
        output_dir=str(tmp_path / f"gc_{checkpointing}_{use_reentrant}"),
        strategy="npo",
        use_peft=True,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_steps=3,
        learning_rate=1e-2,
        use_cpu=True,
        gradient_checkpointing=checkpointing,
        **kwargs,
    )
    trainer = UnlearningTrainer(
        model, args, forget_dataset=qa(forget).select(range(8)), retain_dataset=qa(retain).select(range(8)),
        processing_class=tokenizer,
    )  # fmt: skip
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainable = {k for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    after = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    # checkpointing really ran in the decoder layers (transformers' GradientCheckpointingLayer flag)
    flags = [m.gradient_checkpointing for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing")]
    assert flags and all(f == checkpointing for f in flags)
    return before, after, trainable


@pytest.mark.parametrize("use_reentrant", [None, False, True])  # None: transformers' default (non-reentrant)
def test_lora_adapter_moves_under_gradient_checkpointing(tmp_path, tokenizer, tofu_slice, use_reentrant):
    _, without_checkpointing, _ = _train(tmp_path, small_llama(tokenizer), tokenizer, tofu_slice, False, None)
    before, after, trainable = _train(tmp_path, small_llama(tokenizer), tokenizer, tofu_slice, True, use_reentrant)
    lora = {k for k in before if "lora_" in k}
    assert lora and trainable == lora
    for key in lora:  # every adapter matrix moved (B starts at zero; A moves with B's gradient after step 1)
        assert (after[key] - before[key]).abs().max() > 1e-4, key
    for key in before.keys() - set(lora):  # the base model is untouched
        assert torch.equal(after[key], before[key]), key
    # and it moved exactly as it does without checkpointing (recomputation changes nothing)
    for key in lora:
        assert torch.allclose(after[key], without_checkpointing[key], atol=1e-6), key
