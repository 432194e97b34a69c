"""The demo's results: per-run summaries, the comparison table, the verdict,
and the JSON files.

Output folder (documented keys, checked by tests/cli):
  demo_summary.json   {"options", "environment", "corpus", "model", "runs": {name: summary},
                       "verdict", "table", "files"}
  stats_<run>.json    {"name", "summary", "history": {step, loss, accuracy, step_time_s, scale,
                       skipped, grad_norm}, "validation": {step, loss}, "amp_stats"}
  amp_stats_<run>.json  the trainer's own `save_amp_stats` output
A summary holds SUMMARY_KEYS. ``state_bytes_per_param`` / ``state_breakdown``: params +
grads + optimizer state per parameter (fp32 training with AdamW: 16 bytes);
``overflows``: the parameters whose grads overflowed ({name, count}: non-finite
elements), from the trainer's overflow report.
"""
from __future__ import annotations

import json
import os
import statistics

from amp_engine.demo.run import RunRecord

SUMMARY_KEYS = (
    "steps", "steps_per_s", "tokens_per_s", "median_step_ms", "activation_mb", "state_mb", "peak_mb",
    "final_train_loss", "final_val_loss", "skipped_steps", "final_scale", "speedup_vs_fp32",
    "memory_ratio_vs_fp32", "wall_s", "state_bytes_per_param", "state_breakdown", "state_ratio_vs_fp32",
    "min_scale", "max_scale", "overflows", "memory_efficient",
)
HISTORY_KEYS = ("step", "loss", "accuracy", "step_time_s", "scale", "skipped", "grad_norm")
_MB = 1024 * 1024


