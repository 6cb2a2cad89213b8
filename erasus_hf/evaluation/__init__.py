"""Evaluation: TOFU, MUSE, membership inference, memorization and robustness checks, run alone or as a
`MetricSuite`, after training or inside it (`UnlearningTrainer(..., evaluators=...)`)."""

# The built-in evaluators register themselves on import (`evaluation.base.EVALUATORS`), in the order `MetricSuite`
# lists their names: tofu, muse, mia, memorization. Keep these four imports first, in this order.
# isort: off
from .tofu import TOFUEvaluator, forget_quality
from .muse import MUSEEvaluator
from .mia import MIAEvaluator, auc, min_k_plus_plus_score, min_k_score
from .memorization import MemorizationEvaluator, exact_memorization, extraction_strength

# isort: on
from .base import EVALUATORS, Evaluator, register_evaluator
from .callbacks import RowCheckingCallback, UnlearningEarlyStoppingCallback
from .likelihood import answer_nll, truth_ratio, truth_ratio_score
from .result import EvaluationResult
from .robustness import QuantizationEvaluator, RelearningEvaluator, quantized_copy, relearning_attack
from .suite import MetricSuite

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
    "RowCheckingCallback",
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
    "register_evaluator",
    "relearning_attack",
    "truth_ratio",
    "truth_ratio_score",
]
