"""`amp-engine info`: its sections, and JSON that agrees with the library."""
import json

import torch

import amp_engine
from amp_engine.cli import main
from amp_engine.ops import available_backends


def test_info_sections(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for section in ("== Versions", "== Build", "== Backends", "== CPU (bf16)"):
        assert section in out, section
    assert f"amp_engine {amp_engine.__version__}" in out
    assert torch.__version__ in out
    assert "cpu: default " + available_backends("cpu")[0] in out
    assert "reference" in out and "avx512_bf16" in out and "torch ISA" in out


def test_info_json_matches_the_library(capsys):
    assert main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["versions"]["torch"] == torch.__version__
    assert facts["default_backend"]["cpu"] == available_backends("cpu")[0]
    for dev in ("cpu", "cuda"):
        for name, row in facts["backends"][dev].items():
            assert row["live"] == (row["why_not"] is None), (dev, name)
            assert row["live"] == (name in available_backends(dev)), (dev, name)
    assert facts["backends"]["cpu"]["reference"]["live"]
    assert set(facts["cpu"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
