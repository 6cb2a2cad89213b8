"""The diffusion objective: noise prediction of a `UNet2DConditionModel` conditioned on prompt embeddings.

Training quantities follow diffusers' `examples/text_to_image/train_text_to_image.py`: latents are the VAE's
`latent_dist.sample() * scaling_factor` (or the pixels themselves for a pixel-space model), timesteps are uniform
over `num_train_timesteps`, `noisy = scheduler.add_noise(latents, noise, t)`, and the target is `noise`
(`prediction_type="epsilon"`) or `scheduler.get_velocity(latents, noise, t)` (`"v_prediction"`); the loss is the
mean squared error between the UNet's output and the target.

A batch side holds `input_ids` (the tokenized prompts, see `PromptCollator`), optionally `pixel_values` (images in
[-1, 1], [B, C, H, W]) and, for Concept Ablation, `anchor_input_ids`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..objectives.base import Objective, Scores
from ..reference import Reference, eval_mode
from .lora import adapters_disabled, has_lora, is_diffusion_unet
from .saving import save_erasure

PROMPT_KEYS = {"prompt": "input_ids", "anchor_prompt": "anchor_input_ids"}
PREDICTION_TYPES = ("epsilon", "v_prediction")


class UNetReference(Reference):
    """The frozen starting UNet: the same UNet with its LoRA adapter off (mode "adapter", no second UNet in memory)
    or a frozen copy (mode "copy"). `with reference.frozen() as unet:` runs without gradients, in eval mode."""

    def __init__(self, unet: nn.Module, mode: str, context: Callable[[], contextlib.AbstractContextManager]) -> None:
        self.unet = unet
        self.mode = mode
        self._context = context

    @contextlib.contextmanager
    def frozen(self) -> Iterator[nn.Module]:
        with torch.no_grad(), self._context(), eval_mode(self.unet):
            yield self.unet


class PromptCollator:
    """Tokenize the prompts of one batch side (`prompt` -> `input_ids`, `anchor_prompt` -> `anchor_input_ids`,
    padded to the tokenizer's `model_max_length` as `StableDiffusionPipeline.encode_prompt` does) and stack the
    other numeric fields (`pixel_values`, `index`)."""

    def __init__(self, tokenizer: Any, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length or tokenizer.model_max_length

    def encode_text(self, prompts: Sequence[str]) -> Any:
        """The tokenizer's full output for `prompts` (`input_ids` and, for most tokenizers, `attention_mask`)."""
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )

    def tokenize_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        # (not named `tokenize`: the trainer pre-tokenizes rows with a collator's `tokenize`; prompts stay text)
        return self.encode_text(prompts).input_ids

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "prompt" not in examples[0]:
            raise ValueError(f"Diffusion rows need a 'prompt'; got the keys {sorted(examples[0])}.")
        batch: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            values = [e[key] for e in examples]
            if key in PROMPT_KEYS:
                batch[PROMPT_KEYS[key]] = self.tokenize_prompts(values)
            elif isinstance(values[0], str):
                continue  # other text (a concept name, a caption kept for the record) is not a model input
            else:
                dtype = torch.long if key == "index" else torch.float32
                batch[key] = torch.stack([torch.as_tensor(v, dtype=dtype) for v in values])
        return batch


