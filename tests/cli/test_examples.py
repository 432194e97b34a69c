"""The two thin wrappers: examples/mixed_precision_demo.py (async) and run_mixed_precision_demo.py."""
import asyncio
import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load(path: pathlib.Path):
    if not path.exists():
        pytest.skip(f"{path.name} is not in this checkout")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_async_demo(tmp_path):
    mod = _load(ROOT / "examples" / "mixed_precision_demo.py")
    lines = []
    result = asyncio.run(mod.demonstrate_mixed_precision_training(
        steps=3, device="cpu", batch_size=2, output=str(tmp_path), plots=False, progress=False,
        echo=lines.append))
    assert set(result["runs"]) == {"fp32", "fp16", "bf16"}  # the default: fp16 shows the loss scaler
    assert result["runs"]["bf16"]["steps"] == result["runs"]["fp16"]["steps"] == 3
    assert any("| bf16 |" in line for line in lines)
    assert json.loads((tmp_path / "demo_summary.json").read_text())["table"] == result["table"]


def test_top_level_script(tmp_path, capsys):
    mod = _load(ROOT / "run_mixed_precision_demo.py")
    assert mod.run(["--steps", "2", "--batch-size", "2", "--device", "cpu", "--no-plots", "--no-progress",
                    "--output", str(tmp_path)]) == 0
    assert "| fp32 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        mod.run(["--steps", "nope"])
    assert exc.value.code == 2
