"""Ops dispatched per training step: torch's recipe vs amp_engine's, for the same job.

On a GPU a small or medium model's optimizer step is bound by kernel launches,
not bytes, so the budget (DESIGN.md §5) is counted, not timed: a
``TorchDispatchMode`` sees every ATen or custom op dispatched around
``clip -> step -> update`` (on a GPU each is a launch or a copy). The
``profiler::`` ops torch.optim emits for ``record_function`` annotations are
not counted: they launch nothing. The count is deterministic, so
tests/scaler/test_op_budget.py asserts it.

Recipes (one device, ``n`` param tensors of one dtype; the grads are fresh
tensors every step, as after ``zero_grad()``, assigned outside the count):

* ``torch-fused``: the drop-in scaler with ``torch.optim.AdamW(fused=True)``;
* ``torch-sgd`` / ``torch-adamw``: the drop-in scaler with a plain optimizer
  (``foreach=True``: the grads are unscaled by the scaler, one ``.item()`` skips);
* ``ours-adamw`` / ``ours-adam`` / ``ours-sgd``: amp_engine's GradScaler with
  amp_engine's optimizer; torch's recipe for the same job is torch's GradScaler
  with torch's fused optimizer, and for fp16/bf16 params hand-rolled fp32
  masters (one ``_foreach_copy_`` of the grads into the masters' grads, one of
  the masters back into the params: the cheapest such recipe).

Clipping: torch ``unscale_`` + ``torch.nn.utils.clip_grad_norm_``; ours
``scaler.clip_grad_norm_``. Run ``python -m amp_engine.bench.op_count`` for the table.

On a CUDA device ``--launches`` adds what the GPU actually ran: the profiler's
count of kernels, memcpys and memsets per step (``count_launches``), for both
sides (scripts/gpu_check.sh runs it). A dispatched op may launch several kernels
(torch's fused AdamW launches one per chunk of tensors) or none (a view).
"""
from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from amp_engine.optim import SGD as OurSGD
from amp_engine.optim import Adam as OurAdam
from amp_engine.optim import AdamW as OurAdamW
from amp_engine.scaler import GradScaler

RECIPES = ("torch-fused", "torch-sgd", "torch-adamw", "ours-adamw", "ours-adam", "ours-sgd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_NORM = 1e6  # large: the clip never changes the grads, so every step does the same work
NUMEL = 64


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched inside the mode, by name (``profiler::`` ops excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if not name.startswith("profiler::"):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn: Callable[[], object]) -> Counter:
    """The ops ``fn()`` dispatches, by name."""
    with OpCounter() as counter:
        fn()
    return counter.ops


def device_events(events, device_type) -> Counter:
    """The profiler events that ran on ``device_type`` (torch.autograd.DeviceType), by
    name: on CUDA each is a kernel, a memcpy or a memset."""
    return Counter(e.name for e in events if e.device_type == device_type)


def count_launches(fn: Callable[[], object], device: str = "cuda") -> Counter:
    """What ``fn()`` ran on the GPU, by name (torch.profiler's CUDA activity, after a
    synchronize): kernels, memcpys and memsets. Needs a CUDA device."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"device={device!r}: launches are counted on a CUDA device only "
                         "(count_ops counts dispatched ops anywhere)")
    if not torch.cuda.is_available():
        raise RuntimeError("count_launches needs a CUDA device; none is available")
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return device_events(prof.events(), torch.autograd.DeviceType.CUDA)


@dataclass
class Setup:
    """One recipe ready to step: ``load()`` assigns fresh grads, ``step()`` is counted."""

    load: Callable[[int], None]
    step: Callable[[], None]


def _torch_optimizer(kind: str, params, fused: bool):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused or None,
                               foreach=None if fused else True)
    cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    return cls(params, lr=1e-3, fused=fused or None, foreach=None if fused else True)


def _our_optimizer(kind: str, params):
    if kind == "sgd":
        return OurSGD(params, lr=1e-3, momentum=0.9)
    return (OurAdamW if kind == "adamw" else OurAdam)(params, lr=1e-3)


def _scaler(ours: bool, device: str = "cpu"):
    # growth_interval: the scale stays put, every counted step does the same work
    cls = GradScaler if ours else torch.amp.GradScaler
    return cls(torch.device(device).type, init_scale=2.0**10, growth_interval=10**6)


def build(recipe: str, impl: str, dtype: torch.dtype, n: int, clip: bool,
          device: str = "cpu") -> Setup:
    """``impl`` "torch" or "amp_engine": that side of ``recipe`` (see the module docstring)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if impl not in ("torch", "amp_engine"):
        raise ValueError(f"impl must be 'torch' or 'amp_engine', got {impl!r}")
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(NUMEL, generator=gen).to(device, dtype).requires_grad_() for _ in range(n)]
    pool = [[torch.randn(NUMEL, generator=gen).to(device, dtype) for _ in range(n)] for _ in range(3)]
    ours = impl == "amp_engine"
    scaler = _scaler(ours, device)
    scaler.scale(torch.ones((), dtype=torch.float32, device=device))  # lazy init of the scale
    kind = recipe.split("-")[1]
    masters = None
    if recipe.startswith("ours-") and ours:
        opt = _our_optimizer(kind, params)
    elif recipe.startswith("ours-"):
        fused = True
        if dtype != torch.float32:  # torch's hand-rolled fp32 masters
            masters = [p.detach().float().requires_grad_() for p in params]
            for m in masters:
                m.grad = torch.zeros_like(m)
            opt = _torch_optimizer(kind, masters, fused)
        else:
            opt = _torch_optimizer(kind, params, fused)
    else:
        opt = _torch_optimizer("adamw" if kind == "fused" else kind, params, kind == "fused")
    stepped = masters if masters is not None else params

    def load(i: int) -> None:
        for p, g in zip(params, pool[i % len(pool)]):
            p.grad = g.clone()

    def step() -> None:
        if masters is not None:
            torch._foreach_copy_([m.grad for m in masters], [p.grad for p in params])
        if clip and ours:
            scaler.clip_grad_norm_(opt, MAX_NORM)
        elif clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(stepped, MAX_NORM)
        scaler.step(opt)
        scaler.update()
        if masters is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, masters)

    return Setup(load, step)


