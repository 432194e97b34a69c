"""`amp-engine bench`: the table, the JSON and the chart, at tiny sizes."""
import json

from amp_engine.bench import ops_bench
from amp_engine.cli import main


def test_bench_quick_table(tmp_path, capsys, monkeypatch):
    # tiny cases: the test checks the plumbing, not the numbers
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
