"""amp_engine: mixed-precision training for PyTorch on fused C++/CUDA/Triton kernels."""
from amp_engine import _extension
from amp_engine._extension import build_info
from amp_engine import ops
from amp_engine import optim
from amp_engine.scaler import GradScaler
from amp_engine.trainer.compat import check_amp_compatibility
from amp_engine.trainer.config import MixedPrecisionConfig
from amp_engine.trainer.epoch import MixedPrecisionOptimizer, create_mixed_precision_optimizer
from amp_engine.trainer import MixedPrecisionTrainer, create_mixed_precision_trainer

__version__ = "0.1.0"

__all__ = ["ops", "optim", "build_info", "__version__", "GradScaler",
           "MixedPrecisionConfig", "MixedPrecisionTrainer", "MixedPrecisionOptimizer",
           "create_mixed_precision_trainer", "create_mixed_precision_optimizer",
           "check_amp_compatibility"]
