"""The demo's run plan, its fp16 run (the loss scaler at work) and its memory-efficient
run (params + grads + optimizer state per parameter, counted by hand here)."""
import json
import math

import pytest

from amp_engine import _optional
from amp_engine.cli import main
from amp_engine.demo import CharTransformer, DemoOptions, ModelShape, load_corpus, run_demo
from amp_engine.demo.run import CPU_FP16_STEPS

STEPS = 6
PLOTS = _optional.available("matplotlib")  # the demo extra; a torch-only environment has none


@pytest.fixture(scope="module")
def lowmem_run(tmp_path_factory):
    """The CPU default (fp32, fp16, bf16) plus --memory-efficient; growth_interval 2 so the
    fp16 scale grows within 6 steps."""
    out = tmp_path_factory.mktemp("demo_lowmem")
    lines = []
    result = run_demo(DemoOptions(steps=STEPS, batch_size=4, device="cpu", output=str(out), plots=PLOTS,
                                  progress=False, threads=1, memory_efficient=True, growth_interval=2),
                      echo=lines.append)
    return result, out, "\n".join(lines)


def test_the_runs_in_table_and_json(lowmem_run):
    result, out, text = lowmem_run
    names = ["fp32", "fp16", "bf16", "bf16-lowmem"]
    assert list(result["runs"]) == names
    assert list(json.loads((out / "demo_summary.json").read_text())["runs"]) == names
    for name in names:
        assert f"| {name} |" in text
        assert (out / f"stats_{name}.json").exists()
    assert "| state B/param |" in result["table"].splitlines()[0]
    assert (out / "memory.png").exists() or not PLOTS


def _hand_count(memory_efficient: bool) -> float:
    """Bytes per parameter after a step, from the model's tensor sizes alone.

    fp32 run: param 4 + grad 4 + two fp32 moments 8, and a 4-byte step per tensor.
    memory-efficient bf16: weights and grads 2 + 2 (LayerNorm params stay fp32: 4 + 4);
    tensors of >= 4,096 elements keep 8-bit moments (2 bytes + two fp32 absmax per
    256-element block, the last block ragged), smaller ones fp32 moments (8).
    """
    corpus = load_corpus()
    model = CharTransformer(ModelShape(corpus.vocab_size, 64, 128, 2, 4))
    norm = {id(p) for m in model.modules() if type(m).__name__ == "LayerNorm" for p in m.parameters()}
    total = n = 0
    for p in model.parameters():
        k = p.numel()
        n += k
        if not memory_efficient:
            total += 16 * k + 4
            continue
        weights = 8 * k if id(p) in norm else 4 * k
        moments = 2 * k + 8 * math.ceil(k / 256) if k >= 4096 else 8 * k
        total += weights + moments + 4
    return total / n


def test_state_bytes_per_param_by_hand(lowmem_run):
    runs = lowmem_run[0]["runs"]
    for name in ("fp32", "fp16", "bf16"):  # fp32 weights, fp32 moments (no masters for fp32 params)
        assert runs[name]["state_bytes_per_param"] == pytest.approx(_hand_count(False), rel=1e-12)
    low = runs["bf16-lowmem"]
    assert low["state_bytes_per_param"] == pytest.approx(_hand_count(True), rel=1e-12)
    assert low["state_bytes_per_param"] < 6.5 and low["state_ratio_vs_fp32"] < 0.41
    assert low["state_breakdown"]["optimizer_state"] < 2.5 and low["memory_efficient"] is True
    assert sum(low["state_breakdown"].values()) == pytest.approx(low["state_bytes_per_param"])


def test_lowmem_loss_beside_fp32(lowmem_run):
    result, _, text = lowmem_run
    runs = result["runs"]
    assert runs["bf16-lowmem"]["steps"] == STEPS
    assert runs["bf16-lowmem"]["final_val_loss"] == pytest.approx(runs["fp32"]["final_val_loss"], rel=0.02)
    assert "bf16-lowmem: params + grads + optimizer state" in text


def test_fp16_scale_moves(lowmem_run):
    result, out, text = lowmem_run
    fp16 = result["runs"]["fp16"]
    scales = json.loads((out / "stats_fp16.json").read_text())["history"]["scale"]
    assert len(set(scales)) > 1  # grew (every 2 clean steps) or backed off (an overflow)
    assert fp16["min_scale"] == min(scales) and fp16["max_scale"] == max(scales)
    assert fp16["max_scale"] > fp16["min_scale"]
    assert "fp16: the loss scale moved between" in text
    assert isinstance(fp16["overflows"], list)
    assert fp16["skipped_steps"] == sum(json.loads((out / "stats_fp16.json").read_text())["history"]["skipped"])
    bf16 = result["runs"]["bf16"]
    assert bf16["min_scale"] == bf16["max_scale"] == 1.0


