"""The demo's pictures (PNG, matplotlib's Agg backend: no display needed).

loss_curves.png   train loss (raw, faint, and smoothed) and validation loss per run
loss_scale.png    the loss scale over steps per AMP run, skipped steps marked
step_times.png    the distribution of step times per run, medians marked
memory.png        params + grads + optimizer state in bytes per parameter (stacked), and saved
                  activations (and CUDA peak) in MB, per run, ratio to fp32
overview.png      all four in one figure (the README picture)
"""
from __future__ import annotations

import os
import statistics

from amp_engine import _optional
from amp_engine.demo.run import RunRecord

COLORS = {"fp32": "tab:blue", "bf16": "tab:orange", "fp16": "tab:green", "bf16-lowmem": "tab:purple",
          "fp16-lowmem": "tab:brown"}
_PARTS = (("params", "params", ""), ("grads", "grads", "//"), ("optimizer_state", "optimizer state", "xx"))
PLOT_FILES = ("loss_curves.png", "loss_scale.png", "step_times.png", "memory.png", "overview.png")


def _color(name: str) -> str:
    return COLORS.get(name, "tab:purple")


def _smooth(xs: list[float], span: int | None = None) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing) over
    about a twentieth of ``span`` steps (default: this run's), so short runs are not
    dominated by the lag; runs drawn together share the longest run's span."""
    beta = 1.0 - 1.0 / max(1.0, (span or len(xs)) / 20)
    out, avg = [], 0.0
    for i, x in enumerate(xs, 1):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta**i))
    return out


def draw_loss(ax, records: dict[str, RunRecord]) -> None:
    span = max(len(r.loss) for r in records.values())  # a short run (CPU fp16) smooths like the others
    for i, (name, r) in enumerate(records.items()):
        c = _color(name)
        ax.plot(r.step, r.loss, color=c, alpha=0.25, linewidth=0.8)
        # later runs drawn thinner on top, so curves that coincide stay visible
        ax.plot(r.step, _smooth(r.loss, span), color=c, linewidth=max(1.2, 3.6 - 1.2 * i),
                label=f"{name} train (smoothed)")
        ax.plot(r.val_step, r.val_loss, color=c, marker="o", linestyle="--", markersize=4,
                label=f"{name} validation")
    final = {n: r.val_loss[-1] for n, r in records.items() if r.val_loss}
    if "fp32" in final and len(final) > 1:
        note = ", ".join(f"{n} {v:.3f}" for n, v in final.items())
        ax.text(0.5, 0.97, f"final validation loss: {note}", transform=ax.transAxes, ha="center", va="top",
                fontsize=8, color="dimgray")
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy loss (nats / character)")
    ax.set_title("Loss: fp32 vs AMP (same seed, same batches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")


def draw_scale(ax, records: dict[str, RunRecord]) -> None:
    drawn = False
    for name, r in records.items():
        pts = [(s, v) for s, v in zip(r.step, r.scale) if v is not None]
        if not pts:
            continue
        drawn = True
        steps, scales = zip(*pts)
        ax.step(steps, scales, where="post", color=_color(name), linewidth=2, label=f"{name} loss scale")
        skipped = [(s, v) for s, v, k in zip(r.step, r.scale, r.skipped) if k and v is not None]
        n_skip = sum(r.skipped)
        if skipped:
            xs, ys = zip(*skipped)
            ax.scatter(xs, ys, marker="x", s=50, color="tab:red", zorder=3,
                       label=f"{name} skipped step (inf/nan grads): {n_skip}")
            worst = (r.amp_stats or {}).get("top_overflow_params") or []
            if worst:
                ax.annotate(f"overflow: {worst[0]['name']} ({worst[0]['count']} non-finite)", (xs[0], ys[0]),
                            xytext=(8, -14), textcoords="offset points", fontsize=7, color="tab:red")
        else:
            ax.plot([], [], " ", label=f"{name}: no skipped steps")
        if len(set(scales)) == 1 and name == "bf16":
            ax.annotate(f"bf16 has fp32's exponent range: nothing to scale around, the scale stays "
                        f"{scales[0]:g}\n(the scaler still checks every gradient and would skip a bad step)",
                        (steps[0], scales[0] * 1.15), ha="left", va="bottom", fontsize=8, color=_color(name))
    if drawn:
        ax.set_yscale("log", base=2)
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no AMP run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss scale (log2 axis)")
    ax.set_title("Dynamic loss scale (halves on overflow, grows after clean steps)")
    ax.grid(alpha=0.3)


