"""`amp-engine demo`: a character-level transformer trained in fp32 and with
amp_engine's mixed precision, same seed, same batches, compared in a table and
in pictures. Also behind `examples/mixed_precision_demo.py` and
`run_mixed_precision_demo.py`.

    from amp_engine.demo import DemoOptions, run_demo
    result = run_demo(DemoOptions(steps=40, output="out"))
    result["runs"]["bf16"]["speedup_vs_fp32"]
"""
from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable

import torch

from amp_engine import hardware
from amp_engine.demo import report
from amp_engine.demo.corpus import load_corpus
from amp_engine.demo.model import CharTransformer, ModelShape
from amp_engine.demo.ranks import Ranks
from amp_engine.demo.ranks import session as ranks_session
from amp_engine.demo.run import DemoOptions, options_dict, run_all

logger = logging.getLogger(__name__)

__all__ = ["DemoOptions", "run_demo", "CharTransformer", "ModelShape", "load_corpus"]


def run_demo(opts: DemoOptions, echo: Callable[[str], None] | None = None) -> dict:
    """Run the demo; returns the content of demo_summary.json.

    `echo` receives the human-readable lines (the CLI passes `print`); by
    default they go to this module's logger at INFO. Under torchrun (or in a
    process group that is already up) every rank trains its slice of each batch
    with DDP; rank 0 prints and writes (amp_engine.demo.ranks).
    """
    with ranks_session(opts) as (ranks, opts):
        echo = (echo or logger.info) if ranks.main else (lambda line: None)
        device = opts.resolved_device()
        threads_before = torch.get_num_threads()
        threads_note = None
        if device.type == "cpu":
            threads, threads_note = (opts.threads, f"{opts.threads} (--threads)") if opts.threads \
                else hardware.default_threads(ranks.world)
            torch.set_num_threads(threads)
        try:
            return _run(opts, echo, device, threads_note, ranks)
        finally:
            torch.set_num_threads(threads_before)  # a library call leaves the process as it found it


def _run(opts: DemoOptions, echo: Callable[[str], None], device: torch.device, threads_note: str | None,
         ranks: Ranks) -> dict:
    corpus = load_corpus()
    shape = ModelShape(corpus.vocab_size, opts.context, opts.d_model, opts.n_layers, opts.n_heads)
    n_params = CharTransformer(shape).num_parameters()
    bf16 = hardware.bf16_support()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{hardware.cpu_model()} ({_plural(torch.get_num_threads(), 'thread')})"
    runs = [r.name + (f" ({r.steps} steps)" if r.steps != opts.steps else "") for r in opts.runs()]
    echo(f"amp_engine demo: {n_params / 1e6:.2f}M-parameter character transformer "
         f"({opts.n_layers} layers, d_model {opts.d_model}, context {opts.context}), "
         f"{opts.steps} steps x batch {opts.batch_size}, runs: {', '.join(runs)}")
    if any(r.steps != opts.steps for r in opts.runs()):
        echo("(fp16 on a CPU: torch has no fast fp16 matrix math there, so the fp16 run is short: "
             "it shows the loss scaler at work; --fp16-steps N changes it)")
    echo(f"device: {device} — {where}")
    if device.type == "cpu":
        echo(f"CPU bf16: {bf16['summary']}")
    echo(f"text: {corpus.n_chars:,} characters of {corpus.source}")

    if ranks.world > 1:
        echo(f"{ranks.world} processes (DistributedDataParallel): each trains on 1/{ranks.world} of every batch")
    records = run_all(opts, corpus, echo, ranks)
    summaries = report.summarize(records, opts.batch_size * opts.context)
    table = report.markdown_table(summaries)
    verdict = report.verdict(summaries, device.type, bf16, threads_note)
    echo("")
    echo(table)
    echo("")
    for line in verdict:
        echo(line)

    meta = {
        "options": options_dict(opts),
        "environment": {"device": str(device), "where": where, "torch": torch.__version__, "processes": ranks.world,
                        "python": platform.python_version(), "cpu_bf16": bf16, "threads": threads_note},
        "corpus": {"source": corpus.source, "chars": corpus.n_chars, "train_chars": len(corpus.train),
                   "val_chars": len(corpus.val), "vocab_size": corpus.vocab_size},
        "model": {"parameters": n_params, "context": opts.context, "d_model": opts.d_model,
                  "n_layers": opts.n_layers, "n_heads": opts.n_heads},
        "verdict": verdict,
        "table": table,
        "files": [],
    }
    if not ranks.main:  # rank 0 writes the files
        return {**meta, "runs": summaries}
    files = report.json_files(opts.output, records)
    files += [os.path.join(opts.output, f"amp_stats_{name}.json") for name in records]
    if opts.plots:
        from amp_engine.demo.plots import save_plots

        subtitle = f"{where}, torch {torch.__version__}, {opts.steps} steps"
        files += save_plots(opts.output, records, summaries, subtitle)
    meta["files"] = files
    report.write_json(opts.output, records, summaries, meta)
    echo("")
    echo(f"wrote {len(files)} files to {opts.output}/: " + ", ".join(sorted(f.rsplit('/', 1)[-1] for f in files)))
    return {**meta, "runs": summaries}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
