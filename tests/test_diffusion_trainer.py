"""Diffusion strategies through `UnlearningTrainer`: LoRA on the UNet with the adapter-off UNet as the frozen
original (one UNet in memory), trained-parameter choice, saving and loading, and bad input."""

import gc
import warnings

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion strategies need diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402

from erasus_hf import UnlearningConfig, UnlearningTrainer  # noqa: E402
from erasus_hf.diffusion import load_erasure  # noqa: E402
from erasus_hf.diffusion.modeling import build_digit_model, digit_prompt  # noqa: E402


def config(tmp_path, strategy, kwargs=None, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        strategy=strategy,
        strategy_kwargs=kwargs,
        learning_rate=1e-2,
        max_steps=2,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        retain_loss="none",
        seed=0,
    )
    values.update(overrides)
    return UnlearningConfig(**values)


def prompts(*digits, images=False):
    rows = [{"prompt": digit_prompt(d)} for d in digits]
    if images:
        generator = torch.Generator().manual_seed(0)
        for row in rows:
            row["pixel_values"] = torch.rand(1, 16, 16, generator=generator) * 2 - 1
    return rows


def count_unets() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch module objects warns about deprecated names
        warnings.simplefilter("ignore")
        return sum(isinstance(o, UNet2DConditionModel) for o in gc.get_objects())


@torch.no_grad()
def outputs(unet, objective, digit=3):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 16, 16, generator=generator)
    return objective.predict(unet.eval(), x, torch.tensor([500, 100]), objective.embed([digit_prompt(digit)] * 2))


def test_esd_with_lora_keeps_one_unet_and_a_frozen_adapter_off_original(tmp_path):
    model = build_digit_model()
    unet, objective = model.unet, model.objective
    original = outputs(unet, objective)
    before = count_unets()
    trainer = UnlearningTrainer(
        unet,
        config(tmp_path, "esd", {"variant": "esd-x", "num_inference_steps": 2}, use_peft=True, lora_r=4),
        forget_dataset=prompts(3, 3, 3, 3),
        objective=objective,
    )
    assert trainer.reference_mode == "adapter"
    assert trainer.reference.unet is trainer.model  # the adapter-off UNet is the frozen original
    assert count_unets() == before  # no second UNet
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("attn2" in n and "lora_" in n for n in trainable)
    trainer.train()
    # disabling/enabling the adapter for the reference did not make the other LoRA matrices trainable
    assert [n for n, p in unet.named_parameters() if p.requires_grad] == trainable
    with trainer.reference.frozen() as frozen:
        assert torch.allclose(outputs(frozen, objective), original, atol=1e-6)
    assert not torch.allclose(outputs(unet, objective), original, atol=1e-4)  # the adapter moved

    trainer.save_model()
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    fresh = build_digit_model().unet
    load_erasure(fresh, str(tmp_path))
    assert torch.allclose(outputs(fresh, objective), outputs(unet, objective), atol=1e-5)


def test_esd_without_lora_keeps_a_frozen_copy_and_saves_only_trained_tensors(tmp_path):
    model = build_digit_model()
    unet, objective = model.unet, model.objective
    original = outputs(unet, objective)
    before = count_unets()
    trainer = UnlearningTrainer(
        unet,
        config(tmp_path, "esd", {"variant": "esd-x-strict", "num_inference_steps": 2}),
        forget_dataset=prompts(3, 3),
        objective=objective,
    )
    assert trainer.reference_mode == "copy" and count_unets() == before + 1
    trainer.train()
    with trainer.reference.frozen() as frozen:
        assert torch.allclose(outputs(frozen, objective), original, atol=1e-6)
    trainer.save_model()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "unet_erased.safetensors"))
    assert saved and all("attn2.to_k" in k or "attn2.to_v" in k for k in saved)
    fresh = build_digit_model().unet
    load_erasure(fresh, str(tmp_path))
    assert torch.allclose(outputs(fresh, objective), outputs(unet, objective), atol=1e-6)
    assert not torch.allclose(outputs(fresh, objective), original, atol=1e-4)


@pytest.mark.parametrize(
    ("variant", "inside", "outside"),
    [("esd-u", None, "attn2"), ("esd-all", None, None), ("esd-x", "attn2", None)],
)
def test_esd_variants_choose_their_parameters(tmp_path, variant, inside, outside):
    model = build_digit_model()
    UnlearningTrainer(
        model.unet,
        config(tmp_path, "esd", {"variant": variant}),
        forget_dataset=prompts(3),
        objective=model.objective,
    )
    names = [n for n, p in model.unet.named_parameters() if p.requires_grad]
    assert names
    assert all(inside in n for n in names) if inside else True
    assert not any(outside in n for n in names) if outside else True
    assert not any("norm" in n for n in names)  # linear / conv layers only


