"""Bad flags: argparse's message and exit status 2, never a traceback."""
import subprocess
import sys

import pytest
import torch

from amp_engine.cli import main

BAD = [
    ([], "the following arguments are required: COMMAND"),
    (["train"], "invalid choice: 'train'"),
    (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["demo", "--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    (["demo", "--batch-size", "-3"], "argument --batch-size: expected a positive integer, got -3"),
    (["demo", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["demo", "--device", "tpu"], "argument --device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["demo", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "--only", "ops,nope"], "argument --only: expected a comma-separated subset of ops,scaler,optim"),
    (["bench", "--min-run-time", "0"], "argument --min-run-time: expected a positive number, got '0'"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
]
if not torch.cuda.is_available():
    BAD.append((["demo", "--device", "cuda"], "argument --device: 'cuda' asked for, but torch sees no CUDA device"))


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_flags_exit_2_with_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: amp-engine" in err and message in err
    assert "Traceback" not in err


def test_module_entry_point_bad_flag_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "amp_engine", "demo", "--steps", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "expected a positive integer" in proc.stderr and "Traceback" not in proc.stderr


def test_help_and_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--device", "--dtype", "--batch-size", "--output", "--seed", "--no-plots"):
        assert flag in out
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and "amp-engine" in capsys.readouterr().out
