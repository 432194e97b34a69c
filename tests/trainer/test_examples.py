"""The trainer example learns (README blocks themselves run in tests/test_readme.py), and
the trainer layer talks only through `logging`."""
import ast
import logging
import pathlib

import amp_engine

PACKAGE = pathlib.Path(amp_engine.__file__).resolve().parent

# The example the README shows for the trainer API (kept here verbatim so it stays runnable).
EXAMPLE = '''
import torch
from torch import nn
import amp_engine

torch.manual_seed(0)
x = torch.randn(512, 20)
y = x[:, :4].argmax(dim=1)                       # 4 separable classes
loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "fp16" if device == "cuda" else "bf16"   # fp16 + loss scaling on GPUs, bf16 on CPUs

# Step level: you own the loop.
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
trainer = amp_engine.create_mixed_precision_trainer(
    model, optimizer, dtype=dtype, max_grad_norm=1.0, gradient_accumulation_steps=2,
    fused_optimizer=True)                        # AdamW -> amp_engine.optim.AdamW
for epoch in range(3):
    for batch in loader:
        out = trainer.train_step(batch, nn.functional.cross_entropy, device)
print(f"loss {out['loss']:.3f} acc {out['accuracy']:.2f} scale {out['scale']} skipped {out['skipped']}")
stats = trainer.get_amp_stats()
print(stats["amp_usage_ratio"], stats["overflow_ratio"], stats["avg_memory_savings"])
trainer.save_amp_stats("runs/amp_stats.json")

# Epoch level: train_epoch / validate_epoch with a progress bar.
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
mp = amp_engine.create_mixed_precision_optimizer(
    model, optimizer, nn.functional.cross_entropy, device, dtype=dtype)
for epoch in range(3):
    mp.train_epoch(loader)
    print(mp.validate_epoch(loader))             # {'loss': ..., 'accuracy': ...}
mp.cleanup()

report = amp_engine.check_amp_compatibility(model, dtype=dtype, device=device)
print(report["compatible"], report["warnings"])
'''


def _run(code: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "<README example>", "exec"), namespace)
    return namespace


def test_trainer_example_runs_and_learns(tmp_path, monkeypatch, capsys):
    ns = _run(EXAMPLE, tmp_path, monkeypatch)
    assert (tmp_path / "runs" / "amp_stats.json").is_file()
    assert ns["out"]["accuracy"] > 0.8 and ns["stats"]["amp_usage_ratio"] == 1.0
    assert ns["mp"].validate_epoch(ns["loader"])["accuracy"] > 0.8
    assert ns["report"]["compatible"]
    assert "scale" in capsys.readouterr().out


def test_trainer_layer_never_prints():
    modules = sorted((PACKAGE / "trainer").glob("*.py"))
    assert len(modules) >= 10  # the package is where this test looks
    for path in modules:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not calls, f"amp_engine/trainer/{path.name} calls print() at line {calls[0].lineno}"


def test_training_writes_nothing_to_stdout_and_logs_via_logging(capsys, caplog):
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.DEBUG, logger="amp_engine"):
        mp = amp_engine.create_mixed_precision_optimizer(model, opt, nn.functional.cross_entropy, "cpu",
                                                         dtype="bf16", log_interval=1, progress_bar=False)
        mp.train_epoch([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
        mp.cleanup()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert caplog.records and all(r.name.startswith("amp_engine") for r in caplog.records)
    assert any(r.getMessage().startswith("step 1:") for r in caplog.records)
