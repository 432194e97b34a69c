"""Shared benchmark machinery: timing, copy bandwidth, environment, output.

Timing uses torch.utils.benchmark (it synchronizes CUDA around each run);
results are medians with the interquartile range. Every speedup is measured
against the torch recipe in the same run, and every bandwidth is reported
beside the plain copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.utils.benchmark as tbench

from amp_engine import _optional
from amp_engine.hardware import cpu_model


@dataclass
class Timing:
    median_s: float
    iqr_s: float
    runs: int


@dataclass
class Row:
    """One measured case of one implementation."""

    bench: str                  # e.g. "unscale+check"
    case: str                   # e.g. "50M fp32 in 200 tensors"
    impl: str                   # e.g. "amp_engine (cpp)" or "torch"
    median_ms: float
    iqr_ms: float
    bytes_moved: int = 0        # bytes read + written per call (0: not meaningful)
    gbps: float | None = None
    pct_copy_bw: float | None = None
    speedup: float | None = None  # baseline time / this time (baseline: same bench+case)
    extra: dict = field(default_factory=dict)


def sync(device: torch.device | str) -> None:
    """Wait for `device`'s queued work (CUDA), so host timers measure the device's work too."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timer(fn: Callable[[], object]) -> tbench.Timer:
    """A torch.utils.benchmark Timer of `fn()` at this process's intra-op thread count:
    Timer's own default is one thread, which would time every CPU benchmark
    single-threaded whatever --threads (and the reported cpu_threads) said."""
    return tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())


def time_fn(fn: Callable[[], object], *, min_run_time: float = 1.0) -> Timing:
    """Median and IQR of `fn()` over repeated blocks (warm-up included)."""
    fn()  # warm-up: first-call costs (allocations, autotune, page faults)
    m = timer(fn).blocked_autorange(min_run_time=min_run_time)
    return Timing(median_s=m.median, iqr_s=m.iqr, runs=len(m.times))


def copy_bandwidth_gbps(nbytes: int, device: torch.device | str, *, min_run_time: float = 0.5) -> float:
    """Effective GB/s of `dst.copy_(src)` for an `nbytes` buffer (counts read + write)."""
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), min_run_time=min_run_time)
    return 2 * n * 4 / t.median_s / 1e9


def finish_rows(rows: Sequence[Row], copy_gbps: float | None, baseline_impl: str) -> None:
    """Fill GB/s, % of copy bandwidth and speedup vs `baseline_impl` (same bench+case)."""
    base = {(r.bench, r.case): r.median_ms for r in rows if r.impl == baseline_impl}
    for r in rows:
        if r.bytes_moved:
            r.gbps = r.bytes_moved / (r.median_ms / 1e3) / 1e9
            if copy_gbps:
                r.pct_copy_bw = 100.0 * r.gbps / copy_gbps
        b = base.get((r.bench, r.case))
        if b is not None:
            r.speedup = b / r.median_ms


def environment(device: torch.device | str) -> dict:
    """Hardware and versions, carried with every result file."""
    dev = torch.device(device)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(dev),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import amp_engine
        from amp_engine.ops import available_backends

        env["amp_engine"] = amp_engine.__version__
        env["backends"] = available_backends(dev)
    except Exception:  # noqa: BLE001 - reporting only
        pass
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["cuda"] = torch.version.cuda
    return env


def markdown_table(rows: Sequence[Row]) -> str:
    head = "| bench | case | impl | median ms | IQR ms | GB/s | % copy BW | speedup |"
    lines = [head, "|" + "---|" * 8]

    def f(x, fmt):
        return "—" if x is None else format(x, fmt)

    for r in rows:
        lines.append(
            f"| {r.bench} | {r.case} | {r.impl} | {r.median_ms:.3f} | {r.iqr_ms:.3f} | "
            f"{f(r.gbps, '.1f')} | {f(r.pct_copy_bw, '.0f')} | {f(r.speedup, '.2f')}× |"
        )
    return "\n".join(lines)


def write_results(out_dir: str | None, name: str, rows: Sequence[Row], env: dict,
                  copy_gbps: float | None = None) -> str | None:
    """Write `<out_dir>/<name>.json`; returns the path (None without out_dir)."""
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as fh:
        json.dump({"environment": env, "copy_gbps": copy_gbps,
                   "rows": [asdict(r) for r in rows]}, fh, indent=1)
    return path


def bar_chart(rows: Sequence[Row], path: str, title: str) -> str:
    """A PNG bar chart of speedups (one bar per non-baseline row)."""
    matplotlib = _optional.require("matplotlib", "the benchmark chart (--no-plot skips it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.speedup is not None]
    labels = [f"{r.bench}\n{r.case}\n{r.impl}" for r in shown]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(shown)), 4.5))
    ax.bar(range(len(shown)), [r.speedup for r in shown], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="torch = 1×")
    ax.set_xticks(range(len(shown)), labels, fontsize=7)
    ax.set_ylabel("speedup vs torch (×, higher is better)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds in all")
    p.add_argument("--output", default=None, help="folder for the JSON results")
    return p
