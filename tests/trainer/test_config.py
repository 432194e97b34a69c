"""MixedPrecisionConfig: defaults, validation and the JSON round trip."""
import json

import pytest
import torch

from amp_engine import MixedPrecisionConfig
from amp_engine.trainer.config import field_names

ISSUE_DEFAULTS = {
    "enable_amp": True, "dtype": torch.float16, "enabled": True, "enable_grad_scaler": True,
    "init_scale": 2**16, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
    "cache_enabled": True, "autocast_enabled": True, "memory_efficient": False, "clear_cache": True,
    "enable_monitoring": True, "log_amp_stats": True, "track_memory_usage": True, "validate_amp": True,
    "check_compatibility": True, "gradient_accumulation_steps": 1, "max_grad_norm": None,
}


def test_defaults_are_the_documented_ones():
    cfg = MixedPrecisionConfig()
    for name, value in ISSUE_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
    assert isinstance(cfg.init_scale, float)


@pytest.mark.parametrize("given,expected", [
    ("fp16", torch.float16), ("float16", torch.float16), ("half", torch.float16),
    ("bf16", torch.bfloat16), ("BFloat16", torch.bfloat16), (torch.bfloat16, torch.bfloat16),
])
def test_dtype_names(given, expected):
    assert MixedPrecisionConfig(dtype=given).dtype is expected


@pytest.mark.parametrize("given,exc", [
    (torch.float32, ValueError), (torch.float64, ValueError), ("fp8", ValueError), (16, TypeError),
])
def test_dtype_rejected_with_allowed_values(given, exc):
    with pytest.raises(exc, match="dtype") as info:
        MixedPrecisionConfig(dtype=given)
    assert "bfloat16" in str(info.value) and "float16" in str(info.value)


@pytest.mark.parametrize("field,value,exc,allowed", [
    ("enable_amp", 1, TypeError, "bool"),
    ("enabled", "yes", TypeError, "bool"),
    ("validate_amp", None, TypeError, "bool"),
    ("growth_interval", 0, ValueError, ">= 1"),
    ("growth_interval", 2.5, TypeError, "int"),
    ("growth_interval", True, TypeError, "int"),
    ("gradient_accumulation_steps", 0, ValueError, ">= 1"),
    ("init_scale", -1.0, ValueError, "> 0"),
    ("init_scale", float("inf"), ValueError, "finite"),
    ("init_scale", "big", TypeError, "float"),
    ("growth_factor", 1.0, ValueError, "> 1.0"),
    ("backoff_factor", 1.0, ValueError, "(0, 1)"),
    ("backoff_factor", 0.0, ValueError, "> 0"),
    ("max_grad_norm", 0.0, ValueError, "> 0"),
    ("max_grad_norm", float("nan"), ValueError, "> 0"),
    ("hysteresis", 0, ValueError, ">= 1"),
    ("min_scale", 0.0, ValueError, "> 0"),
    ("floor_patience", 0, ValueError, ">= 1"),
    ("memory_interval", -1, ValueError, ">= 0"),
    ("progress_bar", "auto", TypeError, "bool or None"),
    ("validate_tolerance", 0, ValueError, "> 0"),
])
def test_bad_values_name_the_field(field, value, exc, allowed):
    with pytest.raises(exc) as info:
        MixedPrecisionConfig(**{field: value})
    assert field in str(info.value) and allowed in str(info.value)


def test_scale_bounds_are_consistent():
    with pytest.raises(ValueError, match="min_scale"):
        MixedPrecisionConfig(min_scale=4.0, max_scale=2.0)
    with pytest.raises(ValueError, match="init_scale"):
        MixedPrecisionConfig(init_scale=2.0**20, max_scale=2.0**10)
    cfg = MixedPrecisionConfig(init_scale=8, min_scale=1, max_scale=2**10)
    assert (cfg.init_scale, cfg.min_scale, cfg.max_scale) == (8.0, 1.0, 1024.0)


def test_optional_fields_accept_none_and_numbers():
    cfg = MixedPrecisionConfig(max_grad_norm=1, progress_bar=None)
    assert cfg.max_grad_norm == 1.0 and isinstance(cfg.max_grad_norm, float)
    assert MixedPrecisionConfig(max_grad_norm=None).max_grad_norm is None


def test_amp_requested_needs_both_switches():
    assert MixedPrecisionConfig().amp_requested
    assert not MixedPrecisionConfig(enable_amp=False).amp_requested
    assert not MixedPrecisionConfig(enabled=False).amp_requested


def test_json_round_trip_of_every_field():
    cfg = MixedPrecisionConfig(dtype="bf16", max_grad_norm=1.5, gradient_accumulation_steps=4,
                               min_scale=2.0**-10, progress_bar=False, fused_optimizer=True)
    data = cfg.to_dict()
    assert set(data) == set(field_names())
    assert data["dtype"] == "bfloat16"
    text = json.dumps(data, allow_nan=False)  # strict JSON
    back = MixedPrecisionConfig.from_dict(json.loads(text))
    assert back == cfg


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(TypeError, match="unknown MixedPrecisionConfig field.*'lr'"):
        MixedPrecisionConfig.from_dict({"lr": 0.1})
    with pytest.raises(TypeError, match="dict"):
        MixedPrecisionConfig.from_dict([("dtype", "bf16")])


def test_replace_validates():
    cfg = MixedPrecisionConfig()
    assert cfg.replace(dtype="bf16").dtype is torch.bfloat16
    with pytest.raises(ValueError, match="growth_interval"):
        cfg.replace(growth_interval=0)


def test_every_field_has_an_effect_test():
    """Each field is set by some behaviour test of the trainer (not only validated here)."""
    import pathlib
    import re

    here = pathlib.Path(__file__).parent
    text = "\n".join(p.read_text() for p in here.glob("test_*.py") if p.name != "test_config.py")
    missing = [f for f in field_names() if not re.search(rf'(\b{f}=|"{f}")', text)]
    assert missing == []