def draw_step_times(ax, records: dict[str, RunRecord]) -> None:
    all_ms = [1e3 * t for r in records.values() for t in r.step_time_s]
    lo, hi = min(all_ms), _quantile(all_ms, 0.98)  # the few warm-up outliers would squash the rest
    nb = max(10, min(40, len(all_ms) // 8))
    log = hi > 3 * lo  # runs of very different speeds (fp16 on a CPU): log axis, log bins
    if hi <= lo:
        bins = 10
    elif log:
        bins = [lo * (hi / lo) ** (i / nb) for i in range(nb + 1)]
    else:
        bins = [lo + (hi - lo) * i / nb for i in range(nb + 1)]
    for name, r in records.items():
        ms = [1e3 * t for t in r.step_time_s]
        med = statistics.median(ms)
        ax.hist([min(m, hi) for m in ms], bins=bins, color=_color(name), alpha=0.5,
                label=f"{name} (median {med:.1f} ms)")
        ax.axvline(med, color=_color(name), linestyle="--", linewidth=1.5)
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step time (ms" + (", log axis" if log else "") + "; slower outliers piled up at the right edge)")
    ax.set_ylabel("number of steps")
    ax.set_title("Step time distribution (dashed: median)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def draw_memory(ax, summaries: dict[str, dict]) -> None:
    """Two panels in ``ax``'s place: params + grads + optimizer state in bytes per
    parameter (stacked by part), and saved activations (and CUDA peak) in MB."""
    fig, spec = ax.figure, ax.get_subplotspec()
    ax.remove()
    left, right = (fig.add_subplot(g) for g in spec.subgridspec(1, 2, width_ratios=(1.1, 1), wspace=0.3))
    _draw_state(left, summaries)
    _draw_activations(right, summaries)


def _draw_state(ax, summaries: dict[str, dict]) -> None:
    from matplotlib.patches import Patch

    names = [n for n in summaries if summaries[n].get("state_breakdown")]
    base = summaries.get("fp32", {}).get("state_bytes_per_param")
    for i, n in enumerate(names):
        bottom = 0.0
        for key, _, hatch in _PARTS:
            v = summaries[n]["state_breakdown"].get(key, 0.0)
            ax.bar(i, v, bottom=bottom, width=0.7, color=_color(n), hatch=hatch, edgecolor="black")
            bottom += v
        note = f"{bottom:.1f}" + (f"\n{bottom / base:.2f}×" if base and n != "fp32" else "")
        ax.annotate(note, (i, bottom), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=8, rotation=20)
    ax.set_ylabel("bytes per parameter")
    ax.set_title("params + grads + optimizer state", fontsize=10)
    top = max((summaries[n]["state_bytes_per_param"] or 0.0) for n in names) if names else 1.0
    ax.set_ylim(0, 1.45 * top)  # room for the labels and the legend above the bars
    ax.legend(handles=[Patch(facecolor="white", edgecolor="black", hatch=h, label=label) for _, label, h in _PARTS],
              fontsize=7, loc="upper center", ncol=3, columnspacing=0.8, handlelength=1.5)
    ax.grid(alpha=0.3, axis="y")


def _draw_activations(ax, summaries: dict[str, dict]) -> None:
    from matplotlib.patches import Patch

    names = list(summaries)
    kinds = [("saved activations", "activation_mb", None)]
    if any(s["peak_mb"] is not None for s in summaries.values()):
        kinds.append(("CUDA peak", "peak_mb", ".."))
    width = 0.8 / len(names)
    for g, (_, key, hatch) in enumerate(kinds):
        base = summaries.get("fp32", {}).get(key)
        for i, n in enumerate(names):
            v = summaries[n][key] or 0.0
            x = g + (i - (len(names) - 1) / 2) * width
            ax.bar(x, v, width=width * 0.95, color=_color(n), hatch=hatch, edgecolor="black")
            note = f"{v:.1f}" + (f"\n{v / base:.2f}×" if base and n != "fp32" else "")
            ax.annotate(note, (x, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(kinds)), [k[0] for k in kinds])
    ax.set_ylabel("memory (MB)")
    ax.set_title("per training step (ratio to fp32 above)", fontsize=10)
    ax.margins(y=0.2)
    ax.legend(handles=[Patch(facecolor=_color(n), edgecolor="black", label=n) for n in names], fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def save_plots(out_dir: str, records: dict[str, RunRecord], summaries: dict[str, dict],
               subtitle: str) -> list[str]:
    """Write PLOT_FILES into `out_dir`; returns their paths."""
    matplotlib = _optional.require("matplotlib", "the demo's plots (--no-plots skips them)")
    matplotlib.use("Agg")  # files only; never opens a window
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    draws = [
        (lambda ax: draw_loss(ax, records)),
        (lambda ax: draw_scale(ax, records)),
        (lambda ax: draw_step_times(ax, records)),
        (lambda ax: draw_memory(ax, summaries)),
    ]
    paths = []
    for fname, draw in zip(PLOT_FILES, draws):
        fig, ax = plt.subplots(figsize=(8, 5))
        draw(ax)
        fig.text(0.99, 0.005, subtitle, ha="right", va="bottom", fontsize=7, color="gray")
        fig.tight_layout(rect=(0, 0.02, 1, 1))
        paths.append(os.path.join(out_dir, fname))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9.5))
    for ax, draw in zip(axes.flat, draws):
        draw(ax)
    fig.suptitle(f"amp_engine demo: fp32 vs mixed precision — {subtitle}", fontsize=12)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, PLOT_FILES[-1]))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths
