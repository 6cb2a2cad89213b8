"""Hyperparameter search of an unlearning run (`transformers.Trainer.hyperparameter_search`, optuna): the search
space, the objective (forget quality above a utility floor) and `tune`; `erasus-hf tune` is its command."""

from .objective import UtilityFloorObjective
from .space import Dimension, SearchSpace
from .tuner import TuningResult, tune, write_recipe

__all__ = ["Dimension", "SearchSpace", "TuningResult", "UtilityFloorObjective", "tune", "write_recipe"]
