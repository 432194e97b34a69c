"""get_amp_stats arithmetic after known step sequences, reset, and the JSON file."""
import json

import pytest

from amp_engine.trainer.memory import GB
from amp_engine.trainer.stats import TrainerStats, json_safe, save_json

from .helpers import CE, InfAt, blobs, make_trainer

X, Y = blobs(64)
BATCH = (X[:16], Y[:16])

REQUIRED = {"total_steps", "amp_steps", "scaler_updates", "overflow_count", "current_scale",
            "amp_usage_ratio", "overflow_ratio", "avg_memory_savings", "avg_step_time"}
EXTRAS = {"skipped_steps", "top_overflow_params", "peak_memory_bytes", "peak_memory_gb",
          "optimizer_steps", "applied_steps"}


def test_trainer_stats_arithmetic():
    s = TrainerStats()
    assert s.as_dict()["amp_usage_ratio"] == 0.0 and s.as_dict()["overflow_ratio"] == 0.0
    assert s.as_dict()["avg_step_time"] == 0.0 and s.as_dict()["avg_memory_savings"] == 0.0
    for amp, t in ((True, 0.1), (True, 0.3), (False, 0.2), (True, 0.2)):
        s.record_step(amp, t)
    for through_scaler, skipped in ((True, False), (True, True), (False, False), (True, True)):
        s.record_optimizer_step(through_scaler, skipped)
    s.record_memory({"savings_bytes": 3e9, "amp_bytes": 10})
    s.record_memory({"savings_bytes": 1e9, "amp_bytes": 30})
    d = s.as_dict()
    assert (d["total_steps"], d["amp_steps"], d["scaler_updates"], d["overflow_count"]) == (4, 3, 3, 2)
    assert d["amp_usage_ratio"] == 0.75 and d["overflow_ratio"] == pytest.approx(2 / 3)
    assert d["avg_step_time"] == pytest.approx(0.2) and d["avg_memory_savings"] == pytest.approx(2.0)
    assert (d["optimizer_steps"], d["skipped_steps"], d["applied_steps"]) == (4, 2, 2)
    assert d["peak_memory_bytes"] == 30 and d["peak_memory_gb"] == 30 / GB


def test_known_sequence_of_clean_overflow_and_disabled_steps():
    t = make_trainer(dtype="fp16")
    bad = InfAt({1, 6})
    times = []
    plan = ["amp", "amp", "amp", "off", "off", "on", "amp", "amp"]  # calls 1 and 6 overflow
    for what in plan:
        if what == "off":
            t.disable_amp()
        elif what == "on":
            t.enable_amp()
        times.append(t.train_step(BATCH, bad, "cpu")["step_time"])
    s = t.get_amp_stats()
    assert REQUIRED | EXTRAS <= set(s)
    assert s["total_steps"] == 8 and s["amp_steps"] == 6
    assert s["scaler_updates"] == 6 and s["overflow_count"] == 2 and s["skipped_steps"] == 2
    assert s["optimizer_steps"] == 8 and s["applied_steps"] == 6
    assert s["amp_usage_ratio"] == 6 / 8 and s["overflow_ratio"] == 2 / 6
    assert s["current_scale"] == 2.0**14  # two back-offs from 2**16
    assert s["avg_step_time"] == pytest.approx(sum(times) / 8)
    # most non-finite grad elements first: every element overflowed, twice
    top = [(d["name"], d["count"]) for d in s["top_overflow_params"]]
    assert top == [("0.weight", 2 * 128), ("2.weight", 2 * 48), ("0.bias", 2 * 16), ("2.bias", 2 * 3)]


def test_accumulation_counts_micro_batches_and_windows():
    t = make_trainer(dtype="bf16", gradient_accumulation_steps=3)
    for _ in range(7):
        t.train_step(BATCH, CE, "cpu")
    s = t.get_amp_stats()
    assert s["total_steps"] == 7 and s["optimizer_steps"] == 2 and s["scaler_updates"] == 2
    t.flush_accumulation()
    assert t.get_amp_stats()["optimizer_steps"] == 3


def test_fp32_trainer_stats():
    t = make_trainer(enable_amp=False)
    t.train_step(BATCH, CE, "cpu")
    s = t.get_amp_stats()
    assert s["amp_steps"] == 0 and s["scaler_updates"] == 0 and s["current_scale"] == 1.0
    assert s["amp_usage_ratio"] == 0.0 and s["overflow_ratio"] == 0.0 and not s["scaler_enabled"]


def test_reset_stats_keeps_the_scale():
    t = make_trainer(dtype="fp16")
    bad = InfAt({0})
    for _ in range(2):
        t.train_step(BATCH, bad, "cpu")
    t.reset_stats()
    s = t.get_amp_stats()
    assert s["total_steps"] == s["overflow_count"] == s["scaler_updates"] == 0
    assert s["top_overflow_params"] == [] and s["current_scale"] == 2.0**15
    t.train_step(BATCH, InfAt({0}), "cpu")
    s = t.get_amp_stats()
    assert s["overflow_count"] == 1 and s["top_overflow_params"][0]["count"] == 16 * 8  # since the reset


def test_save_amp_stats_creates_folders_and_round_trips(tmp_path):
    t = make_trainer(dtype="fp16", track_memory_usage=True)
    t.train_step(BATCH, InfAt({0}), "cpu")
    t.train_step(BATCH, CE, "cpu")
    path = tmp_path / "runs" / "a" / "b" / "amp.json"
    assert t.save_amp_stats(str(path)) == str(path)
    data = json.loads(path.read_text())
    assert set(data) == {"amp_stats", "config"}
    assert data["amp_stats"] == json_safe(t.get_amp_stats())
    assert data["amp_stats"]["overflow_count"] == 1 and data["config"]["dtype"] == "float16"
    assert data["amp_stats"]["last_memory_measurement"]["savings_bytes"] > 0


def test_json_is_strict():
    nested = {"a": float("nan"), "b": [float("inf"), 1.5, (2, 3)], "c": {"d": None}, 4: object}
    out = json_safe(nested)
    assert out["a"] is None and out["b"] == [None, 1.5, [2, 3]] and out["4"].startswith("<class")
    json.dumps(out, allow_nan=False)


def test_save_json_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_json("plain.json", {"x": 1})
    assert json.loads((tmp_path / "plain.json").read_text()) == {"x": 1}
