"""The full AMP optimizer step: amp_engine vs torch's recipes, side by side in one run.

One step = the inf/nan check and the grad-norm pass, clipping, unscaling and the AdamW
update, with a loss scaler. Recipes (50 M params in 200 tensors by default):

  A  torch's best fp32 recipe: GradScaler.unscale_ + clip_grad_norm_(foreach=True)
     + AdamW(fused=True) stepped by the scaler (no host sync).
  B  torch's hand-rolled bf16 params with fp32 masters: copy the bf16 grads into fp32
     master grads, recipe A on the masters, copy the masters back into the bf16 params.
  C  torch's default: GradScaler + clip_grad_norm_ + AdamW(foreach=True) (the scaler
     syncs once per step to decide the skip).
  amp_engine: GradScaler.clip_grad_norm_ + step + update with our AdamW: one read-only
     pass (grad_norm_and_check: norm + inf check), clip_coef on the device, then the
     fused step (AdamW with fp32 masters for bf16) reading each grad once and
     multiplying it by clip_coef / scale inside, then update_scale_. (A build without
     the compiled norm kernel runs the same sequence spelled with the ops and a
     one-pass torch._foreach_norm stand-in; the output says which.)

  amp_engine with compact moments (amp_engine.optim.AdamW exp_avg_dtype /
     exp_avg_sq_dtype): bf16 moments, 8-bit block moments (with fp32 params; with bf16
     params and fp32 masters; with bf16 params and stochastic rounding, no master).

The scale is 1.0 and max_norm is large (clip coefficient 1) in every recipe: repeated
unscaling/clipping of the same grads would otherwise drive them subnormal, which is 50x
slower on CPUs and measures nothing useful. The work done is the same either way.
"traffic B/param" is each recipe's minimal traffic (reads + writes of every pass);
"memory B/param" the params + grads + optimizer state it holds, measured from its
tensors (torch fused fp32: 16; bf16 + fp32 masters + 8-bit moments: ~10; bf16 with
stochastic rounding + 8-bit moments: ~6).
"""
from __future__ import annotations

import gc

import torch

from amp_engine import ops
from amp_engine.bench.common import Row, arg_parser, environment, markdown_table, timer, write_results
from amp_engine.optim import AdamW

MAX_NORM = 1e9  # clip coefficient 1: see the module docstring
LR, WD = 1e-3, 1e-2
# minimal bytes per param of each recipe (passes: reads + writes)
BYTES = {
    "A": 8 + 12 + 28,           # unscale r/w 4+4; clip: norm r 4, scale r/w 8; fused AdamW 28
    "B": 6 + 8 + 12 + 28 + 6,   # grads bf16->fp32 2+4; A on the masters; masters->bf16 4+2
    "C_fp32": 8 + 12 + 68,      # foreach AdamW: ~8 passes over params/moments/temporaries
    "ours_fp32": 4 + 28,        # norm+check r 4; fused step r g,p,m,v 16, w p,m,v 12
    "ours_bf16": 2 + 28,        # norm+check r 2; step r g 2, master/m/v 12; w master/m/v 12, p 2
    "ours_sr": 2 + 22,          # bf16 without master: r g,p 4, m,v 8; w p 2, m,v 8
    # compact moments (8-bit: + 2 x 4 B of absmax per 256 elements, read and written)
    "ours_fp32_bf16m": 4 + 20,  # r g,p 8, m,v 4; w p 4, m,v 4
    "ours_fp32_m8": 4 + 16,     # r g,p 8, m,v 2; w p 4, m,v 2
    "ours_bf16_m8": 2 + 18,     # r g 2, master 4, m,v 2; w master 4, m,v 2, p 2
    "ours_sr_m8": 2 + 10,       # r g,p 4, m,v 2; w p 2, m,v 2
}
BF16, U8 = torch.bfloat16, torch.uint8
BF16_MOMENTS = {"exp_avg_dtype": BF16, "exp_avg_sq_dtype": BF16}
MOMENTS8 = {"exp_avg_dtype": U8, "exp_avg_sq_dtype": U8}


