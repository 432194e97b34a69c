"""`import amp_engine` needs torch alone: numpy, tqdm, matplotlib and hypothesis are
optional, imported where used, and a feature that lacks one says which package and
which extra install it. Checked in a subprocess where those packages cannot import,
whatever this environment has installed."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import amp_engine
from amp_engine import _optional

ROOT = pathlib.Path(amp_engine.__file__).resolve().parents[1]
# None in sys.modules: `import x` raises ModuleNotFoundError and find_spec("x") is
# None, as if x were not installed
BLOCK = textwrap.dedent("""
    import sys
    for _name in ("numpy", "tqdm", "matplotlib", "hypothesis"):
        sys.modules[_name] = None
    import warnings; warnings.simplefilter("ignore")  # torch warns that numpy is missing
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)  # the interpreter itself needs numpy
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=240, env=env)


def test_import_and_a_training_step_need_torch_alone():
    proc = run_blocked("""
        import io, contextlib, sys, torch
        import amp_engine
        from amp_engine import GradScaler, create_mixed_precision_optimizer
        from amp_engine.optim import AdamW
        model = torch.nn.Linear(4, 2)
        opt = AdamW(model.parameters(), lr=1e-2)
        scaler = GradScaler("cpu", init_scale=8.0)
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.clip_grad_norm_(opt, 1.0)
        scaler.step(opt)
        scaler.update()
        mpo = create_mixed_precision_optimizer(model, opt, torch.nn.MSELoss(), "cpu", progress_bar=False)
        loader = [(torch.randn(3, 4), torch.randn(3, 2)) for _ in range(2)]
        assert mpo.train_epoch(loader)["batches"] == 2  # no bar: no tqdm needed
        try:
            mpo.train_epoch(loader, progress_bar=True)
        except ImportError as e:
            print("BAR:", e)
        from amp_engine.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            main(["info"])
        bad = sorted(m for m, mod in sys.modules.items()
                     if mod is not None and m.split(".")[0] in {"numpy", "tqdm", "matplotlib", "hypothesis"})
        print("LOADED:", bad)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED: []" in proc.stdout
    assert "BAR:" in proc.stdout and "'tqdm'" in proc.stdout and "amp_engine[demo]" in proc.stdout


def test_require_names_package_and_extra():
    with pytest.raises(ImportError, match=r"the demo's plots needs the optional package "
                                          r"'not_a_pkg_xyz'.*pip install not_a_pkg_xyz"):
        _optional.require("not_a_pkg_xyz", "the demo's plots")
    _optional.EXTRAS["not_a_pkg_xyz"] = "demo"
    try:
        with pytest.raises(ImportError, match=r"amp_engine\[demo\]"):
            _optional.require("not_a_pkg_xyz.sub", "x")
    finally:
        del _optional.EXTRAS["not_a_pkg_xyz"]
    assert _optional.require("json", "x").dumps({}) == "{}"


def test_no_bar_is_a_silent_stand_in():
    bar = _optional.NoBar([1, 2, 3])
    with bar as b:
        b.set_postfix(loss=1.0)
        b.update(1)
        assert list(b) == [1, 2, 3]