def test_uce_with_lora_and_salun_without_pseudo_prompts_fail_clearly(tmp_path):
    model = build_digit_model()
    with pytest.raises(ValueError, match="without a LoRA adapter"):
        UnlearningTrainer(
            model.unet,
            config(tmp_path, "uce", use_peft=True),
            forget_dataset=prompts(3),
            objective=model.objective,
        )
    model = build_digit_model()
    trainer = UnlearningTrainer(
        model.unet,
        config(tmp_path, "diffusion_salun"),
        forget_dataset=prompts(3, images=True),
        objective=model.objective,
    )
    with pytest.raises(ValueError, match="pseudo_prompts"):
        trainer.train()


def test_retain_needing_strategy_without_retain_set_and_kl_fail(tmp_path):
    model = build_digit_model()
    with pytest.raises(ValueError, match="needs a retain_dataset"):
        UnlearningTrainer(
            model.unet,
            config(tmp_path, "concept_ablation", retain_loss="nll"),
            forget_dataset=prompts(3),
            objective=model.objective,
        )
    with pytest.raises(ValueError, match="diffusion UNet"):
        UnlearningTrainer(model.unet, config(tmp_path, "esd"), forget_dataset=prompts(3))
    with pytest.raises(ValueError, match="serves"):
        UnlearningTrainer(model.unet, config(tmp_path, "npo"), forget_dataset=prompts(3), objective=model.objective)


def test_uce_edit_maps_the_concept_to_the_guide_and_keeps_preserved_concepts(tmp_path):
    """With large scales, the edited key/value of the erased concept lands on the guide's (under the old weights)
    and the preserved concepts' keys/values stay, within 5% of the concept-guide gap (the digit tokens are nearly
    collinear, cosine ~0.9, so lambda still leaves a small residual)."""
    model = build_digit_model()
    unet, objective = model.unet, model.objective
    old = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    trainer = UnlearningTrainer(
        unet,
        config(
            tmp_path, "uce", {"token_window": "last", "erase_scale": 1e4, "preserve_scale": 1e4}, retain_loss="nll"
        ),
        forget_dataset=prompts(3),
        retain_dataset=prompts(1, 7),
        objective=objective,
    )
    trainer.train()
    from erasus_hf.diffusion.uce import concept_token_embeddings

    c = concept_token_embeddings(objective, [digit_prompt(3)], "last", "cpu")[0][0]
    g = concept_token_embeddings(objective, [""], "last", "cpu")[0][0]
    keep = concept_token_embeddings(objective, [digit_prompt(1)], "last", "cpu")[0][0]
    modules = dict(unet.named_modules())
    for name, w_old in old.items():
        w_new = modules[name].weight.detach()
        gap = (w_old @ c - w_old @ g).norm()  # how far the concept's key/value was from the guide's
        assert (w_new @ c - w_old @ g).norm() < 0.05 * gap, name
        assert (w_new @ keep - w_old @ keep).norm() < 0.05 * gap, name
    trainer.save_model()
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "unet_erased.safetensors"))) == {f"{n}.weight" for n in old}


def test_salun_updates_only_the_salient_weights(tmp_path):
    model = build_digit_model()
    unet = model.unet
    old = {n: p.detach().clone() for n, p in unet.named_parameters()}
    trainer = UnlearningTrainer(
        unet,
        config(tmp_path, "diffusion_salun", {"mask_fraction": 0.3}, retain_loss="nll"),
        forget_dataset=prompts(3, 3, images=True),
        retain_dataset=prompts(1, 7, images=True),
        objective=model.objective,
    )
    trainer.train()
    masks = trainer.strategy.masks
    kept = sum(float(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert kept == pytest.approx(0.3, abs=1e-3)
    moved_inside = 0
    for name, param in unet.named_parameters():
        delta = (param.detach() - old[name]).abs()
        assert float(delta[masks[name] == 0].sum()) == 0.0, name  # outside the mask: untouched
        moved_inside += int((delta[masks[name] == 1] > 0).sum())
    assert moved_inside > 0
    assert trainer.strategy._hooks == []  # the gradient masks are removed after training


def test_the_erasus_front_door_erases_with_a_diffusion_objective(tmp_path):
    from erasus_hf import ErasusUnlearner

    model = build_digit_model()
    unet, objective = model.unet, model.objective
    original = outputs(unet, objective)
    unlearner = ErasusUnlearner(
        unet, strategy="esd", objective=objective, use_peft=True, lora_r=4, output_dir=str(tmp_path),
        strategy_kwargs={"variant": "esd-x", "num_inference_steps": 2}, learning_rate=1e-2, max_steps=2,
        per_device_train_batch_size=2, retain_loss="none", report_to="none", disable_tqdm=True,
    )  # fmt: skip
    result = unlearner.fit(prompts(3, 3))
    assert result.trainer.reference_mode == "adapter"
    assert len(result.forget_loss_history) == 2
    assert not torch.allclose(outputs(result.model, objective), original, atol=1e-4)  # the adapter moved