def _sizes(total: int, n_tensors: int) -> list[int]:
    return [total // n_tensors] * n_tensors


def _model(sizes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(n, generator=gen) * 0.02).to(dtype).to(device))
              for n in sizes]
    for p in params:
        p.grad = (torch.randn(p.numel(), generator=gen) * 1e-3).to(dtype).to(device)
    return params


def _torch_scaler(device):
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=1 << 30)
    scaler.scale(torch.ones((), device=device))  # creates the scale (lazy, as after a loss)
    return scaler


def _torch_recipe(params, device, **impl):
    """torch's GradScaler + unscale_ + clip_grad_norm_(foreach) + AdamW(**impl)."""
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WD, **impl)
    scaler = _torch_scaler(device)

    def step():
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        scaler.step(opt)
        scaler.update()
    step.held = lambda: _tensors(params, opt)
    return step


def recipe_a(params, device):
    return _torch_recipe(params, device, fused=True)


def recipe_c(params, device):
    return _torch_recipe(params, device, foreach=True)


def recipe_b(params, device):
    masters = [torch.nn.Parameter(p.detach().float()) for p in params]
    for m in masters:
        m.grad = torch.empty_like(m)
    low_grads = [p.grad for p in params]
    master_grads = [m.grad for m in masters]
    inner = recipe_a(masters, device)

    def step():
        torch._foreach_copy_(master_grads, low_grads)
        inner()
        with torch.no_grad():
            torch._foreach_copy_(params, masters)
    step.held = lambda: _tensors(params, None) + inner.held()
    return step


def recipe_ours(params, device, **opt_kw):
    """amp_engine.GradScaler.clip_grad_norm_ + step + update on our AdamW: 2 passes over
    the grads, no host sync. Where the compiled norm kernel is missing, the same
    sequence spelled with the ops and a one-pass norm stand-in (see _norm_and_check)."""
    opt = AdamW(params, lr=LR, weight_decay=WD, **opt_kw)
    if _has_norm_kernel(device):
        from amp_engine.scaler import GradScaler

        scaler = GradScaler(device.type, init_scale=1.0, growth_interval=1 << 30)
        scaler.scale(torch.ones((), device=device))

        def scaler_step():
            scaler.clip_grad_norm_(opt, MAX_NORM)
            scaler.step(opt)
            scaler.update()
        scaler_step.held = lambda: _tensors(params, opt)
        return scaler_step
    grads = [p.grad for p in params]
    scale = torch.ones((), device=device)
    inv_scale = scale.double().reciprocal().float()
    found_inf = torch.zeros((), device=device)
    growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
    hysteresis_tracker = torch.ones((), dtype=torch.int32, device=device)
    norm_pass = _norm_and_check(device)

    def step():
        found_inf.zero_()
        norm = norm_pass(grads, inv_scale, found_inf)
        clip_coef = torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0)
        opt.grad_scale, opt.found_inf, opt.clip_coef = scale, found_inf, clip_coef
        opt.step()
        del opt.grad_scale, opt.found_inf, opt.clip_coef
        ops.update_scale_(scale, growth_tracker, hysteresis_tracker, found_inf,
                          growth_factor=2.0, backoff_factor=0.5, growth_interval=1 << 30)
    step.held = lambda: _tensors(params, opt)
    return step


def _tensors(params, opt) -> list[torch.Tensor]:
    """The params, their grads and every tensor of the optimizer's state."""
    out = [t for p in params for t in (p, p.grad) if t is not None]
    if opt is not None:
        out += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return out


def memory_bytes_per_param(step, n_params: int) -> float:
    """Params + grads + optimizer state (masters, moments, scales, step counters)
    held by a recipe after its first step, in bytes per model parameter (measured
    from the tensors, each storage counted once)."""
    seen, total = set(), 0
    for t in step.held():
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / n_params


