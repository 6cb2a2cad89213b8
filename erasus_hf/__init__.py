"""erasus_hf: machine unlearning as a native extension of the Hugging Face stack."""

from . import diffusion  # noqa: F401  registers the concept-erasure strategies; diffusers is imported when used
from .certified import CertifiedRemover
from .config import UnlearningConfig
from .data.formats import TextFormat
from .data.muse import MUSEDataset
from .data.tofu import TOFUDataset
from .evaluation import EvaluationResult, MetricSuite, UnlearningEarlyStoppingCallback
from .objectives import CausalLMObjective, ClassificationObjective, Objective, Scores, get_objective
from .pipeline import StrategyPipeline  # registers the "pipeline" strategy (it imports the trainer it drives)
from .strategies import STRATEGIES, Strategy, get_strategy, register_strategy
from .trainer import UnlearningTrainer
from .unlearner import ErasusUnlearner, UnlearningResult
from .verification import UnlearningVerifier

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "CausalLMObjective",
    "CertifiedRemover",
    "ClassificationObjective",
    "ErasusUnlearner",
    "EvaluationResult",
    "MUSEDataset",
    "MetricSuite",
    "Objective",
    "Scores",
    "Strategy",
    "StrategyPipeline",
    "TOFUDataset",
    "TextFormat",
    "UnlearningConfig",
    "UnlearningEarlyStoppingCallback",
    "UnlearningResult",
    "UnlearningTrainer",
    "UnlearningVerifier",
    "get_objective",
    "get_strategy",
    "register_strategy",
]