def warmup_steps(n: int) -> int:
    """Steps left out of throughput: first calls pay for allocation and kernel selection."""
    return min(3, n // 5)


def summarize(records: dict[str, RunRecord], tokens_per_step: int) -> dict[str, dict]:
    """One summary per run; ratios are against the "fp32" run."""
    out = {}
    for name, r in records.items():
        timed = r.step_time_s[warmup_steps(len(r.step_time_s)):]
        tail = r.loss[-max(1, min(10, len(r.loss) // 5)):]  # mean of the last steps: one batch is noisy
        scales = [s for s in r.scale if s is not None]
        out[name] = {
            "steps": len(r.step),
            "steps_per_s": len(timed) / sum(timed),
            "tokens_per_s": len(timed) * tokens_per_step / sum(timed),
            "median_step_ms": 1e3 * statistics.median(timed),
            "activation_mb": r.activation_bytes / _MB,
            "state_mb": r.state_bytes / _MB,
            "peak_mb": None if r.peak_bytes is None else r.peak_bytes / _MB,
            "final_train_loss": sum(tail) / len(tail),
            "final_val_loss": r.val_loss[-1],
            "skipped_steps": sum(r.skipped),
            "final_scale": scales[-1] if scales else None,
            "min_scale": min(scales) if scales else None,
            "max_scale": max(scales) if scales else None,
            "overflows": [{"name": o["name"], "count": o["count"]}
                          for o in (r.amp_stats or {}).get("top_overflow_params", [])],
            "wall_s": r.wall_s,
            "memory_efficient": r.memory_efficient,
            "state_breakdown": {k: v / r.n_params for k, v in r.state_parts.items()} if r.n_params else {},
            "state_bytes_per_param": r.state_bytes / r.n_params if r.n_params else None,
        }
    base = out.get("fp32")
    for s in out.values():
        s["speedup_vs_fp32"] = base["median_step_ms"] / s["median_step_ms"] if base else None
        mem_key = "peak_mb" if s["peak_mb"] is not None else "activation_mb"
        s["memory_ratio_vs_fp32"] = s[mem_key] / base[mem_key] if base and base[mem_key] else None
        s["state_ratio_vs_fp32"] = (s["state_bytes_per_param"] / base["state_bytes_per_param"]
                                    if base and base["state_bytes_per_param"] and s["state_bytes_per_param"]
                                    else None)
    return out


def markdown_table(summaries: dict[str, dict]) -> str:
    cuda = any(s["peak_mb"] is not None for s in summaries.values())
    head = ["run", "steps/s", "tokens/s", "median step ms", "activations MB"]
    head += ["peak MB"] if cuda else []
    head += ["state B/param", "train loss", "val loss", "steps", "skipped", "final scale", "overflows",
             "speedup", "memory vs fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, fmt, suffix=""):
        return "—" if x is None else format(x, fmt) + suffix

    for name, s in summaries.items():
        cells = [name, f(s["steps_per_s"], ".2f"), f(s["tokens_per_s"], ",.0f"), f(s["median_step_ms"], ".1f"),
                 f(s["activation_mb"], ".1f")]
        cells += [f(s["peak_mb"], ".1f")] if cuda else []
        state = f(s["state_bytes_per_param"], ".1f")
        if s["state_ratio_vs_fp32"] is not None and name != "fp32":
            state += f" ({s['state_ratio_vs_fp32']:.2f}×)"
        overflows = ", ".join(f"{o['name']} ({o['count']})" for o in s["overflows"][:2]) or "—"
        cells += [state, f(s["final_train_loss"], ".3f"), f(s["final_val_loss"], ".3f"), str(s["steps"]),
                  str(s["skipped_steps"]), f(s["final_scale"], "g"), overflows,
                  f(s["speedup_vs_fp32"], ".2f", "×"), f(s["memory_ratio_vs_fp32"], ".2f", "×")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(summaries: dict[str, dict], device_type: str, bf16: dict, threads_note: str | None) -> list[str]:
    """Plain sentences: speed, memory and loss of each AMP run vs fp32, and why
    an AMP run was slower when it was (never hidden)."""
    base = summaries.get("fp32")
    if base is None:
        return []
    lines, why = [], []
    for name, s in summaries.items():
        if name == "fp32":
            continue
        sp, mem = s["speedup_vs_fp32"], s["memory_ratio_vs_fp32"]
        what = "peak memory" if s["peak_mb"] is not None else "saved activations"
        if sp >= 1.05:
            speed = f"{sp:.2f}× as fast as fp32"
        elif sp > 0.95:
            speed = f"about as fast as fp32 ({sp:.2f}×)"
        else:
            speed = f"SLOWER than fp32 ({sp:.2f}×: each step takes {1 / sp:.1f}× as long)"
            why.append(_why_slower(name, device_type, bf16))
        lines.append(f"AMP ({name}): {speed}; {what} {mem:.2f}× fp32's; final val loss "
                     f"{s['final_val_loss']:.3f} (fp32: {base['final_val_loss']:.3f})"
                     + (f" after {s['steps']} of {base['steps']} steps" if s["steps"] != base["steps"] else "") + ".")
        if s["memory_efficient"] and s["state_bytes_per_param"]:
            lines.append(f"  {name}: params + grads + optimizer state {s['state_bytes_per_param']:.1f} bytes/param "
                         f"(fp32: {base['state_bytes_per_param']:.1f}, {s['state_ratio_vs_fp32']:.2f}×): "
                         "low-precision weights and grads, 8-bit Adam moments.")
        if s["max_scale"] is not None and s["max_scale"] != s["min_scale"]:
            where = "; overflows in " + ", ".join(o["name"] for o in s["overflows"][:3]) if s["overflows"] else ""
            lines.append(f"  {name}: the loss scale moved between {_scale(s['min_scale'])} and "
                         f"{_scale(s['max_scale'])} (final {_scale(s['final_scale'])}); "
                         f"{s['skipped_steps']} skipped step(s){where}.")
    lines += [f"Why slower: {w}" for w in dict.fromkeys(why)]
    if threads_note and device_type == "cpu":
        lines.append(f"CPU threads: {threads_note}. Timings on a shared machine are noisy.")
    return lines


def _scale(x: float) -> str:
    """A loss scale for reading: 1,048,576 rather than 1.04858e+06."""
    return f"{x:,.0f}" if x >= 1 else f"{x:g}"


def _why_slower(name: str, device_type: str, bf16: dict) -> str:
    if device_type != "cpu":
        return ("a model this small leaves the GPU waiting on kernel launches and casts; "
                "AMP's speed shows with larger matmuls (try a larger --batch-size)")
    if name == "fp16":
        return ("CPUs have no fast fp16 matrix math (torch emulates it), so fp16 on a CPU only "
                "demonstrates loss scaling: use bf16 on CPUs and fp16 on GPUs")
    if bf16.get("native_bf16"):
        return (f"{bf16['summary']}. A model this small spends much of each step on casts, "
                "LayerNorm, softmax and the optimizer, which bf16 does not speed up")
    return bf16["summary"]


def json_files(out_dir: str, names) -> list[str]:
    """The paths write_json writes: demo_summary.json, then stats_<run>.json per run."""
    return [os.path.join(out_dir, "demo_summary.json")] + [os.path.join(out_dir, f"stats_{n}.json") for n in names]


def write_json(out_dir: str, records: dict[str, RunRecord], summaries: dict[str, dict], meta: dict) -> list[str]:
    """Write demo_summary.json and stats_<run>.json; returns their paths (json_files)."""
    os.makedirs(out_dir, exist_ok=True)
    for name, r in records.items():
        path = os.path.join(out_dir, f"stats_{name}.json")
        doc = {
            "name": name,
            "summary": summaries[name],
            "history": {k: getattr(r, k) for k in HISTORY_KEYS},
            "validation": {"step": r.val_step, "loss": r.val_loss},
            "amp_stats": r.amp_stats,
        }
        with open(path, "w") as fh:
            json.dump(doc, fh, indent=1, default=_jsonable)
    path = os.path.join(out_dir, "demo_summary.json")
    with open(path, "w") as fh:
        json.dump({**meta, "runs": summaries}, fh, indent=1, default=_jsonable)
    return json_files(out_dir, records)


def _jsonable(x):
    """torch dtypes, devices and 0-dim tensors that may sit in the trainer's stats."""
    try:
        import torch

        if torch.is_tensor(x):
            return x.tolist()
    except ImportError:
        pass
    return str(x)
