"""Mixed precision in one call: train a small character-level transformer in
fp32 and with amp_engine's mixed precision, and compare (the `amp-engine demo`
command, as an async function for applications that run an event loop).

    import asyncio
    from mixed_precision_demo import demonstrate_mixed_precision_training

    result = asyncio.run(demonstrate_mixed_precision_training(steps=40))
    print(result["table"])

Run as a script: `python examples/mixed_precision_demo.py` (same as `amp-engine demo`).
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from amp_engine.demo import DemoOptions, run_demo
from amp_engine.demo.run import DEFAULT_STEPS


async def demonstrate_mixed_precision_training(steps: int = DEFAULT_STEPS, *, device: str = "auto", dtype: str = "auto",
                                               batch_size: int = 32, seed: int = 0,
                                               output: str = "amp_demo_output", plots: bool = True,
                                               progress: bool | None = None,
                                               echo: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Train fp32 and AMP runs of the demo model and return the results.

    The training runs in a worker thread (``asyncio.to_thread``), so the event
    loop stays responsive. Arguments are the flags of ``amp-engine demo``
    (``dtype``: "auto", "bf16", "fp16" or "both"); ``echo`` receives the
    report lines (None: logged instead of printed).

    Returns the content of ``<output>/demo_summary.json``: ``runs`` (one summary
    per run: steps_per_s, tokens_per_s, median_step_ms, activation_mb,
    final_train_loss, final_val_loss, skipped_steps, final_scale,
    speedup_vs_fp32, memory_ratio_vs_fp32, ...), ``table`` (markdown),
    ``verdict`` (sentences), ``files`` and the run's options and environment.
    """
    opts = DemoOptions(steps=steps, device=device, dtype=dtype, batch_size=batch_size, seed=seed,
                       output=output, plots=plots, progress=progress)
    return await asyncio.to_thread(run_demo, opts, echo)


if __name__ == "__main__":
    asyncio.run(demonstrate_mixed_precision_training())
