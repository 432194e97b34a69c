"""Import never breaks: without the compiled library amp_engine warns once and runs on the reference."""
import pathlib
import subprocess
import sys

import amp_engine

SCRIPT = r'''
import importlib.abc, sys, warnings

class NoCompiledLibrary(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "amp_engine._C":
            raise ImportError("simulated: undefined symbol (ABI mismatch)")
        return None

sys.meta_path.insert(0, NoCompiledLibrary())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import amp_engine
    import amp_engine.ops
assert [str(w.message) for w in caught if "compiled kernels not loaded" in str(w.message)].__len__() == 1
info = amp_engine.build_info()
assert info["extension_loaded"] is False and "ABI mismatch" in info["load_error"], info
assert amp_engine.ops.available_backends("cpu") == ["reference"], amp_engine.ops.available_backends("cpu")
try:
    amp_engine.ops.grad_norm_and_check([torch.ones(3)], torch.ones(()), torch.zeros(()), backend="cpp")
    raise SystemExit("backend='cpp' should raise without the library")
except RuntimeError as exc:
    assert "not loaded" in str(exc)

# the whole stack still trains: scaler + fused optimizer on the reference backend
model = torch.nn.Linear(4, 2).to(torch.bfloat16)
opt = amp_engine.optim.AdamW(model.parameters(), lr=0.1)
scaler = amp_engine.GradScaler("cpu", init_scale=8.0)
before = model.weight.detach().clone()
loss = model(torch.ones(3, 4, dtype=torch.bfloat16)).float().sum()
scaler.scale(loss).backward()
scaler.clip_grad_norm_(opt, 1.0)
scaler.step(opt)
scaler.update()
assert not torch.equal(before, model.weight) and opt.state[model.weight]["master"].dtype == torch.float32
print("OK")
'''


def test_import_without_compiled_library(tmp_path):
    root = pathlib.Path(amp_engine.__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
