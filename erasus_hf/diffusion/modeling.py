"""A tiny class-conditional text-to-image model of real handwritten digits, built from real diffusers and
transformers classes: a word-level tokenizer, a `CLIPTextModel` from a `CLIPTextConfig`, a pixel-space
`UNet2DConditionModel` with cross-attention on the prompt embeddings, and a `DDPMScheduler`. Prompts read
"a handwritten digit three"; erasing a digit is the concept-erasure task of the tests and the benchmark.

Images are `sklearn.datasets.load_digits` (1,797 real 8x8 digits), upsampled to 16x16 and scaled to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .objective import DiffusionObjective

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def digit_prompt(digit: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[digit]}"


def load_digit_images(size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, size, size] in [-1, 1], labels [N]) from scikit-learn's real handwritten digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images * 2 - 1, torch.tensor(data.target)


def build_tokenizer(max_length: int = 8):
    """A word-level fast tokenizer (BOS prompt EOS, padded with <pad>) over the digit prompts' words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["a", "handwritten", "digit", "photo", "of", *DIGIT_NAMES]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def build_text_encoder(tokenizer, hidden_size: int = 32, seed: int = 0):
    """A small random `CLIPTextModel` (frozen, like Stable Diffusion's): a deterministic embedding of each prompt."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval().requires_grad_(False)


def build_unet(cross_attention_dim: int = 32, size: int = 16, channels: Sequence[int] = (16, 32), seed: int = 0):
    """A pixel-space UNet2DConditionModel: a plain ResNet block at full resolution, cross-attention (attn1 self,
    attn2 on the prompt) at half resolution and in the middle block."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)


@dataclass
class DigitTextToImage:
    """The pieces of the digit model: the UNet to erase from, and the objective (text encoder, tokenizer,
    scheduler) that trains and samples it."""

    unet: nn.Module
    objective: DiffusionObjective


def build_digit_model(
    seed: int = 0, size: int = 16, channels: Sequence[int] = (16, 32), prediction_type: str = "epsilon"
) -> DigitTextToImage:
    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, seed=seed)
    unet = build_unet(text_encoder.config.hidden_size, size=size, channels=channels, seed=seed)
    return DigitTextToImage(unet, DiffusionObjective(text_encoder, tokenizer, build_scheduler(prediction_type)))


def train_digit_model(
    model: DigitTextToImage,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    uncond_probability: float = 0.1,
    seed: int = 0,
) -> list[float]:
    """Train the UNet and the text encoder together with the standard denoising loss on (image, "a handwritten
    digit {name}") pairs (there is no pre-trained text encoder here; afterwards it is frozen again, as in Stable
    Diffusion); the prompt is dropped to "" with `uncond_probability` so classifier-free guidance can sample.
    Returns the loss history."""
    objective, unet = model.objective, model.unet
    text_encoder = objective.text_encoder
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompts = [digit_prompt(int(d)) for d in labels]
    ids = objective.collator.tokenize_prompts(prompts)
    null_ids = objective.collator.tokenize_prompts([""])
    text_encoder.requires_grad_(True).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    unet.train()
    history = []
    for _ in range(steps):
        index = torch.randint(0, len(labels), (batch_size,), generator=generator)
        batch_ids = ids[index].clone()
        drop = torch.rand(batch_size, generator=generator) < uncond_probability
        batch_ids[drop] = null_ids
        embeddings = text_encoder(batch_ids)[0]
        losses, _ = objective.denoising_losses(unet, {"pixel_values": images[index]}, embeddings=embeddings)
        loss = losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    unet.eval()
    text_encoder.requires_grad_(False).eval()
    objective._null = None  # the empty prompt's embedding changed with the encoder
    return history


class DigitClassifier(nn.Module):
    """A small CNN that reads 16x16 digits in [-1, 1]: the judge of what the diffusion model draws."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * (size // 4) ** 2, 10),
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.net(pixel_values)


def train_digit_classifier(
    images: torch.Tensor, labels: torch.Tensor, steps: int = 400, seed: int = 0
) -> DigitClassifier:
    """Train the judge on real digits (Adam, batch 128, light pixel noise for robustness to samples)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = DigitClassifier(images.shape[-1])
    optimizer = torch.optim.Adam(classifier.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(labels), (128,), generator=generator)
        x = images[index] + 0.1 * torch.randn(images[index].shape, generator=generator)
        loss = F.cross_entropy(classifier(x), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval()
