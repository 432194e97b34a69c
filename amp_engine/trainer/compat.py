"""check_amp_compatibility: what in a model may misbehave under autocast.

Findings are either *issues* (AMP cannot run correctly: the device lacks the
dtype, the trial forward/backward under autocast fails or produces non-finite
values) or *warnings* (AMP runs, but something deserves a look: BatchNorm
layers, custom autograd Functions without ``torch.amp.custom_fwd``, parameters
or buffers whose dtype autocast will not touch). A model is ``compatible`` when
there are no issues.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from amp_engine.trainer.config import parse_dtype
from amp_engine.trainer.trial import first_tensor, infer_sample_input, isolated_pass, model_device, run_model

_LOW = (torch.float16, torch.bfloat16)


def autocast_support(device: torch.device | str, dtype: torch.dtype) -> tuple[bool, str | None]:
    """Whether ``torch.autocast`` can run ``dtype`` on ``device``: (ok, reason if not)."""
    device = torch.device(device)
    kind = device.type
    if not torch.amp.autocast_mode.is_autocast_available(kind):
        return False, f"torch has no autocast for device type {kind!r}"
    if kind == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available on this machine"
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name(device)
            return False, f"{name} has no native bfloat16 support (needs compute capability >= 8.0)"
    # torch's autocast disables itself with a warning when the dtype is not
    # supported on the device type: ask it rather than keep our own table.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = torch.autocast(kind, dtype=dtype)
    if not ctx._enabled or ctx.fast_dtype != dtype:
        msg = "; ".join(str(w.message).splitlines()[0] for w in caught) or "autocast disabled itself"
        return False, f"autocast does not support {dtype} on {kind}: {msg}"
    return True, None


def _is_custom_fwd(forward: Any) -> bool:
    # torch.amp.custom_fwd wraps with functools.wraps: the wrapper keeps the
    # original's name but its code object is torch's `decorate_fwd`.
    code = getattr(forward, "__code__", None)
    return hasattr(forward, "__wrapped__") and code is not None and code.co_name == "decorate_fwd"


def check_amp_compatibility(
    model: nn.Module,
    dtype: torch.dtype | str = torch.float16,
    device: torch.device | str | None = None,
    sample_input: Any = None,
) -> dict[str, Any]:
    """Check whether ``model`` trains correctly under autocast to ``dtype`` on ``device``.

    Args:
        model: the module (left unchanged: the trial pass restores grads, buffers, RNG).
        dtype: torch.float16 / torch.bfloat16 or "fp16" / "bf16".
        device: where training will run; default the model's parameters' device.
        sample_input: an input for the trial forward/backward (tensor, tuple or
            dict, as the model takes it). None: a small random one is inferred from
            the first Linear/Conv/Embedding/RNN layer; if none can be, the trial is
            skipped with a warning.

    Returns:
        dict with ``compatible`` (bool: no issues), ``issues`` and ``warnings``
        (lists of str), ``modules`` ({module name: [findings]}), ``device``,
        ``dtype`` (names), ``dtype_supported`` (bool), ``batchnorm_layers``,
        ``custom_functions`` ({Function name: has custom_fwd}),
        ``unexpected_dtypes`` ({tensor name: dtype name}) and ``trial``
        ({ran, output_finite, grads_finite, error}).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dtype = parse_dtype(dtype)
    device = torch.device(device) if device is not None else model_device(model)
    report: dict[str, Any] = {
        "compatible": True, "issues": [], "warnings": [], "modules": defaultdict(list),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "dtype_supported": True,
        "batchnorm_layers": [], "custom_functions": {}, "unexpected_dtypes": {},
        "trial": {"ran": False, "output_finite": None, "grads_finite": None, "error": None},
    }

    def find(kind: str, module: str, text: str) -> None:
        report[kind].append(f"{module or '<root>'}: {text}" if module is not None else text)
        if module is not None:
            report["modules"][module or "<root>"].append(text)

    ok, why = autocast_support(device, dtype)
    if not ok:
        report["dtype_supported"] = False
        find("issues", None, why)
    _check_modules(model, dtype, device, report, find)
    if ok:
        _trial(model, dtype, device, sample_input, report, find)
    report["modules"] = dict(report["modules"])
    report["compatible"] = not report["issues"]
    return report