def measure(recipe: str, impl: str, dtype: torch.dtype, n: int, clip: bool,
            warmup: int = 3, device: str = "cpu", launches: bool = False) -> Counter:
    """The ops of one steady-state step (after ``warmup`` steps: lazy state is made);
    with ``launches``, what the step ran on the GPU instead (count_launches)."""
    setup = build(recipe, impl, dtype, n, clip, device)
    for i in range(warmup):
        setup.load(i)
        setup.step()
    setup.load(warmup)
    if launches:
        return count_launches(setup.step, device)
    return count_ops(setup.step)


def contract_missing(device: str = "cpu") -> str | None:
    """Why the default backends cannot meet the budget on ``device`` (None: they can).

    The budget is the compiled kernels': the reference backend is plain tensor
    ops, and a library built before the op-budget contract completes it with them.
    """
    from amp_engine.ops import dispatch, scaling

    for op, arg in (("grad_norm_and_check", "max_norm"), ("update_scale_", "counters")):
        backend = dispatch.select(None, torch.device(device), op)
        if backend not in ("cpp", "cuda"):
            return f"{op} runs on the {backend!r} backend here (no compiled kernel)"
        if not scaling.compiled_takes(op, arg):
            return (f"the compiled {op} predates the op-budget contract (no {arg!r} "
                    "argument): rebuild the library")
    return None


def torch_refuses(recipe: str, dtype: torch.dtype, clip: bool) -> bool:
    """torch's recipe raises (fp16 grads reach unscale_) when it unscales fp16 grads in place."""
    if dtype != torch.float16 or recipe.startswith("ours-"):
        return False
    return clip or recipe != "torch-fused"


def cases(sizes=(24, 240)):
    """Every (recipe, dtype name, n, clip) that torch's recipe can run."""
    for recipe in RECIPES:
        for dname, dtype in DTYPES.items():
            for clip in (False, True):
                if torch_refuses(recipe, dtype, clip):
                    continue
                for n in sizes:
                    yield recipe, dname, n, clip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="24,240", help="param tensor counts (default 24,240)")
    ap.add_argument("--verbose", action="store_true", help="list the ops of each side")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--launches", action="store_true",
                    help="also count the GPU's kernels, memcpys and memsets per step "
                         "(torch.profiler; needs --device cuda)")
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if args.launches and torch.device(args.device).type != "cuda":
        ap.error(f"--launches counts GPU launches: it needs --device cuda, got {args.device!r}")
    missing = contract_missing(args.device)
    if missing:
        print(f"note: {missing}; amp_engine's counts include the reference's completion\n")
    head = "| recipe | dtype | tensors | clip | ops: torch | ops: amp_engine |"
    rule = "|---|---|---|---|---|---|"
    if args.launches:
        head += " GPU launches: torch | GPU launches: amp_engine |"
        rule += "---|---|"
    print(head)
    print(rule)
    for recipe, dname, n, clip in cases(sizes):
        sides = {}
        for impl in ("torch", "amp_engine"):
            sides[impl] = [measure(recipe, impl, DTYPES[dname], n, clip, device=args.device)]
            if args.launches:
                sides[impl].append(measure(recipe, impl, DTYPES[dname], n, clip,
                                           device=args.device, launches=True))
        row = f"| {recipe} | {dname} | {n} | {'yes' if clip else 'no'} |"
        for k in range(len(sides["torch"])):
            row += f" {sum(sides['torch'][k].values())} | {sum(sides['amp_engine'][k].values())} |"
        print(row, flush=True)
        if args.verbose:
            for impl, counts in sides.items():
                print(f"    {impl}: " + "; ".join(str(dict(c)) for c in counts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
