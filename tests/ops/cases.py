"""Inputs shared by the op tests: sizes, dtypes, lists with planted non-finite values."""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [0, 1, 5, 123, 4097, 65539]
BAD_VALUES = [float("inf"), float("-inf"), float("nan")]


def scaled_grad(n: int, dtype: torch.dtype, device: str, scale: float = 1024.0) -> torch.Tensor:
    """Values like real scaled grads: normal * scale, representable in `dtype`."""
    return (torch.randn(n, dtype=torch.float64) * scale).to(dtype).to(device)


def mixed_list(n_tensors: int, device: str, *, seed: int = 0, max_numel: int = 3000,
               dtypes=DTYPES, bad_every: int = 0) -> list[torch.Tensor]:
    """`n_tensors` tensors of random sizes (0 included) and dtypes; every
    `bad_every`-th tensor (if > 0) gets an inf or nan at a random position."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_tensors):
        numel = int(torch.randint(0, max_numel, (1,), generator=gen))
        dtype = dtypes[int(torch.randint(0, len(dtypes), (1,), generator=gen))]
        t = (torch.randn(numel, generator=gen, dtype=torch.float64) * 512).to(dtype)
        if bad_every and i % bad_every == 0 and numel > 0:
            pos = int(torch.randint(0, numel, (1,), generator=gen))
            t[pos] = BAD_VALUES[i % 3]
        out.append(t.to(device))
    return out


def flags(device: str, n: int, found: float = 0.0):
    """(inv_scale placeholder, found_inf, counts) on `device`."""
    return (torch.full((), found, dtype=torch.float32, device=device),
            torch.zeros(n, dtype=torch.int64, device=device))


def clone_all(ts):
    return [t.clone() for t in ts]


def assert_bitwise(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def torch_unscale_and_check_(grads, inv_scale, found_inf, counts=None) -> None:
    """The contract of unscale_and_check_ built on torch's own kernel
    (``torch._amp_foreach_non_finite_check_and_unscale_``, which checks only
    before scaling): our extra check after scaling and the per-tensor counts are
    added from ``isfinite`` of the inputs and outputs. An oracle independent of
    amp_engine's reference, which is compared with it."""
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        bad_before = ~torch.isfinite(g)
        torch._amp_foreach_non_finite_check_and_unscale_([g], found_inf, inv_scale)
        n_bad = (bad_before | ~torch.isfinite(g)).sum()
        if counts is not None:
            counts[i] += n_bad
        if int(n_bad):
            found_inf.fill_(1.0)


def torch_grad_norm_and_check(grads, inv_scale, found_inf, counts=None, per_tensor=True):
    """grad_norm_and_check's contract from torch's ``_foreach_norm`` (fp64 copies of
    the unscaled grads) and the oracle above (on copies): independent of our reference."""
    copies = [g.clone() for g in grads]
    torch_unscale_and_check_(copies, inv_scale, found_inf, counts)
    device = found_inf.device
    unscaled = [(g.double() * inv_scale.double()) for g in grads if g.numel()]
    norms = torch._foreach_norm(unscaled) if unscaled else []
    per, it = [], iter(norms)
    for g in grads:
        per.append(next(it).float() if g.numel() else torch.zeros((), dtype=torch.float32, device=device))
    per_t = torch.stack(per).to(device) if per else torch.zeros(0, dtype=torch.float32, device=device)
    total = per_t.double().pow(2).sum().sqrt().float()
    return total, per_t
