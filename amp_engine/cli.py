"""`amp-engine demo | bench | info` (also `python -m amp_engine ...`).

  demo   train a small character-level transformer in fp32 and with amp_engine's mixed
         precision (same seed, same batches); print a comparison table, write JSON + plots
  bench  kernel microbenchmarks against torch's own recipes; markdown table, JSON, bar chart
  info   versions, which kernel backends are built and live on each device (and why not),
         and the CPU's bf16 features

Bad flags exit with status 2 and an argparse message (never a traceback).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import sys

from amp_engine import _optional
from amp_engine.demo.run import (CPU_FP16_STEPS, DEFAULT_BATCH, DEFAULT_STEPS, EMULATED_CPU_BATCH,
                                  EMULATED_CPU_STEPS, default_size)

BENCHES = ("ops", "scaler", "optim")  # amp_engine.bench.<name>_bench, each with run() and main()


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return x


def _device(text: str) -> str:
    """auto, cpu, cuda or cuda:N; CUDA only when a CUDA device is there."""
    if text == "auto":
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but torch sees no CUDA device "
                                             f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return text


def _bench_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BENCHES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(BENCHES)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amp-engine", description="amp_engine: mixed-precision training engine for PyTorch.",
        epilog="Run `amp-engine COMMAND --help` for the flags of each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="train a char-level transformer in fp32 and with AMP, compare",
                          description="Train a small character-level transformer on text shipped with "
                                      "Python, in fp32 and with amp_engine mixed precision (same seed, same "
                                      "batches); print a comparison table and write stats JSON and plots.")
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help=f"training steps per run (default {DEFAULT_STEPS}; {EMULATED_CPU_STEPS} on a CPU "
                           "without native bf16 math, where 16-bit runs are emulated)")
    demo.add_argument("--device", type=_device, default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    demo.add_argument("--dtype", choices=("auto", "bf16", "fp16", "both"), default="auto",
                      help="AMP dtype: auto = fp16 (with loss scaling) and bf16, the fp16 run short on a CPU "
                           f"({CPU_FP16_STEPS} steps: CPUs have no fast fp16 matmul); both = fp16 and bf16, "
                           "all steps (default auto)")
    demo.add_argument("--fp16-steps", type=_positive_int, default=None,
                      help=f"steps of the fp16 run (default: all; {CPU_FP16_STEPS} with --dtype auto on a CPU)")
    demo.add_argument("--memory-efficient", action="store_true",
                      help="one more run with memory_efficient=True: bf16 weights (stochastic rounding, no "
                           "master), bf16 grads and 8-bit Adam moments (~6 bytes/param vs fp32's 16)")
    demo.add_argument("--batch-size", type=_positive_int, default=None,
                      help=f"sequences per step (default {DEFAULT_BATCH}; {EMULATED_CPU_BATCH} on a CPU "
                           "without native bf16 math)")
    demo.add_argument("--output", default="amp_demo_output", help="output folder (default amp_demo_output/)")
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default 0)")
    demo.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    demo.add_argument("--threads", type=_positive_int, default=None,
                      help="CPU threads (default: torch's, fewer when other processes keep cores busy)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (default: bars on a terminal)")

    bench = sub.add_parser("bench", help="kernel microbenchmarks vs torch",
                           description="Time amp_engine's kernels against torch's own recipes on one device: "
                                       "median time, GB/s, %% of the copy bandwidth measured in the same run, "
                                       "speedup. Prints a markdown table; writes JSON and a PNG bar chart.")
    bench.add_argument("--quick", action="store_true", help="small sizes, short timings: a few seconds")
    bench.add_argument("--device", type=_device, default="auto", help="auto (default), cpu, cuda, cuda:N")
    bench.add_argument("--only", type=_bench_list, default=list(BENCHES),
                       help=f"comma-separated benchmarks to run, from {','.join(BENCHES)} (default: all)")
    bench.add_argument("--min-run-time", type=_positive_float, default=None,
                       help="seconds of timing per case (default 0.2 with --quick, else 1.0)")
    bench.add_argument("--numel", type=_positive_int, default=None,
                       help="elements of the large cases (ops, optim; 200 tensors): default 50M, 4M with --quick")
    bench.add_argument("--small-tensors", type=_positive_int, default=None,
                       help="tensors of the small-tensor ops case: default 10000, 1000 with --quick")
    bench.add_argument("--train", action="store_true",
                       help="also time an end-to-end GPT-style training step (torch AMP vs amp_engine; "
                            "slow on a CPU: minutes without --quick)")
    bench.add_argument("--output", default="bench_output", help="output folder (default bench_output/)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG bar chart")

    info = sub.add_parser("info", help="versions, kernel backends per device, CPU bf16 features",
                          description="Versions, which kernel backends are built and live on each device "
                                      "(and why not), and the CPU features that matter for bf16.")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("amp_engine")
    except Exception:  # noqa: BLE001 - a source checkout that was never installed
        return "0.1.0"


def cmd_demo(args) -> int:
    from amp_engine.demo import DemoOptions, run_demo

    steps, batch, why = default_size(args.device)
    if args.steps is None and args.batch_size is None and why:
        print(f"note: {why}")
    steps = steps if args.steps is None else args.steps
    batch = batch if args.batch_size is None else args.batch_size
    opts = DemoOptions(steps=steps, device=args.device, dtype=args.dtype, batch_size=batch,
                       seed=args.seed, output=args.output, plots=not args.no_plots, threads=args.threads,
                       progress=False if args.no_progress else None, memory_efficient=args.memory_efficient,
                       fp16_steps=args.fp16_steps)
    run_demo(opts, echo=print)
    return 0


def cmd_bench(args) -> int:
    import torch

    from amp_engine.bench import common

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows, copy_gbps, env, skipped = [], {}, None, []
    for name in args.only + (["train"] if args.train and "train" not in args.only else []):
        try:
            module = importlib.import_module(f"amp_engine.bench.{name}_bench")
        except ImportError as exc:
            skipped.append(f"{name} ({exc})")
            continue
        accepted = inspect.signature(module.run).parameters
        wanted = {"min_run_time": args.min_run_time, "numel": args.numel,
                  "small_tensors": args.small_tensors}
        kwargs = {k: v for k, v in wanted.items() if v is not None and k in accepted}
        print(f"running {name} benchmarks on {device}{' (quick)' if args.quick else ''} ...", flush=True)
        # run() -> (rows, env) or (rows, env, copy GB/s): overhead benches have no bandwidth
        result = module.run(device, args.quick, **kwargs)
        rows += result[0]
        env = result[1]
        copy_gbps[name] = result[2] if len(result) > 2 else None
    for s in skipped:
        print(f"skipped: {s}")
    if not rows:
        print("no benchmark could run", file=sys.stderr)
        return 1
    where = env.get("gpu", env.get("cpu", "?"))
    bw = ", ".join(f"{n} {g:.1f} GB/s" for n, g in copy_gbps.items() if g)
    bw = f"; copy bandwidth (same run): {bw}" if bw else ""
    print(f"\n# amp-engine bench on {where} ({env['device']}, torch {env['torch']}){bw}\n")
    print(common.markdown_table(rows))
    note = _reference_note(device)
    if note:
        print(f"\nNote: {note}")
    env = {**env, "copy_gbps_per_bench": copy_gbps, "quick": args.quick}
    path = common.write_results(args.output, "bench", rows, env,
                                next((g for g in copy_gbps.values() if g), None))
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = bench_chart(rows, f"{args.output}/bench.png",
                          f"amp_engine vs torch — {where} ({env['device']}, torch {env['torch']})")
        print(f"wrote {png}")
    return 0


def _reference_note(device: str) -> str | None:
    """Why amp_engine's rows ran the plain-torch reference, if they did (not our kernels)."""
    from amp_engine.ops.dispatch import available_backends, unavailable_reason

    if available_backends(device)[0] != "reference":
        return None
    compiled = "cuda" if device.startswith("cuda") else "cpp"
    return (f"amp_engine's rows ran the plain-torch reference backend, not compiled kernels "
            f"({compiled!r}: {unavailable_reason(compiled, device)}); rebuild with `pip install .` "
            "and check `amp-engine info`.")


