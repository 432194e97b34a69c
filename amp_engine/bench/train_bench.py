"""End-to-end training step of a GPT-style model: torch's AMP recipe vs amp_engine.

Three recipes train the same model (amp_engine.demo.model.CharTransformer, same
init, same batches), timed in alternation so each sees the same machine load:

  torch        fp32 params, autocast, ``torch.amp.GradScaler``,
               ``torch.optim.AdamW(fused=True)``; unscale_ + clip_grad_norm_ + step + update
  drop-in      the same, with ``amp_engine.GradScaler`` and its one-pass
               ``clip_grad_norm_`` (the clip folded into the fused step)
  full         bf16 params with fp32 masters in ``amp_engine.optim.AdamW``,
               ``amp_engine.GradScaler.clip_grad_norm_`` + step + update

Reported per (model size, batch): the median step time (forward + backward +
optimizer; CUDA synchronised), the share of it spent in clip + step + update, and
the bytes per parameter of params + grads + optimizer state (tensor bytes summed
after a step: what the recipe keeps between steps). autocast runs fp16 on CUDA
(the loss scale at work) and bf16 on the CPU.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from amp_engine import optim as fused_optim
from amp_engine.bench.common import Row, arg_parser, environment, finish_rows, sync, write_results
from amp_engine.demo.model import CharTransformer, ModelShape
from amp_engine.scaler import GradScaler

TORCH = "torch AMP (fused AdamW)"
DROP_IN = "amp_engine GradScaler (drop-in)"
FULL = "amp_engine full (bf16 + fp32 masters)"
VOCAB = 256
MAX_NORM = 1.0

#: name -> (d_model, n_layers, n_heads): ≈2 M, ≈20 M and ≈100 M parameters at vocab 256
SIZES = {"2M": (256, 2, 4), "20M": (512, 6, 8), "100M": (768, 14, 12)}


def _shape(size: str, context: int) -> ModelShape:
    d, layers, heads = SIZES[size]
    return ModelShape(vocab_size=VOCAB, context=context, d_model=d, n_layers=layers, n_heads=heads)


def state_bytes_per_param(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """(params + grads + optimizer state tensors) bytes / number of params."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    n = 0
    for p in model.parameters():
        n += p.numel()
        add(p)
        add(p.grad)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    return total / max(n, 1)


class Recipe:
    """One recipe's model, optimizer and scaler; ``step(x, y)`` returns (total s, optimizer s)."""

    def __init__(self, name: str, shape: ModelShape, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name, self.device = name, device
        self.model = CharTransformer(shape).to(device)
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        params = self.model.parameters()
        if name == FULL:
            self.model.to(torch.bfloat16)
            self.optimizer = fused_optim.AdamW(self.model.parameters(), lr=1e-4)
            self.autocast = False
        else:
            # torch's fused AdamW runs on the CPU too (torch >= 2.4)
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
            self.autocast = True
        scaler_cls = torch.amp.GradScaler if name == TORCH else GradScaler
        # bf16 needs no loss scale, but the recipe keeps the scaler's check and skip
        self.scaler = scaler_cls(device.type, init_scale=2.0**16 if device.type == "cuda" else 1.0)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        sync(self.device)
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.autocast):
            loss = F.cross_entropy(self.model(x).float(), y.reshape(-1))
        self.scaler.scale(loss).backward()
        sync(self.device)
        t1 = time.perf_counter()
        if self.name == TORCH:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), MAX_NORM)
        else:
            self.scaler.clip_grad_norm_(self.optimizer, MAX_NORM)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=False)  # grads stay: counted in the bytes
        return t2 - t0, t2 - t1


def bench_size(size: str, batch: int, context: int, device: torch.device, steps: int) -> list[Row]:
    shape = _shape(size, context)
    recipes = [Recipe(name, shape, device) for name in (TORCH, DROP_IN, FULL)]
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (batch, context + 1), generator=gen).to(device)
            for _ in range(4)]
    times: dict[str, list[tuple[float, float]]] = {r.name: [] for r in recipes}
    for i in range(steps + 2):  # two warm-up steps (allocations, lazy state)
        chunk = data[i % len(data)]
        x, y = chunk[:, :-1], chunk[:, 1:]
        for r in recipes:  # interleaved: the same machine load for all three
            t = r.step(x, y)
            if i >= 2:
                times[r.name].append(t)
    n_params = sum(p.numel() for p in recipes[0].model.parameters())
    case = f"{size} ({n_params / 1e6:.1f}M params), batch {batch}x{context}"
    rows = []
    for r in recipes:
        total = [t for t, _ in times[r.name]]
        opt = [o for _, o in times[r.name]]
        med = statistics.median(total)
        q = statistics.quantiles(total, n=4) if len(total) > 1 else [med, med, med]
        rows.append(Row("train step", case, r.name, med * 1e3, (q[2] - q[0]) * 1e3, extra={
            "optimizer_share": statistics.median(opt) / med,
            "optimizer_ms": statistics.median(opt) * 1e3,
            "bytes_per_param": state_bytes_per_param(r.model, r.optimizer)}))
    return rows


def cases(quick: bool, device: torch.device) -> list[tuple[str, int, int]]:
    """(size, batch, context) to run."""
    if quick:
        return [("2M", 4, 64)]
    if device.type == "cpu":  # 2-core CI-sized machines: the 100M model takes seconds a step
        return [("2M", 4, 128), ("2M", 32, 128), ("20M", 4, 128), ("100M", 2, 128)]
    return [(s, b, 256) for s in SIZES for b in (4, 32)]


def run(device: str = "cpu", quick: bool = False, steps: int | None = None) -> tuple[list[Row], dict]:
    dev = torch.device(device)
    steps = steps or (3 if quick else 10)
    rows: list[Row] = []
    for size, batch, context in cases(quick, dev):
        rows += bench_size(size, batch, context, dev, steps)
    finish_rows(rows, None, baseline_impl=TORCH)
    return rows, environment(dev)


def table(rows: list[Row]) -> str:
    lines = ["| case | recipe | step ms (median) | IQR ms | vs torch | clip+step+update ms | "
             "its share | its speed vs torch | B/param (params+grads+state) |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = {r.case: r.extra["optimizer_ms"] for r in rows if r.impl == TORCH}
    for r in rows:
        opt_ms = r.extra["optimizer_ms"]
        vs = f"{base[r.case] / opt_ms:.2f}×" if r.case in base and opt_ms > 0 else "—"
        lines.append(f"| {r.case} | {r.impl} | {r.median_ms:.1f} | {r.iqr_ms:.1f} | "
                     f"{r.speedup:.2f}× | {opt_ms:.1f} | {100 * r.extra['optimizer_share']:.2g} % | "
                     f"{vs} | {r.extra['bytes_per_param']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per recipe (default 10, 3 with --quick)")
    args = parser.parse_args(argv)
    rows, env = run(args.device, args.quick, args.steps)
    print(f"# bench_train on {env.get('gpu', env['cpu'])} ({env['device']}, torch {env['torch']}, "
          f"{env['cpu_threads']} threads)\n")
    print(table(rows))
    path = write_results(args.output, "bench_train", rows, env)
    if path:
        print(f"\nwrote {path}")
    return 0


__all__ = ["run", "main", "table", "state_bytes_per_param"]
