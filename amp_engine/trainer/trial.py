"""Side-effect-free trial passes through a user's model.

The compatibility check, the AMP validation and the memory measurement all run
extra forward (and backward) passes through the model being trained. Those must
not leave a trace: accumulated grads, BatchNorm running statistics and the RNG
stream (dropout) are saved before and put back after.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn


def move_to(obj: Any, device: torch.device) -> Any:
    """Tensors inside tuples/lists/dicts moved to ``device`` (non_blocking)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: move_to(v, device) for k, v in obj.items()})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple: positional fields
        return type(obj)(*(move_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """A batch as (inputs, targets); TypeError for anything but a pair."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"batch must be a pair (inputs, targets), got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """Floating tensors inside ``obj`` cast to ``dtype`` (for weights kept in low precision)."""
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_floats(v, dtype) for v in obj)
    return obj


def is_plateau(scheduler: Any) -> bool:
    """ReduceLROnPlateau steps on a metric, not per optimizer step."""
    return isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def run_model(model: nn.Module, inputs: Any) -> Any:
    """model(x) for a tensor, model(*x) for a tuple/list, model(**x) for a dict."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def first_tensor(output: Any) -> Tensor | None:
    """The tensor a loss would be computed from: the output itself, the first
    tensor of a tuple/list/dict, or ``output.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    elif hasattr(output, "logits"):
        return first_tensor(output.logits)
    if isinstance(output, (list, tuple)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def model_device(model: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer); CPU for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def isolated_pass(model: nn.Module) -> Iterator[None]:
    """Run passes through ``model`` and undo their side effects on exit.

    Existing ``.grad``s are set aside (the pass starts from no grads) and put
    back; buffers (BatchNorm running stats, counters) are restored in place;
    the CPU and CUDA RNG states are forked so dropout masks of the real step
    are unchanged.
    """
    params = [p for p in model.parameters()]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    device = model_device(model)
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    try:
        for p in params:
            p.grad = None
        with torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g


def infer_sample_input(model: nn.Module, device: torch.device, batch: int = 2) -> Any | None:
    """A small random input for the first layer that reveals its input shape.

    Linear -> (batch, in_features); ConvNd -> (batch, C, 8, ..., 8);
    Embedding -> int indices (batch, 8); RNN/LSTM/GRU -> a (batch, 8, features)
    sequence. None when the first layer says nothing about the input.
    """
    for module in model.modules():
        dtype = _float_dtype_of(module)
        if isinstance(module, nn.Linear):
            return torch.randn(batch, module.in_features, device=device, dtype=dtype)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = (8,) * (module.weight.dim() - 2)
            return torch.randn(batch, module.in_channels, *spatial, device=device, dtype=dtype)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return torch.randint(0, module.num_embeddings, (batch, 8), device=device)
        if isinstance(module, nn.RNNBase):
            shape = (batch, 8, module.input_size) if module.batch_first else (8, batch, module.input_size)
            return torch.randn(*shape, device=device, dtype=dtype)
    return None


def _float_dtype_of(module: nn.Module) -> torch.dtype:
    for p in module.parameters(recurse=False):
        if p.is_floating_point():
            # a model kept in bf16/fp16 wants inputs of that dtype
            return p.dtype
    return torch.float32