def _has_norm_kernel(device) -> bool:
    return ops.available_backends(device)[0] != "reference"


def _norm_and_check(device):
    """A one-pass stand-in for ops.grad_norm_and_check with the same traffic
    (torch._foreach_norm; found_inf from the norm being non-finite), used only
    while the compiled norm kernel is missing from the build."""

    def stand_in(grads, inv, found):
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) * inv
        found.copy_(torch.where(torch.isfinite(norm), found, torch.ones_like(found)))
        return norm
    return stand_in


def norm_backend(device) -> str:
    if _has_norm_kernel(device):
        return f"amp_engine.GradScaler, grad_norm_and_check ({ops.available_backends(device)[0]})"
    return "ops spelled out, torch._foreach_norm stand-in for the norm pass"


def default_numel(quick: bool) -> int:
    return 4_000_000 if quick else 50_000_000


def cases(quick: bool, numel: int | None = None):
    total = numel or default_numel(quick)
    label = f"{total / 1e6:g}M params in 200 tensors"
    return [
        (f"fp32 params, {label}", torch.float32, [
            ("A: torch GradScaler+unscale_+clip(foreach)+AdamW(fused)", recipe_a, "A", {}),
            ("C: torch GradScaler+clip(foreach)+AdamW(foreach)", recipe_c, "C_fp32", {}),
            ("amp_engine AdamW", recipe_ours, "ours_fp32", {}),
            ("amp_engine AdamW, bf16 moments", recipe_ours, "ours_fp32_bf16m", BF16_MOMENTS),
            ("amp_engine AdamW, 8-bit moments", recipe_ours, "ours_fp32_m8", MOMENTS8),
        ]),
        (f"bf16 params, {label}", torch.bfloat16, [
            ("B: torch fp32 masters by hand (copy, A, copy back)", recipe_b, "B", {}),
            ("amp_engine AdamW, fp32 masters", recipe_ours, "ours_bf16", {}),
            ("amp_engine AdamW, no master, stochastic rounding", recipe_ours, "ours_sr",
             {"stochastic_rounding": True}),
            ("amp_engine AdamW, fp32 masters, 8-bit moments", recipe_ours, "ours_bf16_m8",
             MOMENTS8),
            ("amp_engine AdamW, no master, stochastic rounding, 8-bit moments", recipe_ours,
             "ours_sr_m8", {"stochastic_rounding": True, **MOMENTS8}),
        ]),
    ]


