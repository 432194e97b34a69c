"""`amp-engine bench`: the table, the JSON and the chart, at tiny sizes."""
import json

import pytest

from amp_engine.bench import ops_bench
from amp_engine.cli import main


def test_bench_quick_table(tmp_path, capsys, monkeypatch):
    # tiny cases: the test checks the plumbing, not the numbers
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the demo extra)")
    monkeypatch.setattr(ops_bench, "cases", lambda quick, *sizes: [("tiny fp32 in 4 tensors", [1000, 5, 123, 4097])])
    assert main(["bench", "--quick", "--only", "ops", "--device", "cpu", "--min-run-time", "0.01",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| bench | case | impl | median ms | IQR ms | GB/s | % copy BW | speedup |" in out
    assert "| unscale+check | tiny fp32 in 4 tensors | torch |" in out
    assert "| norm+check | tiny fp32 in 4 tensors | amp_engine (" in out
    assert "copy bandwidth (same run): ops " in out
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert {r["bench"] for r in doc["rows"]} == {"unscale+check", "norm+check"}
    assert all(r["median_ms"] > 0 for r in doc["rows"])
    assert doc["environment"]["copy_gbps_per_bench"]["ops"] > 0
    with open(tmp_path / "bench.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_reference_backend_is_called_out(monkeypatch):
    """When amp_engine's rows ran the plain-torch reference, the output says so (not our kernels)."""
    from amp_engine import cli
    from amp_engine.ops import dispatch

    monkeypatch.setattr(dispatch, "available_backends", lambda device="cpu": ["reference"])
    note = cli._reference_note("cpu")
    assert note is not None and "reference backend" in note and "'cpp'" in note
    monkeypatch.setattr(dispatch, "available_backends", lambda device="cpu": ["cpp", "reference"])
    assert cli._reference_note("cpu") is None


def test_bench_sizes_selectable(tmp_path, capsys):
    assert main(["bench", "--only", "ops", "--device", "cpu", "--min-run-time", "0.01", "--no-plot",
                 "--numel", "2000", "--small-tensors", "7", "--output", str(tmp_path)]) == 0
    cases = {r["case"] for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert cases == {"0.002M fp32 in 200 tensors", "7 small fp32 tensors"}


def test_train_bench_tiny(tmp_path, capsys, monkeypatch):
    """`amp-engine bench --train`: three recipes per case, and the bytes per parameter
    each keeps match what the recipe holds (counted independently here)."""
    from amp_engine.bench import train_bench

    monkeypatch.setitem(train_bench.SIZES, "tiny", (32, 1, 2))
    monkeypatch.setattr(train_bench, "cases", lambda quick, device: [("tiny", 2, 8)])
    assert main(["bench", "--quick", "--only", "scaler", "--train", "--device", "cpu", "--no-plot",
                 "--min-run-time", "0.01", "--output", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = [r for r in doc["rows"] if r["bench"] == "train step"]
    assert [r["impl"] for r in rows] == [train_bench.TORCH, train_bench.DROP_IN, train_bench.FULL]
    assert rows[0]["speedup"] == 1.0 and all(r["median_ms"] > 0 for r in rows)
    assert all(0 < r["extra"]["optimizer_share"] < 1 for r in rows)
    n = rows[0]["case"]
    assert n.startswith("tiny (")
    # fp32 params + fp32 grads + exp_avg + exp_avg_sq = 16 B/param (+ a few step scalars);
    # bf16 params + bf16 grads + fp32 master + moments = 16 too (the memory issue lowers it)
    for r in rows:
        assert 16.0 <= r["extra"]["bytes_per_param"] < 16.2, r


def test_state_bytes_per_param_counts_each_tensor_once():
    import torch

    from amp_engine.bench.train_bench import state_bytes_per_param

    p = torch.nn.Parameter(torch.zeros(10))
    model = torch.nn.Module()
    model.p = p
    p.grad = torch.zeros(10)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["buf"] = p.grad  # the same tensor twice: counted once
    opt.state[p]["m"] = torch.zeros(10, dtype=torch.bfloat16)
    assert state_bytes_per_param(model, opt) == (40 + 40 + 20) / 10


def test_benchmarks_time_at_the_threads_they_report():
    """torch.utils.benchmark.Timer runs one thread unless told: the benchmarks' timer
    must run the intra-op thread count the environment line reports."""
    import torch

    from amp_engine.bench import common, optim_bench

    before = torch.get_num_threads()
    seen = []
    try:
        torch.set_num_threads(2)
        common.time_fn(lambda: seen.append(torch.get_num_threads()), min_run_time=0.001)
        optim_bench.time_block(lambda: seen.append(torch.get_num_threads()), 1)
        assert common.environment("cpu")["cpu_threads"] == 2
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}