def test_run_plan():
    cpu = dict(device="cpu")
    assert [(r.name, r.steps) for r in DemoOptions(steps=150, **cpu).runs()] == \
        [("fp32", 150), ("fp16", CPU_FP16_STEPS), ("bf16", 150)]
    assert [(r.name, r.steps) for r in DemoOptions(steps=150, dtype="both", **cpu).runs()] == \
        [("fp32", 150), ("fp16", 150), ("bf16", 150)]
    assert DemoOptions(steps=150, fp16_steps=40, **cpu).steps_of("fp16") == 40
    assert DemoOptions(steps=10, **cpu).steps_of("fp16") == 10
    plan = DemoOptions(dtype="fp16", memory_efficient=True, **cpu).runs()
    assert [(r.name, r.amp_dtype, r.memory_efficient) for r in plan] == \
        [("fp32", None, False), ("fp16", "fp16", False), ("fp16-lowmem", "fp16", True)]
    with pytest.raises(ValueError, match="fp16_steps"):
        DemoOptions(fp16_steps=0)
    with pytest.raises(ValueError, match="memory_efficient"):
        DemoOptions(memory_efficient="yes")


def test_cli_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--fp16-steps", "0"])
    assert exc.value.code == 2
    assert "argument --fp16-steps: expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["demo", "--steps", "3", "--fp16-steps", "2", "--batch-size", "2", "--device", "cpu",
                 "--dtype", "fp16", "--memory-efficient", "--no-plots", "--no-progress", "--threads", "1",
                 "--output", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "demo_summary.json").read_text())["runs"]
    assert list(runs) == ["fp32", "fp16", "fp16-lowmem"]
    assert runs["fp16"]["steps"] == runs["fp16-lowmem"]["steps"] == 2 and runs["fp32"]["steps"] == 3
    # fp16 weights with fp32 masters and 8-bit moments: ~10 bytes/param
    assert 9 < runs["fp16-lowmem"]["state_bytes_per_param"] < 11
    assert "| fp16-lowmem |" in capsys.readouterr().out


def test_default_size_shrinks_only_where_16_bit_math_is_emulated():
    from amp_engine.demo.run import DEFAULT_BATCH, DEFAULT_STEPS, default_size

    steps, batch, why = default_size("cpu", native_bf16=False)
    assert (steps, batch) != (DEFAULT_STEPS, DEFAULT_BATCH) and steps < DEFAULT_STEPS and batch < DEFAULT_BATCH
    assert "no native bf16" in why and f"--steps {DEFAULT_STEPS} --batch-size {DEFAULT_BATCH}" in why
    assert default_size("cpu", native_bf16=True) == (DEFAULT_STEPS, DEFAULT_BATCH, None)
    assert default_size("cpu", native_bf16=None)[:2] in ((DEFAULT_STEPS, DEFAULT_BATCH), (steps, batch))


def test_cli_uses_the_short_size_unless_told(monkeypatch, capsys):
    """`amp-engine demo` on an emulated-bf16 CPU: the short run, with a note; the flags win."""
    from amp_engine import cli
    from amp_engine.demo import run as demo_run

    seen = []
    monkeypatch.setattr("amp_engine.demo.run_demo", lambda opts, echo=None: seen.append(opts))
    monkeypatch.setattr(cli, "default_size", lambda device: demo_run.default_size(device, native_bf16=False))
    assert cli.main(["demo", "--device", "cpu", "--no-plots"]) == 0
    assert (seen[-1].steps, seen[-1].batch_size) == (demo_run.EMULATED_CPU_STEPS, demo_run.EMULATED_CPU_BATCH)
    assert "no native bf16" in capsys.readouterr().out
    assert cli.main(["demo", "--device", "cpu", "--steps", "7", "--no-plots"]) == 0
    assert (seen[-1].steps, seen[-1].batch_size) == (7, demo_run.EMULATED_CPU_BATCH)
    assert "note:" not in capsys.readouterr().out
    assert cli.main(["demo", "--device", "cpu", "--batch-size", "3", "--no-plots"]) == 0
    assert (seen[-1].steps, seen[-1].batch_size) == (demo_run.EMULATED_CPU_STEPS, 3)
