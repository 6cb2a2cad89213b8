"""The example: erase a concept from a `StableDiffusionPipeline` loaded with `from_pretrained` (a tiny pipeline saved
locally with `save_pretrained`), save the LoRA, and load it back into a fresh pipeline."""

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusion strategies need diffusers")

from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402

from erasus_hf.diffusion import DiffusionObjective  # noqa: E402
from erasus_hf.diffusion.modeling import build_text_encoder, build_tokenizer  # noqa: E402

from .testing_utils import load_example  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pipeline_path(tmp_path_factory):
    """A tiny latent Stable Diffusion pipeline (random weights) saved the way a Hub pipeline is laid out."""
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(path)
    return str(path)


@torch.no_grad()
def unet_output(pipe, prompt="a photo of three"):
    objective = DiffusionObjective.from_pipeline(pipe)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return objective.predict(pipe.unet.eval(), x, torch.tensor([400]), objective.embed([prompt]))


def test_example_erases_with_lora_and_loads_into_a_fresh_pipeline(tiny_pipeline_path, tmp_path):
    example = load_example("erase_concept_stable_diffusion")
    original = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    erased = example.erase_concept(
        tiny_pipeline_path,
        "a photo of three",
        str(tmp_path),
        strategy_kwargs={"variant": "esd-x", "num_inference_steps": 2},
        learning_rate=1e-2,
        max_steps=3,
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))  # safetensors only
    # the LoRA is loaded (diffusers' own loader) and changes the UNet's prediction for the concept
    assert getattr(erased.unet, "_hf_peft_config_loaded", False)
    assert not torch.allclose(unet_output(erased), unet_output(original), atol=1e-5)
    image = erased("a photo of three", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_objective_from_pipeline_encodes_images_through_the_vae(tiny_pipeline_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_path)
    objective = DiffusionObjective.from_pipeline(pipe)
    assert isinstance(objective.sampling_scheduler, DDIMScheduler)
    batch = objective.collator([{"prompt": "a photo of three", "pixel_values": torch.zeros(3, 16, 16)}])
    torch.manual_seed(0)
    latents = objective.encode_images(batch["pixel_values"])
    assert latents.shape == (1, 4, 8, 8)
    torch.manual_seed(0)
    expected = pipe.vae.encode(batch["pixel_values"]).latent_dist.sample() * pipe.vae.config.scaling_factor
    assert torch.allclose(latents, expected)
