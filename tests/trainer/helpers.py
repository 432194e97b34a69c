"""Tiny models, data and loss functions shared by the trainer tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import amp_engine

CE = F.cross_entropy


def mlp(d_in: int = 8, hidden: int = 16, d_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def blobs(n: int = 256, d_in: int = 8, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable classes: argmax of a fixed random projection."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, classes, generator=g)
    return x, (x @ w).argmax(dim=1)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def make_trainer(model=None, opt=None, *, lr: float = 0.05, optim_cls=torch.optim.SGD, scheduler=None,
                 logger=None, **fields):
    """A trainer with the slow extras (compat check, validation, memory) off unless asked."""
    model = mlp() if model is None else model
    opt = optim_cls(model.parameters(), lr=lr) if opt is None else opt
    for key in ("check_compatibility", "validate_amp", "track_memory_usage"):
        fields.setdefault(key, False)
    return amp_engine.create_mixed_precision_trainer(model, opt, scheduler=scheduler, logger=logger, **fields)


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class InfAt:
    """A loss function whose loss is multiplied by inf on chosen calls (-> non-finite grads)."""

    def __init__(self, bad_calls, base=CE) -> None:
        self.bad = set(bad_calls)
        self.calls = 0
        self.base = base

    def __call__(self, out, y):
        loss = self.base(out, y)
        call, self.calls = self.calls, self.calls + 1
        return loss * float("inf") if call in self.bad else loss
