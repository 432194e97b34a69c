"""The trainer: MixedPrecisionConfig, MixedPrecisionTrainer, the epoch loop
(MixedPrecisionOptimizer), checkpoints, statistics, memory measurement, the
compatibility check and the conversion of a user's optimizer.

Layer: above the scaler and the optimizers; knows no backend, no CLI, demo or bench.
"""
from amp_engine.trainer.compat import check_amp_compatibility
from amp_engine.trainer.config import MixedPrecisionConfig
from amp_engine.trainer.epoch import MixedPrecisionOptimizer, create_mixed_precision_optimizer
from amp_engine.trainer.trainer import LossFn, MixedPrecisionTrainer, create_mixed_precision_trainer

__all__ = ["check_amp_compatibility", "MixedPrecisionConfig", "MixedPrecisionOptimizer",
           "create_mixed_precision_optimizer", "MixedPrecisionTrainer",
           "create_mixed_precision_trainer", "LossFn"]
