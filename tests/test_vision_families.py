"""Image and video classifiers of the HF stack through the `classification` objective, on real handwritten digits
(sklearn's load_digits): a tiny `ViTForImageClassification` on the 8x8 images upsampled to 16x16, and a tiny
`VideoMAEForVideoClassification` on clips of a digit moving across a 16x16 canvas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erasus_hf import UnlearningConfig, UnlearningTrainer

from .testing_utils import digit_split, moving_digit_clips, pixel_rows

pytest.importorskip("sklearn.datasets", reason="scikit-learn is a dev dependency")

FORGET_DIGIT = 3


def fit(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, epochs: int, lr: float = 3e-3) -> nn.Module:
    """Plain supervised training (the "original model" unlearning starts from): AdamW, batches of 64."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(pixel_values=inputs[batch]).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(pixel_values=inputs).logits.argmax(-1) == labels).float().mean().item()


def unlearn_digit(model, inputs, labels, train, tmp_path, strategy, lr, epochs, **config):
    """Unlearn FORGET_DIGIT from `model` (in place) with `strategy` on the training split; return the trainer."""
    forget, retain = train[labels[train] == FORGET_DIGIT], train[labels[train] != FORGET_DIGIT]
    args = UnlearningConfig(
        output_dir=str(tmp_path),
        strategy=strategy,
        learning_rate=lr,
        num_train_epochs=epochs,
        per_device_train_batch_size=16,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        **config,
    )
    trainer = UnlearningTrainer(
        model,
        args,
        forget_dataset=pixel_rows(inputs, labels, forget),
        retain_dataset=pixel_rows(inputs, labels, retain),
    )
    assert trainer.model_objective.name == "classification"
    trainer.train()
    return trainer


def forget_retain_accuracy(model, inputs, labels, test) -> tuple[float, float]:
    """Test accuracy on the forgotten digit and on the nine others."""
    forget, retain = test[labels[test] == FORGET_DIGIT], test[labels[test] != FORGET_DIGIT]
    return accuracy(model, inputs[forget], labels[forget]), accuracy(model, inputs[retain], labels[retain])


# ---- ViT ----


@pytest.fixture(scope="module")
def vit_digits():
    """A tiny ViT (grey digits upsampled to 16x16, 4x4 patches, hidden 32, 2 layers) trained on 1400 digits; its
    config and state dict."""
    from transformers import ViTConfig, ViTForImageClassification

    images, labels, train, test = digit_split()
    inputs = nn.functional.interpolate(images[:, None], size=16, mode="bilinear")  # [N, 1, 16, 16]
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = fit(ViTForImageClassification(config), inputs[train], labels[train], epochs=25)
    return config, {k: v.clone() for k, v in model.state_dict().items()}, inputs, labels, train, test


def fresh_vit(vit_digits):
    from transformers import ViTForImageClassification

    config, state, *_ = vit_digits
    model = ViTForImageClassification(config)
    model.load_state_dict(state)
    return model


# NPO with beta = 1 (the paper's TOFU setting is 0.1): its weight sigmoid(beta * log-ratio) fades once a forget
# example's label is unlikely, so unlearning stops by itself. Gradient ascent (GradDiff) has no such brake: on these
# tiny classifiers the window between "the digit is still recognised" and "the other digits suffer" is a few steps.
NPO = {"beta": 1.0}


def test_vit_unlearns_one_digit(vit_digits, tmp_path):
    _, _, inputs, labels, train, test = vit_digits
    model = fresh_vit(vit_digits)
    before_forget, before_retain = forget_retain_accuracy(model, inputs, labels, test)
    # learned (chance is 0.1): retain 0.91 on most x86 machines, 0.881 on an AMX Xeon with the same pinned kernels
    assert before_forget > 0.8 and before_retain > 0.85, (before_forget, before_retain)
    unlearn_digit(model, inputs, labels, train, tmp_path, "npo", 1e-3, 3, strategy_kwargs=NPO)
    after_forget, after_retain = forget_retain_accuracy(model, inputs, labels, test)
    print(
        f"ViT npo: forget {before_forget:.3f} -> {after_forget:.3f}, retain {before_retain:.3f} -> {after_retain:.3f}"
    )
    assert after_forget <= 0.10, (before_forget, after_forget)
    assert after_retain >= before_retain - 0.05, (before_retain, after_retain)


def test_vit_lora_trains_the_adapter_only(vit_digits, tmp_path):
    _, _, inputs, labels, train, test = vit_digits
    model = fresh_vit(vit_digits)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before_forget, before_retain = forget_retain_accuracy(model, inputs, labels, test)
    trainer = unlearn_digit(model, inputs, labels, train, tmp_path, "npo", 3e-3, 3, use_peft=True, strategy_kwargs=NPO)
    peft_model = trainer.model
    adapter = {k: v for k, v in peft_model.named_parameters() if "lora_" in k}
    assert adapter and all(p.requires_grad for p in adapter.values())
    assert any(k.endswith("lora_B.default.weight") and p.abs().max() > 0 for k, p in adapter.items()), (
        "LoRA B starts at zero: a non-zero B means the adapter was trained"
    )
    # the base weights are exactly the starting ones (LoRA adds a delta beside them)
    base_now = peft_model.get_base_model().state_dict()
    for name, value in base.items():
        key = next(k for k in base_now if k.replace(".base_layer", "") == name)
        assert torch.equal(base_now[key], value), name
    after_forget, after_retain = forget_retain_accuracy(peft_model, inputs, labels, test)
    print(
        f"ViT LoRA: forget {before_forget:.3f} -> {after_forget:.3f}, retain {before_retain:.3f} -> {after_retain:.3f}"
    )
    assert after_forget <= 0.10, (before_forget, after_forget)
    assert after_retain >= before_retain - 0.05, (before_retain, after_retain)
    with peft_model.disable_adapter():  # adapter off is the original model
        assert forget_retain_accuracy(peft_model, inputs, labels, test) == (before_forget, before_retain)


# ---- VideoMAE ----


@pytest.fixture(scope="module")
def videomae_digits():
    """A tiny VideoMAE classifier (4 frames of 16x16, tubelet 2, 4x4 patches, hidden 32, 2 layers) trained on the
    moving-digit clips of 1400 digits."""
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    images, labels, train, test = digit_split()
    clips = moving_digit_clips(images)
    torch.manual_seed(0)
    config = VideoMAEConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = fit(VideoMAEForVideoClassification(config), clips[train], labels[train], epochs=8)
    return model, clips, labels, train, test


def test_videomae_unlearns_one_digit(videomae_digits, tmp_path):
    model, clips, labels, train, test = videomae_digits
    before_forget, before_retain = forget_retain_accuracy(model, clips, labels, test)
    assert before_forget > 0.7 and before_retain > 0.85, (before_forget, before_retain)
    unlearn_digit(model, clips, labels, train, tmp_path, "npo", 1e-3, 3, strategy_kwargs=NPO)
    after_forget, after_retain = forget_retain_accuracy(model, clips, labels, test)
    print(
        f"VideoMAE: forget {before_forget:.3f} -> {after_forget:.3f}, retain {before_retain:.3f} -> {after_retain:.3f}"
    )
    assert after_forget <= 0.10, (before_forget, after_forget)
    assert after_retain >= before_retain - 0.05, (before_retain, after_retain)
