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
    max_norm: float | None = None,
    clip_coef: Tensor | None = None,
    step_scale: Tensor | None = None,
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
    clip_outputs_(total, inv_scale, max_norm, clip_coef, step_scale)
    return total, per


def clip_outputs_(total: Tensor, inv_scale: Tensor, max_norm: float | None,
                  clip_coef: Tensor | None, step_scale: Tensor | None) -> None:
    """The clip coefficient of ``total`` and the step's grad multiplier, written in place.

    ``clip_coef = clamp(max_norm / (total + 1e-6), max=1)``: exactly
    torch.nn.utils.clip_grads_with_norm_'s fp32 ops (NaN stays NaN);
    ``step_scale = inv_scale * clip_coef`` (fp32): what a fused step multiplies the
    still-scaled grads by. Nothing is written when ``max_norm`` is None.
    """
    if max_norm is None:
        return
    coef = torch.clamp(max_norm / (total.reshape(()) + 1e-6), max=1.0)
    if clip_coef is not None:
        clip_coef.copy_(coef.reshape(clip_coef.shape))
    if step_scale is not None:
        step_scale.copy_((inv_scale.reshape(()).float() * coef).reshape(step_scale.shape))


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
    inv_scale: Tensor | None = None,
    next_found_inf: Tensor | None = None,
    counters: Tensor | None = None,
    counts: Tensor | None = None,
    ring: Tensor | None = None,
) -> None:
    """torch._amp_update_scale_ with hysteresis and bounds, and the step's bookkeeping.

    Overflow (found_inf != 0): the growth tracker resets; the hysteresis tracker
    drops by one and the scale backs off (``max(scale * backoff, min_scale)``)
    once it reaches 0, i.e. on the ``hysteresis``-th consecutive overflow and on
    every one after it. Clean step: the hysteresis tracker refills; after
    ``growth_interval`` consecutive clean steps the scale grows to
    ``min(scale * growth, max_scale)`` if that is finite, and the tracker resets.
    Products are taken in fp64 and rounded to fp32, as torch does. The optional
    outputs are written after the scale (see :func:`after_update_`).
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
    after_update_(scale, found_inf, min_scale, inv_scale, next_found_inf, counters, counts, ring)


def after_update_(scale: Tensor, found_inf: Tensor, min_scale: float, inv_scale: Tensor | None,
                  next_found_inf: Tensor | None, counters: Tensor | None,
                  counts: Tensor | None, ring: Tensor | None) -> None:
    """What update_scale_ does after the new scale is written (each part optional).

    * ``inv_scale`` (fp32, one element) = ``float32(1 / float64(scale))``, torch's
      unscale_ multiplier, ready for the next step;
    * ``next_found_inf`` (fp32, one element) = 0: the flag the next step's checks
      set (the scaler alternates two, so the one just read stays readable);
    * ``counters`` (int64 ``[3]``: updates so far, updates that found an overflow,
      the last update that ended with the scale above ``min_scale``): with
      ``u = counters[0]``: if ``ring`` is given, row ``counters[1] % rows`` of it
      becomes ``[u, counts...]`` (``ring`` int64 ``[rows, 1 + len(counts)]``: a
      clean step's row is overwritten by the next update, an overflow's is
      kept, as the write position then advances); ``counters[1] += found_inf != 0``;
      ``counters[2] = u`` if the new scale > fp32(min_scale); ``counters[0] = u + 1``.
    """
    s = scale.reshape(())
    if inv_scale is not None:
        inv_scale.copy_(s.double().reciprocal().float().reshape(inv_scale.shape))
    if next_found_inf is not None:
        next_found_inf.zero_()
    if counters is None:
        return
    u = counters[0].clone()
    if ring is not None:
        slot = counters[1].remainder(ring.shape[0])
        row = torch.cat([u.reshape(1), counts.reshape(-1)])
        ring.index_copy_(0, slot.reshape(1), row.reshape(1, -1))
    counters[1] += (found_inf.reshape(()) != 0).long()
    above = s > torch.tensor(min_scale, dtype=torch.float64).float().to(s.device)
    counters[2] = torch.where(above, u, counters[2])
    counters[0] = u + 1
