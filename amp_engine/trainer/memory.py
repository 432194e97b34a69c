"""Real memory measurement of AMP against fp32 (measured, not looked up).

Two parts make up what a training step holds:

* **state**: parameters, gradients and optimizer state: counted tensor by tensor
  (:func:`state_bytes`); the fp32 figure is the same tensors at fp32 width,
  with master copies counted as 0 (fp32 training keeps none).
* **activations**: what the forward keeps alive for the backward.
  - CUDA: the peak allocated memory of the AMP forward+backward against an fp32
    forward+backward of the same batch (:func:`cuda_pass_peak`, allocator
    statistics: read on the host, no device sync).
  - CPU (no caching allocator to ask): the bytes autograd actually saves for
    backward, caught with ``torch.autograd.graph.saved_tensors_hooks``
    (:class:`SavedTensorMeter`), against the same tensors at fp32 width. A saved
    low-precision copy of a parameter counts 0 at fp32 width: fp32 training saves
    the parameter itself.

Savings = (fp32 - AMP) of both parts, in bytes; the trainer reports GB (10**9).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

GB = 1e9
_LOW = (torch.float16, torch.bfloat16)


def _storage_key(t: Tensor) -> tuple[str, int] | None:
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None


def _storage_nbytes(t: Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def _fp32_width(nbytes: int, t: Tensor) -> int:
    """Bytes the same elements would take in fp32 (only fp16/bf16 widen)."""
    return nbytes * 4 // t.element_size() if t.dtype in _LOW else nbytes


def _is_param_cast(t: Tensor) -> bool:
    """True for autocast's low-precision copy of a leaf (a parameter), or a view of one."""
    base = t._base if t._base is not None else t
    fn = base.grad_fn
    if fn is None or type(fn).__name__ != "ToCopyBackward0":
        return False
    return any(hasattr(n, "variable") for n, _ in fn.next_functions if n is not None)


class SavedTensorMeter:
    """Context manager counting the bytes autograd saves for backward inside it.

    Storages are counted once each (views share them) and tensors whose storage
    belongs to ``exclude`` (the model's parameters and buffers, alive anyway)
    are not counted. After exit: ``saved_bytes`` (as saved) and
    ``fp32_bytes`` (the same tensors at fp32 width; parameter casts count 0),
    ``tensors`` (how many distinct storages).
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self._exclude = {k for k in map(_storage_key, exclude) if k is not None}
        self._seen: set[tuple[str, int]] = set()
        self.saved_bytes = 0
        self.fp32_bytes = 0
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: Tensor) -> Tensor:
        key = _storage_key(t)
        if key is None or (key not in self._exclude and key not in self._seen):
            if key is not None:
                self._seen.add(key)
            nbytes = _storage_nbytes(t)
            self.saved_bytes += nbytes
            self.fp32_bytes += 0 if _is_param_cast(t) else _fp32_width(nbytes, t)
            self.tensors += 1
        return t

    @staticmethod
    def _unpack(t: Tensor) -> Tensor:
        return t

    def __enter__(self) -> "SavedTensorMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, dict[str, int]]:
    """Bytes of parameters, gradients and optimizer state, as held and at fp32 width.

    Returns ``{"params"|"grads"|"optimizer_state": {"actual": int, "fp32": int}}``.
    At fp32 width (what fp32 training with the same optimizer holds): fp16/bf16
    tensors widen to 4 bytes per element; uint8 state (8-bit quantized moments,
    one code per element) widens to 4 bytes per element; state whose key names a
    master copy ("master...") or a quantization scale ("...absmax...") counts 0,
    fp32 training keeps neither.
    """
    out = {k: {"actual": 0, "fp32": 0} for k in ("params", "grads", "optimizer_state")}
    seen: set = set()

    def add(kind: str, t: Tensor, fp32: int | None = None) -> None:
        key = _storage_key(t)
        if key is not None:
            if key in seen:
                return
            seen.add(key)
        nbytes = t.numel() * t.element_size()
        out[kind]["actual"] += nbytes
        out[kind]["fp32"] += _fp32_width(nbytes, t) if fp32 is None else fp32

    params = list(model.parameters())
    for p in params:
        add("params", p)
    for p in params:
        if p.grad is not None:
            add("grads", p.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    name = str(key)
                    fp32 = (0 if "master" in name or "absmax" in name
                            else 4 * value.numel() if value.dtype == torch.uint8 else None)
                    add("optimizer_state", value, fp32)
    return out


def bytes_per_param(state: dict[str, dict[str, int]], n_params: int, which: str = "actual") -> dict[str, float]:
    """:func:`state_bytes`'s parts divided by the parameter count, plus their "total"."""
    if isinstance(n_params, bool) or not isinstance(n_params, int) or n_params < 1:
        raise ValueError(f"n_params={n_params!r}: expected an int >= 1")
    out = {kind: part[which] / n_params for kind, part in state.items()}
    out["total"] = sum(out.values())
    return out


def cuda_pass_peak(run: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` above the level before ``run()``.

    Host-side allocator bookkeeping: allocations are recorded at launch, so no
    device synchronization is needed for the figure to be right.
    """
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run()
    return torch.cuda.max_memory_allocated(device) - base


def memory_comparison(activations_fp32: int, activations_amp: int, state: dict[str, dict[str, int]],
                      method: str) -> dict[str, Any]:
    """One measurement: AMP and fp32 bytes, their parts and the savings."""
    state_amp = sum(v["actual"] for v in state.values())
    state_fp32 = sum(v["fp32"] for v in state.values())
    amp_total = activations_amp + state_amp
    fp32_total = activations_fp32 + state_fp32
    return {
        "method": method,
        "activations_amp_bytes": int(activations_amp),
        "activations_fp32_bytes": int(activations_fp32),
        "state_amp_bytes": int(state_amp),
        "state_fp32_bytes": int(state_fp32),
        "state": state,
        "amp_bytes": int(amp_total),
        "fp32_bytes": int(fp32_total),
        "savings_bytes": int(fp32_total - amp_total),
        "savings_gb": (fp32_total - amp_total) / GB,
    }