def _check_modules(model, dtype, device, report, find) -> None:
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            report["batchnorm_layers"].append(name)
            find("warnings", name, "BatchNorm: keep its weights and running statistics in fp32 "
                 "(autocast does; model.half() does not) - running_var overflows fp16 easily")
        for tname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            full = f"{name}.{tname}" if name else tname
            if t.device.type != device.type:
                find("issues", name, f"{tname} is on {t.device}, training runs on {device}")
            if not t.is_floating_point():
                continue  # int buffers (num_batches_tracked, indices) are fine
            if t.dtype == torch.float64:
                report["unexpected_dtypes"][full] = "float64"
                find("warnings", name, f"{tname} is float64: autocast never casts float64, "
                     "so ops on it run in double precision")
            elif t.dtype in _LOW and isinstance(t, nn.Parameter):
                report["unexpected_dtypes"][full] = str(t.dtype).removeprefix("torch.")
                find("warnings", name, f"{tname} is already {t.dtype}: its grads and updates are "
                     "low precision; use memory_efficient=True (fp32 masters / stochastic rounding) "
                     "or keep parameters in fp32")
            elif t.dtype not in _LOW and t.dtype != torch.float32:
                report["unexpected_dtypes"][full] = str(t.dtype).removeprefix("torch.")
                find("warnings", name, f"{tname} has dtype {t.dtype}, not one autocast handles")


def _trial(model, dtype, device, sample_input, report, find) -> None:
    inputs = sample_input if sample_input is not None else infer_sample_input(model, device)
    if inputs is None:
        find("warnings", None, "trial forward/backward skipped: no sample_input given and none "
             "could be inferred from the first layer")
        return
    trial = report["trial"]
    try:
        with isolated_pass(model):
            _amp_trial(model, dtype, device, inputs, report, find)
    except Exception as amp_error:  # noqa: BLE001 - any failure is a finding, never a crash
        # Tell an AMP failure from an input we guessed wrong: retry in fp32.
        try:
            with isolated_pass(model), torch.no_grad():
                run_model(model, inputs)
        except Exception as fp32_error:  # noqa: BLE001
            where = "given" if sample_input is not None else "inferred"
            find("warnings", None, f"trial forward skipped: the {where} sample input does not fit "
                 f"the model ({type(fp32_error).__name__}: {fp32_error}); pass sample_input")
            return
        trial["error"] = f"{type(amp_error).__name__}: {amp_error}"
        find("issues", None, f"the forward/backward fails under autocast({report['dtype']}) "
             f"but runs in fp32: {trial['error']}")


def _sequence_now() -> int:
    # Autograd numbers nodes in creation order (per thread); a throw-away node
    # tells where the counter stands, so a module's forward spans an interval.
    probe = torch.zeros(1, requires_grad=True).view(1)
    return probe.grad_fn._sequence_nr()


def _amp_trial(model, dtype, device, inputs, report, find) -> None:
    trial = report["trial"]
    hooks, spans, starts = [], [], {}  # spans: (module name, first seq, last seq)
    for name, module in model.named_modules():
        def pre(mod, args, name=name):
            starts.setdefault(name, []).append(_sequence_now())

        def post(mod, args, out, name=name):
            spans.append((name, starts[name].pop(), _sequence_now()))
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.autocast(device.type, dtype=dtype):
            out = first_tensor(run_model(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    trial["ran"] = True
    if out is None:
        find("warnings", None, "trial: the model returned no tensor; backward not checked")
        return
    _attribute_custom_functions(out.grad_fn, spans, report, find)
    trial["output_finite"] = bool(torch.isfinite(out).all())
    if not trial["output_finite"]:
        find("issues", None, f"trial forward under autocast({report['dtype']}) produced "
             "non-finite outputs (values beyond the dtype's range?)")
    if out.requires_grad:
        out.float().square().mean().backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        trial["grads_finite"] = not bad
        if bad:
            find("issues", None, f"trial backward under autocast produced non-finite grads in {bad[:5]}")


def _attribute_custom_functions(root, spans, report, find) -> None:
    """Find the custom autograd Functions in the graph and name the innermost
    module whose forward created each one."""
    seen: dict[int, Any] = {}  # id -> node: holding the node keeps its id unique
    stack = [root]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node
        cls = getattr(node, "_forward_cls", None)
        if cls is not None and cls.__name__ not in report["custom_functions"]:
            decorated = _is_custom_fwd(cls.forward)
            report["custom_functions"][cls.__name__] = decorated
            if not decorated:
                seq = node._sequence_nr()
                inside = [(last - first, name) for name, first, last in spans if first < seq < last]
                module = min(inside)[1] if inside else ""
                find("warnings", module, f"custom autograd Function {cls.__name__} has no "
                     "@torch.amp.custom_fwd: its forward sees whatever dtypes autocast produced")
        stack.extend(n for n, _ in node.next_functions)