def run(device: str = "cpu", quick: bool = False, rounds: int | None = None,
        numel: int | None = None):
    """`numel` params in 200 tensors (default 50 M, 4 M with `quick`). Every recipe of a case is built first, then timed in interleaved rounds (each
    round runs each recipe and a plain copy in turn): machine noise hits all alike.
    The copy bandwidth is the median over the rounds of both cases."""
    dev = torch.device(device)
    rounds = rounds or (3 if quick else 7)
    per_round = 2 if not quick else 3
    rows: list[Row] = []
    copies: list[float] = []
    in_place: list[float] = []
    for case, dtype, recipes in cases(quick, numel):
        sizes = _sizes(numel or default_numel(quick), 200)
        n_params = sum(sizes)
        src = torch.ones(n_params, device=dev)  # copy buffer as large as the fp32 params
        dst = torch.empty_like(src)
        built = []
        for impl, make, key, kw in recipes:
            params = _model(sizes, dtype, dev)
            built.append((impl, key, params, make(params, dev, **kw)))
        times: dict[str, list[float]] = {impl: [] for impl, *_ in built}
        for _, _, _, step in built:  # warm-up: lazy state, first-touch page faults
            step()
        memory = {impl: memory_bytes_per_param(step, n_params) for impl, _, _, step in built}
        for _ in range(rounds):
            copies.append(2 * src.numel() * 4 / time_block(lambda: dst.copy_(src), per_round) / 1e9)
            # read + write of the same memory (what an in-place update does: no
            # write-allocate reads, unlike a copy's destination)
            in_place.append(2 * src.numel() * 4 / time_block(lambda: src.mul_(1.0), per_round) / 1e9)
            for impl, _, _, step in built:
                times[impl].append(time_block(step, per_round))
        for impl, key, _, _ in built:
            ts = sorted(times[impl])
            extra = {"bytes_per_param": BYTES[key], "params": n_params, "recipe": key,
                     "memory_bytes_per_param": memory[impl],
                     "rounds": rounds, "steps_per_round": per_round}
            if key.startswith("ours"):
                extra["norm_pass"] = norm_backend(dev)
                extra["step_backend"] = ops.optim_backends(dev)[0]
            rows.append(Row("AMP AdamW step", case, impl, _median(ts) * 1e3,
                            (ts[(3 * len(ts)) // 4] - ts[len(ts) // 4]) * 1e3,
                            BYTES[key] * n_params, extra=extra))
        del built, src, dst
        gc.collect()
    copy_gbps = _median(sorted(copies))
    _finish(rows, copy_gbps)
    env = environment(dev)
    env["in_place_rw_gbps"] = _median(sorted(in_place))
    for r in rows:
        r.extra["pct_in_place_bw"] = 100.0 * r.gbps / env["in_place_rw_gbps"]
    return rows, env, copy_gbps


def time_block(fn, number: int) -> float:
    """Seconds per call of `fn` over `number` calls (torch.utils.benchmark; syncs CUDA)."""
    return timer(fn).timeit(number).mean


def _median(xs: list[float]) -> float:
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _finish(rows: list[Row], copy_gbps: float | None) -> None:
    """GB/s, % of copy bandwidth; speedups vs A (fp32 case) / B (bf16 case) and vs C."""
    base = {r.case: r.median_ms for r in rows if r.extra["recipe"] in ("A", "B")}
    c_base = {r.case: r.median_ms for r in rows if r.extra["recipe"] == "C_fp32"}
    for r in rows:
        r.gbps = r.bytes_moved / (r.median_ms / 1e3) / 1e9
        r.pct_copy_bw = 100.0 * r.gbps / copy_gbps if copy_gbps else None
        if r.case in base:
            r.speedup = base[r.case] / r.median_ms
        if r.case in c_base:
            r.extra["speedup_vs_C"] = c_base[r.case] / r.median_ms


def summary(rows: list[Row]) -> str:
    lines = ["| case | impl | memory B/param | traffic B/param | ms/step | GB/s | % copy BW | "
             "% in-place BW | speedup vs A/B | vs C |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_c = r.extra.get("speedup_vs_C")
        lines.append(f"| {r.case} | {r.impl} | {r.extra['memory_bytes_per_param']:.2f} | "
                     f"{r.extra['bytes_per_param']} | {r.median_ms:.1f} "
                     f"± {r.iqr_ms / 2:.1f} | {r.gbps:.1f} | {r.pct_copy_bw:.0f} | "
                     f"{r.extra['pct_in_place_bw']:.0f} | {r.speedup:.2f}× | "
                     f"{'—' if vs_c is None else f'{vs_c:.2f}×'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); default: torch's")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
    parser.add_argument("--numel", type=int, default=None,
                        help="parameters in all (200 tensors); default 50M, 4M with --quick")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, env, copy_gbps = run(args.device, args.quick, args.rounds, args.numel)
    print(f"# bench_optim on {env.get('gpu', env['cpu'])} ({env['device']}, "
          f"{env['cpu_threads']} threads, torch {env['torch']}); copy bandwidth "
          f"{copy_gbps:.1f} GB/s, in-place read+write {env['in_place_rw_gbps']:.1f} GB/s; "
          f"norm pass: {rows[-1].extra.get('norm_pass')}\n")
    print(summary(rows))
    print()
    print(markdown_table(rows))
    path = write_results(args.output, "bench_optim", rows, env, copy_gbps)
    if path:
        print(f"\nwrote {path}")
    return 0
