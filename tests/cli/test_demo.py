"""`amp-engine demo` at tiny size: the files it writes and what they hold."""
import json
import os

import pytest

pytest.importorskip("matplotlib", reason="the demo run here draws its plots: pip install 'amp_engine[demo]'")

from amp_engine.cli import main  # noqa: E402
from amp_engine.demo.plots import PLOT_FILES  # noqa: E402
from amp_engine.demo.report import HISTORY_KEYS, SUMMARY_KEYS  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEPS = 6


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny demo with every run kind the CPU can do: fp32, fp16 (loss scaling), bf16."""
    out = tmp_path_factory.mktemp("demo")
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["demo", "--steps", str(STEPS), "--batch-size", "4", "--dtype", "both", "--device", "cpu",
                   "--output", str(out), "--no-progress", "--threads", "1"])
    return rc, out, buf.getvalue()


def test_exit_status_and_table(demo_run):
    rc, _, text = demo_run
    assert rc == 0
    assert "| run | steps/s | tokens/s | median step ms |" in text
    for run in ("fp32", "fp16", "bf16"):
        assert f"| {run} |" in text
    # the verdict names each AMP run and its speed relative to fp32, whichever way it went
    assert "AMP (bf16)" in text and "AMP (fp16)" in text


def test_pngs_are_valid_images(demo_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg

    _, out, _ = demo_run
    for name in PLOT_FILES:
        path = out / name
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG_SIGNATURE, name
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 500, (name, img.shape)
        assert img[..., :3].std() > 0.05, f"{name} looks blank"


def test_summary_json(demo_run):
    _, out, _ = demo_run
    doc = json.loads((out / "demo_summary.json").read_text())
    for key in ("options", "environment", "corpus", "model", "runs", "verdict", "table", "files"):
        assert key in doc, key
    assert list(doc["runs"]) == ["fp32", "fp16", "bf16"]
    for name, s in doc["runs"].items():
        assert set(SUMMARY_KEYS) <= set(s), (name, set(SUMMARY_KEYS) - set(s))
        assert s["steps"] == STEPS
        assert s["steps_per_s"] > 0 and s["tokens_per_s"] == pytest.approx(s["steps_per_s"] * 4 * 64)
        assert 0 < s["final_val_loss"] < 10
    assert doc["runs"]["fp32"]["speedup_vs_fp32"] == pytest.approx(1.0)
    assert doc["runs"]["fp32"]["final_scale"] is None
    # autocast saves the matmul inputs in 16 bits: fewer activation bytes than fp32
    assert doc["runs"]["bf16"]["memory_ratio_vs_fp32"] < 0.9
    assert doc["runs"]["fp16"]["final_scale"] > 1  # the fp16 run scales its loss
    assert doc["runs"]["bf16"]["final_scale"] == 1.0  # bf16: range of fp32, scale pinned at 1
    for f in doc["files"]:
        assert os.path.exists(f), f


def test_stats_json_per_run(demo_run):
    _, out, _ = demo_run
    for name in ("fp32", "fp16", "bf16"):
        doc = json.loads((out / f"stats_{name}.json").read_text())
        assert {"name", "summary", "history", "validation", "amp_stats"} <= set(doc)
        hist = doc["history"]
        assert set(hist) == set(HISTORY_KEYS)
        assert all(len(hist[k]) == STEPS for k in HISTORY_KEYS)
        assert hist["step"] == list(range(1, STEPS + 1))
        assert doc["validation"]["step"][-1] == STEPS
        assert doc["amp_stats"]["total_steps"] == STEPS
        assert doc["amp_stats"]["amp_steps"] == (0 if name == "fp32" else STEPS)
        trainer_doc = json.loads((out / f"amp_stats_{name}.json").read_text())
        assert trainer_doc["amp_stats"]["total_steps"] == STEPS


def test_same_batches_same_start(demo_run):
    """Same seed, same batches: the first loss (before any update) agrees across precisions."""
    _, out, _ = demo_run
    first = {n: json.loads((out / f"stats_{n}.json").read_text())["history"]["loss"][0]
             for n in ("fp32", "fp16", "bf16")}
    assert first["fp16"] == pytest.approx(first["fp32"], rel=1e-2)
    assert first["bf16"] == pytest.approx(first["fp32"], rel=3e-2)


def test_no_plots_writes_json_only(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--batch-size", "2", "--device", "cpu", "--output", str(tmp_path),
                 "--no-plots", "--no-progress", "--threads", "1"]) == 0
    files = sorted(os.listdir(tmp_path))
    assert not [f for f in files if f.endswith(".png")]
    assert {"demo_summary.json", "stats_fp32.json", "stats_bf16.json"} <= set(files)
    assert "| bf16 |" in capsys.readouterr().out


def test_threads_restored_after_demo(tmp_path):
    import torch

    from amp_engine.demo import DemoOptions, run_demo

    before = torch.get_num_threads()
    run_demo(DemoOptions(steps=1, batch_size=2, device="cpu", output=str(tmp_path), plots=False, progress=False,
                         threads=1 if before > 1 else 2), echo=lambda line: None)
    assert torch.get_num_threads() == before
