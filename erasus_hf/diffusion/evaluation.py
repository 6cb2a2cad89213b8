"""Concept-erasure evaluation: generate images for forget and retain prompts with fixed seeds and score them with a
supplied classifier (and, when given, a CLIP model's image-text similarity)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..evaluation.result import EvaluationResult

Generate = Callable[[list[str], list[int]], torch.Tensor]


def pipeline_generator(
    pipeline: Any, num_inference_steps: int = 50, guidance_scale: float = 7.5, batch_size: int = 16
) -> Generate:
    """Images in [-1, 1] from a `StableDiffusionPipeline`-style pipeline, one torch.Generator seed per image."""

    @torch.no_grad()
    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = slice(start, start + batch_size)
            images = pipeline(
                prompts[chunk],
                generator=[torch.Generator().manual_seed(int(s)) for s in seeds[chunk]],
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                output_type="pt",
            ).images
            out.append(images.cpu() * 2 - 1)
        return torch.cat(out)

    return generate


def unet_generator(
    objective: Any, unet: nn.Module, num_inference_steps: int = 50, guidance_scale: float = 7.5
) -> Generate:
    """Images in [-1, 1] from a UNet through its `DiffusionObjective` (pixel-space models need no pipeline)."""

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return objective.generate(unet, prompts, seeds, num_inference_steps, guidance_scale)

    return generate


class ConceptErasureEvaluator:
    """Erased-concept detection rate and retain-concept accuracy of generated images.

    Args:
        classifier: maps images [N, C, H, W] in [-1, 1] (after `preprocess`) to class logits.
        forget_prompts: {prompt: class id of the erased concept}; "detected" = the classifier's top class is it.
        retain_prompts: {prompt: class id}; accuracy = the top class is the prompt's class.
        seeds: one image per (prompt, seed); the same seeds before and after erasure.
        clip_model, clip_processor: optional `CLIPModel` and its processor; adds the mean cosine similarity between
            each image and its prompt (`clip_forget_similarity`, `clip_retain_similarity`).
        preprocess: images -> classifier input (default: identity).

    `evaluate(generate)` takes a function (prompts, seeds) -> images in [-1, 1] (`pipeline_generator`,
    `unet_generator`) and returns an `EvaluationResult` with `concept_erasure/forget_detection_rate`,
    `concept_erasure/retain_accuracy`, one entry per prompt, and the CLIP similarities when a CLIP model is given.
    `compare(before, after)` puts two results side by side.
    """

    name = "concept_erasure"

    def __init__(
        self,
        classifier: nn.Module,
        forget_prompts: dict[str, int],
        retain_prompts: dict[str, int],
        seeds: Sequence[int],
        clip_model: nn.Module | None = None,
        clip_processor: Any | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if not forget_prompts:
            raise ValueError("ConceptErasureEvaluator needs at least one forget prompt.")
        if not seeds:
            raise ValueError("ConceptErasureEvaluator needs at least one seed.")
        if (clip_model is None) != (clip_processor is None):
            raise ValueError("Pass both clip_model and clip_processor, or neither.")
        self.classifier = classifier
        self.forget_prompts = dict(forget_prompts)
        self.retain_prompts = dict(retain_prompts)
        self.seeds = [int(s) for s in seeds]
        self.clip_model = clip_model
        self.clip_processor = clip_processor
        self.preprocess = preprocess or (lambda images: images)

    @torch.no_grad()
    def predictions(self, images: torch.Tensor) -> torch.Tensor:
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            return self.classifier(self.preprocess(images)).argmax(-1).cpu()
        finally:
            self.classifier.train(was_training)

    @torch.no_grad()
    def clip_similarity(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[N] cosine similarity between each image's and its prompt's CLIP embedding."""
        pixels = ((images + 1) / 2).clamp(0, 1)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        inputs = self.clip_processor(
            text=prompts, images=list(pixels), return_tensors="pt", padding=True, do_rescale=False
        )
        image_features = self.clip_model.get_image_features(pixel_values=inputs["pixel_values"])
        text_features = self.clip_model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
        )
        image_features = getattr(image_features, "pooler_output", image_features)
        text_features = getattr(text_features, "pooler_output", text_features)
        return torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)

    def evaluate(self, generate: Generate) -> EvaluationResult:
        result = EvaluationResult(
            meta={"seeds": self.seeds, "forget_prompts": self.forget_prompts, "retain_prompts": self.retain_prompts}
        )
        for side, prompts in (("forget", self.forget_prompts), ("retain", self.retain_prompts)):
            if not prompts:
                continue
            names = [p for p in prompts for _ in self.seeds]
            images = generate(names, self.seeds * len(prompts))
            if images.shape[0] != len(names):
                raise ValueError(f"generate returned {images.shape[0]} images for {len(names)} (prompt, seed) pairs.")
            hits = (self.predictions(images) == torch.tensor([prompts[p] for p in names])).float()
            key = "detection_rate" if side == "forget" else "accuracy"
            result.summary[f"concept_erasure/{side}_{key}"] = hits.mean().item()
            per_prompt = hits.view(len(prompts), len(self.seeds)).mean(1).tolist()
            result.per_example[f"concept_erasure/{side}_{key}"] = per_prompt
            if self.clip_model is not None:
                similarity = self.clip_similarity(images, names)
                result.summary[f"concept_erasure/clip_{side}_similarity"] = similarity.mean().item()
                result.per_example[f"concept_erasure/clip_{side}_similarity"] = similarity.tolist()
        return result

    @staticmethod
    def compare(before: EvaluationResult, after: EvaluationResult) -> dict[str, dict[str, float]]:
        """{metric: {"before": x, "after": y}} for the metrics both results have."""
        return {
            k: {"before": before.summary[k], "after": after.summary[k]} for k in before.summary if k in after.summary
        }
