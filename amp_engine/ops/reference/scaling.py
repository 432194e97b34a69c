"""Plain-torch reference of every op: the truth the kernels are tested against.

Written for clarity, not speed: one tensor at a time, no host sync (flags are
combined with torch.where so the reference can run inside a captured step too).
Arithmetic follows the kernels' contract exactly:

* the unscaled value of an fp32/fp16/bf16 element is ``float32(g) * inv_scale``
  computed in fp32 (as torch's own unscale kernel does), then rounded to the
  grad's dtype; fp64 grads use ``g * float64(inv_scale)``;
* an element is non-finite if it is before scaling *or* its unscaled value,
  rounded to the grad's dtype, is (stops a tiny scale from writing inf);
* norms are accumulated in fp64 from the fp32 (fp64) unscaled values.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Default scale floor. Far below anything a healthy run reaches (torch's scale
#: gets there only after 40 consecutive back-offs from 2**16), yet its
#: reciprocal 2**24 is comfortably finite in fp32, so the scale can never reach
#: 0 and turn the next unscale into 0 * inf = NaN (torch's collapse).
DEFAULT_MIN_SCALE = 2.0**-24
#: Default ceiling: none beyond torch's own rule (never grow to inf).
DEFAULT_MAX_SCALE = float("inf")


def _unscaled(g: Tensor, inv_scale: Tensor) -> Tensor:
    """The unscaled values in the compute type (fp32, or fp64 for fp64 grads)."""
    if g.dtype == torch.float64:
        return g * inv_scale.reshape(()).double()
    return g.float() * inv_scale.reshape(()).float()


def _flag(found_inf: Tensor, bad: Tensor) -> None:
    # set, never clear: found_inf stays whatever it was unless `bad` is true
    found_inf.copy_(torch.where(bad, torch.ones_like(found_inf), found_inf))


def unscale_and_check_(
    grads: Sequence[Tensor], inv_scale: Tensor, found_inf: Tensor, counts: Tensor | None = None
) -> None:
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        u = _unscaled(g, inv_scale).to(g.dtype)
        bad = ~torch.isfinite(g) | ~torch.isfinite(u)
        g.copy_(u)
        n_bad = bad.sum()
        if counts is not None:
            counts[i] += n_bad
        _flag(found_inf, n_bad > 0)


def grad_norm_and_check(
    grads: Sequence[Tensor],
    inv_scale: Tensor,
    found_inf: Tensor,
    counts: Tensor | None = None,
    per_tensor: bool = False,
) -> tuple[Tensor, Tensor]:
    device = found_inf.device
    sumsq = torch.zeros(len(grads), dtype=torch.float64, device=device)
    for i, g in enumerate(grads):
        if g.numel() == 0:
            continue
        u = _unscaled(g, inv_scale)
        bad = ~torch.isfinite(g) | ~torch.isfinite(u.to(g.dtype))
        sumsq[i] = (u.double() ** 2).sum()
        n_bad = bad.sum()
        if counts is not None:
            counts[i] += n_bad
        _flag(found_inf, n_bad > 0)
    total = sumsq.sum().sqrt().float()
    per = sumsq.sqrt().float() if per_tensor else torch.empty(0, dtype=torch.float32, device=device)
    return total, per


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    hysteresis_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
    hysteresis: int = 1,
    min_scale: float = DEFAULT_MIN_SCALE,
    max_scale: float = float("inf"),
) -> None:
    """torch._amp_update_scale_ with hysteresis and bounds.

    Overflow (found_inf != 0): the growth tracker resets; the hysteresis tracker
    drops by one and the scale backs off (``max(scale * backoff, min_scale)``)
    once it reaches 0, i.e. on the ``hysteresis``-th consecutive overflow and on
    every one after it. Clean step: the hysteresis tracker refills; after
    ``growth_interval`` consecutive clean steps the scale grows to
    ``min(scale * growth, max_scale)`` if that is finite, and the tracker resets.
    Products are taken in fp64 and rounded to fp32, as torch does.
    """
    inf = found_inf.reshape(()) != 0
    s = scale.reshape(())
    gt = growth_tracker.reshape(())
    ht = hysteresis_tracker.reshape(())

    h_after = torch.clamp_min(ht - 1, 0)
    backoff = inf & (ht - 1 <= 0)
    backed = torch.clamp_min((s.double() * backoff_factor).float(), min_scale)

    successful = gt + 1
    grow = ~inf & (successful >= growth_interval)
    grown = (s.double() * growth_factor).float()
    # bounds as fp32 values: a max_scale beyond fp32's range means no ceiling
    hi = torch.tensor(max_scale, dtype=torch.float64).float()
    grown = torch.where(torch.isfinite(grown), torch.minimum(grown, hi.to(s.device)), s)

    new_scale = torch.where(backoff, backed, torch.where(grow, grown, s))
    new_gt = torch.where(inf | grow, torch.zeros_like(gt), successful)
    new_ht = torch.where(inf, h_after, torch.full_like(ht, hysteresis))
    scale.copy_(new_scale.reshape(scale.shape))
    growth_tracker.copy_(new_gt.reshape(growth_tracker.shape))
    hysteresis_tracker.copy_(new_ht.reshape(hysteresis_tracker.shape))
