"""amp_engine: mixed-precision training for PyTorch on fused C++/CUDA/Triton kernels."""
from amp_engine import _extension
from amp_engine._extension import build_info
from amp_engine import ops
from amp_engine.scaler import GradScaler

__version__ = "0.1.0"

__all__ = ["ops", "build_info", "__version__", "GradScaler"]
