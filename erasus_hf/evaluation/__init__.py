"""Evaluation: TOFU, MUSE, membership inference, memorization and robustness checks, run alone or as a
`MetricSuite`, after training or inside it (`UnlearningTrainer(..., evaluators=...)`)."""

from .callbacks import UnlearningEarlyStoppingCallback
from .likelihood import answer_nll, truth_ratio, truth_ratio_score
from .memorization import MemorizationEvaluator, exact_memorization, extraction_strength
from .mia import MIAEvaluator, auc, min_k_plus_plus_score, min_k_score
from .muse import MUSEEvaluator
from .result import EvaluationResult
from .robustness import QuantizationEvaluator, RelearningEvaluator, quantized_copy, relearning_attack
from .suite import EVALUATORS, Evaluator, MetricSuite
from .tofu import TOFUEvaluator, forget_quality

__all__ = [
    "EVALUATORS",
    "EvaluationResult",
    "Evaluator",
    "MIAEvaluator",
    "MUSEEvaluator",
    "MemorizationEvaluator",
    "MetricSuite",
    "QuantizationEvaluator",
    "RelearningEvaluator",
    "TOFUEvaluator",
    "UnlearningEarlyStoppingCallback",
    "answer_nll",
    "auc",
    "exact_memorization",
    "extraction_strength",
    "forget_quality",
    "min_k_plus_plus_score",
    "min_k_score",
    "quantized_copy",
    "relearning_attack",
    "truth_ratio",
    "truth_ratio_score",
]
