"""Every README code block runs: the Python blocks as written, the shell commands that
call `amp-engine` with tiny sizes (the fresh-machine install commands are what CI runs)."""
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

import amp_engine

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
TEXT = README.read_text() if README.exists() else ""
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", TEXT, re.S)
COMMANDS = [c.split("#")[0].strip() for block in BASH_BLOCKS for line in block.splitlines()
            for c in line.split("&&") if c.strip().startswith("amp-engine")]
# what makes a shown command small enough for a test, by subcommand
TINY = {"demo": ["--steps", "2", "--batch-size", "2", "--no-plots", "--no-progress"],
        "bench": ["--quick", "--only", "ops", "--min-run-time", "0.01", "--no-plot"],
        "info": []}


def test_readme_has_examples():
    assert README.exists() and PYTHON_BLOCKS and COMMANDS


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=[f"python{i}" for i in range(len(PYTHON_BLOCKS))])
def test_python_block(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("command", sorted(set(COMMANDS)))
def test_amp_engine_command(command, tmp_path):
    args = shlex.split(command)[1:]
    sub = args[0] if args else ""
    extra = TINY.get(sub, [])
    # a flag the README already gives keeps its value; drop ours then
    extra = [a for i, a in enumerate(extra) if not (a.startswith("--") and a in args)
             and not (i > 0 and extra[i - 1] in args)]
    out = ["--output", str(tmp_path)] if sub in ("demo", "bench") and "--output" not in args else []
    # the amp_engine being tested (installed, or a source tree with an in-place build)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(pathlib.Path(amp_engine.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "amp_engine", *args, *extra, *out],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fresh_machine_commands_install_real_extras():
    """The README's install commands name extras that pyproject.toml defines, and CI
    (.ci/run) runs the test one as written."""
    root = README.parent
    extras_block = re.search(r"\[project\.optional-dependencies\]\n(.*?)(?:\n\[|\Z)",
                             (root / "pyproject.toml").read_text(), re.S).group(1)
    defined = set(re.findall(r"^(\w+)\s*=", extras_block, re.M))
    named = set(re.findall(r'pip install "\.\[(\w+)\]"', TEXT))
    assert {"demo", "test"} <= named <= defined, (named, defined)
    assert 'pip install -q ".[test]"' in (root / ".ci" / "run").read_text()
