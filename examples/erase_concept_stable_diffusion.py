"""Erase a concept from a Stable Diffusion pipeline with ESD (or another diffusion strategy) and a LoRA adapter.

    python examples/erase_concept_stable_diffusion.py --model CompVis/stable-diffusion-v1-4 \
        --concept "Van Gogh" --output_dir esd-van-gogh --variant esd-x --max_steps 1000

What it does:

1. `StableDiffusionPipeline.from_pretrained(model)` loads the pipeline (a Hub id or a local folder).
2. `DiffusionObjective.from_pipeline(pipe)` takes its text encoder, tokenizer, VAE and scheduler config.
3. `UnlearningTrainer` trains the UNet with the chosen strategy. With `--lora_r > 0` the UNet gets a diffusers LoRA
   adapter (`unet.add_adapter`) and ESD's frozen original is the same UNet with its adapter disabled: one UNet in
   memory.
4. `trainer.save_model()` writes only the LoRA (`pytorch_lora_weights.safetensors`, diffusers' format) or only the
   trained UNet tensors (`unet_erased.safetensors`).
5. A fresh pipeline loads it with `erasus_hf.diffusion.load_erasure` (for a LoRA that is `pipe.load_lora_weights`),
   and generates from the concept's prompt.

ESD's published defaults are learning rate 1e-5, 1000 steps of batch 1, eta 1 and 50 DDIM steps.
"""

from __future__ import annotations

import argparse

import torch

from erasus_hf import UnlearningConfig, UnlearningTrainer
from erasus_hf.diffusion import DiffusionObjective, load_erasure


def erase_concept(
    model: str,
    concept: str,
    output_dir: str,
    strategy: str = "esd",
    strategy_kwargs: dict | None = None,
    lora_r: int = 4,
    learning_rate: float = 1e-5,
    max_steps: int = 1000,
    seed: int = 0,
):
    """Erase `concept` from the pipeline at `model`, save the erasure to `output_dir`, and return a freshly loaded
    pipeline with the erasure applied."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe.to(device)
    args = UnlearningConfig(
        output_dir=output_dir,
        strategy=strategy,
        strategy_kwargs=strategy_kwargs or ({"variant": "esd-x"} if strategy == "esd" else {}),
        use_peft=lora_r > 0,
        lora_r=max(lora_r, 1),
        lora_alpha=max(lora_r, 1),
        learning_rate=learning_rate,
        max_steps=max_steps,
        per_device_train_batch_size=1,
        lr_scheduler_type="constant",
        retain_loss="none",
        save_strategy="no",
        report_to="none",
        seed=seed,
    )
    trainer = UnlearningTrainer(
        pipe.unet,
        args,
        forget_dataset=[{"prompt": concept}],
        objective=DiffusionObjective.from_pipeline(pipe),
    )
    trainer.train()
    trainer.save_model()

    erased = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    return load_erasure(erased.to(device), output_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A Stable Diffusion pipeline: Hub id or local folder.")
    parser.add_argument("--concept", required=True, help="The prompt of the concept to erase.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--strategy", default="esd", help="esd | concept_ablation | diffusion_salun | uce")
    parser.add_argument("--variant", default="esd-x", help="ESD variant: esd-x, esd-u, esd-x-strict, esd-all")
    parser.add_argument("--lora_r", type=int, default=4, help="LoRA rank on the UNet; 0 trains the UNet itself.")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--max_steps", type=int, default=1000)
    parser.add_argument("--sample", default=None, help="Save one image of the concept's prompt here (PNG).")
    args = parser.parse_args()
    kwargs = {"variant": args.variant} if args.strategy == "esd" else {}
    pipe = erase_concept(
        args.model,
        args.concept,
        args.output_dir,
        args.strategy,
        kwargs,
        args.lora_r,
        args.learning_rate,
        args.max_steps,
    )
    if args.sample:
        pipe(args.concept, generator=torch.Generator().manual_seed(0)).images[0].save(args.sample)


if __name__ == "__main__":
    main()
