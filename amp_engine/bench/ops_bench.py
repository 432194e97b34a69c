"""unscale+check and norm+check against torch's own kernels on the same grads.

torch baselines:
  unscale+check: torch._amp_foreach_non_finite_check_and_unscale_ (what GradScaler.unscale_ runs)
  norm+check:    that same unscale pass + torch._foreach_norm (what unscale_ + clip_grad_norm_
                 need to produce the unscaled norm and found_inf); _foreach_norm alone is
                 reported too, for reference.
inv_scale is 1.0 in the timed loops: repeatedly unscaling the same grads by 1/scale would
drive them subnormal, which is 50x slower on CPUs and measures nothing useful.
"""
from __future__ import annotations

import torch

from amp_engine import ops
from amp_engine.bench.common import (Row, arg_parser, copy_bandwidth_gbps, environment, finish_rows,
                                     markdown_table, time_fn, write_results)


def cases(quick: bool, numel: int | None = None, small_tensors: int | None = None
          ) -> list[tuple[str, list[int]]]:
    """The large case (`numel` fp32 elements in 200 tensors; default 50 M, 4 M quick)
    and the small-tensor case (`small_tensors` tensors of 50-1000 elements)."""
    gen = torch.Generator().manual_seed(0)
    n_large = numel or (4_000_000 if quick else 50_000_000)
    n_small = small_tensors or (1_000 if quick else 10_000)
    small = torch.randint(50, 1000, (n_small,), generator=gen).tolist()
    return [
        (f"{n_large / 1e6:g}M fp32 in 200 tensors", [n_large // 200] * 200),
        (f"{n_small} small fp32 tensors", small),
    ]


def run(device: str = "cpu", quick: bool = False, min_run_time: float | None = None,
        numel: int | None = None, small_tensors: int | None = None) -> tuple[list[Row], dict, float]:
    dev = torch.device(device)
    mrt = min_run_time if min_run_time is not None else (0.2 if quick else 1.0)
    rows: list[Row] = []
    backend = ops.available_backends(dev)[0]
    copy_gbps = None
    for case, sizes in cases(quick, numel, small_tensors):
        grads = [torch.randn(n, device=dev) for n in sizes]
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        if copy_gbps is None:
            copy_gbps = copy_bandwidth_gbps(nbytes, dev, min_run_time=mrt)
        inv = torch.ones((), device=dev)
        found = torch.zeros((), device=dev)
        counts = torch.zeros(len(grads), dtype=torch.int64, device=dev)

        def ours_unscale():
            ops.unscale_and_check_(grads, inv, found, counts)

        def torch_unscale():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)

        def ours_norm():
            return ops.grad_norm_and_check(grads, inv, found, counts)

        def torch_norm_and_check():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

        def torch_norm_only():
            return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

        for bench, impl, fn, moved in [
            ("unscale+check", "torch", torch_unscale, 2 * nbytes),
            ("unscale+check", f"amp_engine ({backend})", ours_unscale, 2 * nbytes),
            ("norm+check", "torch", torch_norm_and_check, 3 * nbytes),
            ("norm+check", f"amp_engine ({backend})", ours_norm, nbytes),
            ("norm+check", "torch _foreach_norm only (no check)", torch_norm_only, nbytes),
        ]:
            t = time_fn(fn, min_run_time=mrt)
            rows.append(Row(bench, case, impl, t.median_s * 1e3, t.iqr_s * 1e3, moved))
        del grads
    finish_rows(rows, copy_gbps, baseline_impl="torch")
    return rows, environment(dev), copy_gbps


def main(argv=None) -> int:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=None,
                        help="elements of the large case (200 tensors); default 50M, 4M with --quick")
    parser.add_argument("--small-tensors", type=int, default=None,
                        help="tensors of the small case; default 10000, 1000 with --quick")
    args = parser.parse_args(argv)
    rows, env, copy_gbps = run(args.device, args.quick, numel=args.numel, small_tensors=args.small_tensors)
    print(f"# bench_ops on {env.get('gpu', env['cpu'])} ({env['device']}, torch {env['torch']}); "
          f"copy bandwidth {copy_gbps:.1f} GB/s\n")
    print(markdown_table(rows))
    path = write_results(args.output, "bench_ops", rows, env, copy_gbps)
    if path:
        print(f"\nwrote {path}")
    return 0
