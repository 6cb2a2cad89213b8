"""Concept erasure for diffusers text-to-image models: the diffusion objective, the ESD / UCE / Concept Ablation /
SalUn strategies (registered as "esd", "uce", "concept_ablation", "diffusion_salun"), saving and loading into a
pipeline, and the concept-erasure evaluator. diffusers is imported only where it is used."""

from .concept_ablation import ConceptAblation
from .esd import ESD, ESD_VARIANTS, esd_target
from .evaluation import ConceptErasureEvaluator, pipeline_generator, unet_generator
from .lora import adapters_disabled, has_lora, is_diffusion_unet
from .objective import DiffusionObjective, PromptCollator, UNetReference
from .salun import DiffusionSalUn, saliency_masks
from .saving import load_erasure, save_erasure
from .uce import UCE, uce_edit

__all__ = [
    "ESD",
    "ESD_VARIANTS",
    "UCE",
    "ConceptAblation",
    "ConceptErasureEvaluator",
    "DiffusionObjective",
    "DiffusionSalUn",
    "PromptCollator",
    "UNetReference",
    "adapters_disabled",
    "esd_target",
    "has_lora",
    "is_diffusion_unet",
    "load_erasure",
    "pipeline_generator",
    "saliency_masks",
    "save_erasure",
    "uce_edit",
    "unet_generator",
]