def bench_chart(rows, path: str, title: str) -> str:
    """A PNG of amp_engine's speedup over torch per (bench, case): horizontal bars,
    one per amp_engine row (torch's own rows are the 1× line), log axis, labels
    that stay readable with dozens of rows."""
    matplotlib = _optional.require("matplotlib", "the benchmark chart (--no-plot skips it)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.speedup is not None and not r.impl.startswith("torch")]
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(13, 1.6 + 0.38 * max(1, len(shown))))
    ys = range(len(shown))[::-1]  # first row on top
    colors = ["tab:green" if r.speedup >= 1 else "tab:red" for r in shown]
    ax.barh(list(ys), [r.speedup for r in shown], color=colors, height=0.7)
    for y, r in zip(ys, shown):
        ax.annotate(f" {r.speedup:.2f}×", (r.speedup, y), va="center", fontsize=8)
    ax.set_yticks(list(ys), [f"{r.bench} | {r.case} | {r.impl}" for r in shown], fontsize=8)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1, label="torch = 1×")
    ax.set_xscale("log")
    speedups = [r.speedup for r in shown] or [1.0]
    ax.set_xlim(min(0.5, min(speedups) / 1.5), max(2.0, max(speedups) * 1.6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.set_xlabel("speedup vs torch's recipe in the same run (log axis; right of 1× = faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_info(args) -> int:
    facts = collect_info()
    print(json.dumps(facts, indent=1) if args.json else render_info(facts))
    return 0


_DEVICE_BACKENDS = {"cpu": ("cpp", "triton", "reference"), "cuda": ("cuda", "triton", "reference")}


def collect_info() -> dict:
    """{versions, build, backends: {device: {backend: {built, live, why_not}}}, default_backend, cpu}."""
    import importlib.util
    import platform

    import torch

    import amp_engine
    from amp_engine import _extension
    from amp_engine import hardware
    from amp_engine.ops.dispatch import available_backends, unavailable_reason

    try:
        from importlib.metadata import version

        triton_version = version("triton")
    except Exception:  # noqa: BLE001 - not installed (e.g. macOS, Windows)
        triton_version = None
    cuda_live = torch.cuda.is_available()
    versions = {
        "amp_engine": amp_engine.__version__,
        "amp_engine_path": amp_engine.__path__[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda_live,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda_live else [],
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    has_triton_kernels = importlib.util.find_spec("amp_engine.ops.triton.scaling") is not None
    built = {
        "cpp": _extension.has_kernels("CPU"),
        "cuda": _extension.has_kernels("CUDA"),
        "triton": triton_version is not None and has_triton_kernels,
        "reference": True,
    }
    backends, default = {}, {}
    for dev, names in _DEVICE_BACKENDS.items():
        backends[dev] = {}
        for b in names:
            why = unavailable_reason(b, dev)
            backends[dev][b] = {"built": built[b], "live": why is None, "why_not": why}
        live = available_backends(dev)
        default[dev] = live[0] if live else None
    cpu = {"model": hardware.cpu_model(), "cores": __import__("os").cpu_count(),
           "torch_threads": torch.get_num_threads(), **hardware.bf16_support()}
    return {"versions": versions, "build": amp_engine.build_info(), "backends": backends,
            "default_backend": default, "cpu": cpu}


def render_info(facts: dict) -> str:
    v, b, cpu = facts["versions"], facts["build"], facts["cpu"]
    cuda = f"torch built with CUDA {v['torch_cuda']}" if v["torch_cuda"] else "torch built without CUDA"
    cuda += "; devices: " + ", ".join(v["cuda_devices"]) if v["cuda_available"] else "; no CUDA device visible"
    lines = [
        f"amp_engine {v['amp_engine']} ({v['amp_engine_path']})",
        "",
        "== Versions",
        f"  torch       {v['torch']}",
        f"  CUDA        {cuda}",
        f"  Triton      {v['triton'] or 'not installed'}",
        f"  Python      {v['python']} on {v['platform']}",
        "",
        "== Build (compiled op library amp_engine._C)",
        f"  loaded      {'yes' if b['extension_loaded'] else 'no: ' + str(b['load_error'])}",
        f"  compiled    against torch {b.get('torch_compiled') or '?'}, CUDA {b.get('cuda_compiled') or 'none'}"
        + (f" (archs {b['cuda_arch_list']})" if b.get("cuda_arch_list") else "")
        + (", CPU tuned for the build machine (-march=native)" if b.get("cpu_native") else ""),
        f"  kernels     CPU {'yes' if b['cpu_kernels'] else 'no'}, CUDA {'yes' if b['cuda_kernels'] else 'no'}"
        + (f" ({b['cuda_kernels_reason']})" if b.get("cuda_kernels_reason") else ""),
        "",
        "== Backends (built / live on each device; the default comes first in the list that is live)",
    ]
    for dev, rows in facts["backends"].items():
        lines.append(f"  {dev}: default {facts['default_backend'][dev] or 'none'}")
        for name, r in rows.items():
            state = "live" if r["live"] else f"not live: {r['why_not']}"
            lines.append(f"    {name:<10} built {'yes' if r['built'] else 'no ':<3}  {state}")
    flags = ", ".join(f"{f} {'yes' if on else 'no'}" for f, on in cpu["flags"].items())
    lines += [
        "",
        "== CPU (bf16)",
        f"  model       {cpu['model']} ({cpu['cores']} cores, torch uses {cpu['torch_threads']} threads)",
        f"  torch ISA   {cpu['capability']}",
        f"  flags       {flags}",
        f"  bf16        {cpu['summary']}",
    ]
    return "\n".join(lines)


COMMANDS = {"demo": cmd_demo, "bench": cmd_bench, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `amp-engine` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