class DiffusionObjective(Objective):
    """Score a `UNet2DConditionModel` by its denoising loss.

    Args:
        text_encoder: the frozen prompt encoder (e.g. `CLIPTextModel`); `text_encoder(input_ids)[0]` are the
            embeddings the UNet cross-attends to.
        tokenizer: its tokenizer.
        scheduler: the training noise scheduler (`DDPMScheduler`, `DDIMScheduler`, ...; `prediction_type` comes from
            its config).
        vae: an `AutoencoderKL` for a latent model; None for a pixel-space model.
        sampling_scheduler: the scheduler that generates (default: a `DDIMScheduler` from the same config).

    `score` returns the per-example denoising MSE as a one-"token" negative log-likelihood (`mean_nll`), so
    `evaluate()` reports forget and retain denoising losses and the shared retain term (`retain_loss="nll"`) is the
    standard diffusion loss on the retain prompts and images.
    """

    name = "diffusion"
    # tokenizes the prompts of every batch side; the strategies (UCE, SalUn) and the digit model's training tokenize
    # their own prompts with it, so all of them condition the UNet on the same ids
    collator: PromptCollator

    def __init__(
        self,
        text_encoder: nn.Module,
        tokenizer: Any,
        scheduler: Any,
        vae: nn.Module | None = None,
        sampling_scheduler: Any | None = None,
    ) -> None:
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unsupported prediction_type {prediction_type!r}; valid: {PREDICTION_TYPES}.")
        from diffusers import DDIMScheduler

        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.sampling_scheduler = sampling_scheduler or DDIMScheduler.from_config(scheduler.config)
        self.prediction_type = prediction_type
        self.collator = PromptCollator(tokenizer)
        self._null: torch.Tensor | None = None

    @classmethod
    def from_pipeline(cls, pipeline: Any, sampling_scheduler: Any | None = None) -> DiffusionObjective:
        """The objective of a `StableDiffusionPipeline`-style pipeline (its text encoder, tokenizer, scheduler, VAE);
        the pipeline's own scheduler generates."""
        from diffusers import DDPMScheduler

        return cls(
            pipeline.text_encoder,
            pipeline.tokenizer,
            DDPMScheduler.from_config(pipeline.scheduler.config),
            vae=getattr(pipeline, "vae", None),
            sampling_scheduler=sampling_scheduler or pipeline.scheduler,
        )

    # ---- checks ----

    def validate_model(self, model: nn.Module) -> None:
        if not is_diffusion_unet(model):
            raise ValueError(
                f"The diffusion objective trains a UNet2DConditionModel (a diffusers UNet with cross-attention), "
                f"got {type(model).__name__}."
            )
        width = getattr(self.text_encoder.config, "hidden_size", None)
        if width is not None and model.config.cross_attention_dim != width:
            raise ValueError(
                f"The UNet cross-attends to {model.config.cross_attention_dim}-dim embeddings but the text encoder "
                f"gives {width}-dim ones."
            )

    def batch_size(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0]

    # ---- building blocks ----

    @torch.no_grad()
    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T, D] prompt embeddings (the text encoder's last hidden state, as Stable Diffusion uses)."""
        self.text_encoder.to(input_ids.device)
        return self.text_encoder(input_ids)[0]

    def embed(self, prompts: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
        return self.encode_prompts(self.collator.tokenize_prompts(prompts).to(device))

    def null_embeddings(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        """The empty prompt's embeddings, the unconditional branch of classifier-free guidance."""
        if self._null is None or self._null.device != torch.device(device):
            self._null = self.embed([""], device)
        return self._null.expand(batch_size, -1, -1)

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the diffusion space: VAE latents times `scaling_factor`, or the pixels."""
        if self.vae is None:
            return pixel_values
        self.vae.to(pixel_values.device)
        return self.vae.encode(pixel_values).latent_dist.sample() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> images in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        return self.vae.decode(latents / self.vae.config.scaling_factor).sample.clamp(-1, 1)

    def predict(
        self, unet: nn.Module, sample: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output (noise or velocity) for noisy `sample` at `timesteps` under prompt `embeddings`."""
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(sample.shape[0])
        return unet(sample, timesteps.to(sample.device), encoder_hidden_states=embeddings).sample

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should output: the noise, or the velocity sqrt(abar_t) noise - sqrt(1 - abar_t) x_0."""
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(latents, noise, timesteps)

    def random_timesteps(self, batch_size: int, device: torch.device | str) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (batch_size,), device=device).long()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def denoising_losses(
        self, unet: nn.Module, batch: dict[str, torch.Tensor], embeddings: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] per-example MSE(unet(x_t, t, c), target) at random timesteps, and the prediction."""
        if "pixel_values" not in batch:
            raise ValueError("The denoising loss needs images: rows with 'pixel_values' beside their 'prompt'.")
        latents = self.encode_images(batch["pixel_values"])
        noise = torch.randn_like(latents)
        timesteps = self.random_timesteps(latents.shape[0], latents.device)
        if embeddings is None:
            embeddings = self.encode_prompts(batch["input_ids"])
        prediction = self.predict(unet, self.noisy(latents, noise, timesteps), timesteps, embeddings)
        target = self.target(latents, noise, timesteps)
        losses = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(1)
        return losses, prediction

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], hidden_layer: int | None = None) -> Scores:
        if hidden_layer is not None:
            raise ValueError("The diffusion objective has no hidden-state scores.")
        losses, prediction = self.denoising_losses(model, batch)
        mask = torch.ones(losses.shape[0], 1, dtype=torch.bool, device=losses.device)
        return Scores(token_logprobs=-losses[:, None], mask=mask, logits=prediction)

    # ---- sampling ----

    def guided(
        self, unet: nn.Module, sample: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, guidance_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance: eps(x, 0) + w (eps(x, c) - eps(x, 0)), both branches in one forward pass."""
        scheduler = self.sampling_scheduler
        model_input = scheduler.scale_model_input(sample, t)
        if guidance_scale == 1.0:
            return self.predict(unet, model_input, t, cond)
        null = self.null_embeddings(sample.shape[0], sample.device)
        both = self.predict(unet, torch.cat([model_input, model_input]), t, torch.cat([null, cond]))
        uncond, text = both.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    @torch.no_grad()
    def sample(
        self,
        unet: nn.Module,
        embeddings: torch.Tensor,
        latents: torch.Tensor,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        stop_at: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Denoise `latents` (pure noise, already scaled by `init_noise_sigma`) with the sampling scheduler.

        With `stop_at=k`, run the first k steps only and return (x_t, t) with t the k-th timestep of the schedule
        (k = 0: the starting noise at the first timestep); otherwise return (x_0, None).
        """
        scheduler = self.sampling_scheduler
        scheduler.set_timesteps(num_inference_steps, device=latents.device)
        for i, t in enumerate(scheduler.timesteps):
            if stop_at is not None and i == stop_at:
                return latents, t
            output = self.guided(unet, latents, t, embeddings, guidance_scale)
            latents = scheduler.step(output, t, latents).prev_sample
        if stop_at is not None:
            raise ValueError(f"stop_at={stop_at} is past the {num_inference_steps} sampling steps.")
        return latents, None

    def latent_shape(self, unet: nn.Module) -> tuple[int, int, int]:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (unet.config.in_channels, *size)

    def initial_latents(self, unet: nn.Module, seeds: Sequence[int], device: torch.device | str) -> torch.Tensor:
        """One starting noise per seed (drawn on the CPU, so a seed gives the same image on every device)."""
        shape = self.latent_shape(unet)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        return noise.to(device) * self.sampling_scheduler.init_noise_sigma

    @torch.no_grad()
    def generate(
        self,
        unet: nn.Module,
        prompts: Sequence[str],
        seeds: Sequence[int],
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Images in [-1, 1] for each (prompt, seed) pair, in eval mode; the same seed gives the same noise."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds.")
        device = next(unet.parameters()).device
        images = []
        with eval_mode(unet):
            for start in range(0, len(prompts), batch_size):
                chunk = slice(start, start + batch_size)
                embeddings = self.embed(prompts[chunk], device)
                latents = self.initial_latents(unet, seeds[chunk], device)
                latents, _ = self.sample(unet, embeddings, latents, num_inference_steps, guidance_scale)
                images.append(self.decode(latents).cpu())
        return torch.cat(images)

    # ---- trainer hooks: LoRA on the UNet, the frozen reference, saving ----

    def prepare_peft(self, model: nn.Module, args: Any, peft_config: Any = None) -> tuple[nn.Module, str | None, bool]:
        """Add a LoRA adapter to the UNet the diffusers way (`unet.add_adapter`, as diffusers' LoRA training
        scripts do), freezing the base weights; return (unet, adapter name, arrived with a trained adapter)."""
        if has_lora(model):
            if peft_config is not None:
                raise ValueError("The UNet already carries a LoRA adapter; pass peft_config=None to train it.")
            return model, model.active_adapters()[0], True
        if peft_config is None and args.use_peft:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                init_lora_weights="gaussian",
                target_modules=args.lora_target_modules or ["to_k", "to_q", "to_v", "to_out.0"],
            )
        if peft_config is None:
            return model, None, False
        model.requires_grad_(False)
        model.add_adapter(peft_config)
        return model, "default", False

    def build_reference(
        self, model: nn.Module, mode: str, ref_model: nn.Module | None, had_adapter: bool
    ) -> UNetReference:
        """The frozen original: the adapter-off UNet ("adapter"), or a frozen copy ("copy")."""
        if mode == "adapter":
            if had_adapter:
                raise ValueError(
                    "The UNet arrived with a trained LoRA adapter, so adapter-off is not the starting model. Fuse it "
                    "first (`pipe.fuse_lora()`, then `pipe.unload_lora_weights()`) or use reference='copy'."
                )
            return UNetReference(model, mode, lambda: adapters_disabled(model))
        if mode == "copy":
            ref_model.requires_grad_(False).eval()
            return UNetReference(ref_model.to(next(model.parameters()).device), mode, contextlib.nullcontext)
        raise ValueError(f"The diffusion strategies need the frozen UNet itself (adapter or copy), not {mode!r}.")

    def save_weights(
        self,
        model: nn.Module,
        output_dir: str,
        adapter_name: str | None,
        merge_adapter: bool,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Save what the run changed (see `erasus_hf.diffusion.saving.save_erasure`)."""
        save_erasure(model, output_dir)
