"""Safety beyond torch: the scale floor, the at-floor warning/error, hysteresis,
the ceiling, the after-unscale check, found_inf exactly 1.0 for torch's fused kernels."""
import math
import warnings

import pytest
import torch

from amp_engine.ops import DEFAULT_MIN_SCALE
from amp_engine import optim as amp_optim
from amp_engine.scaler import GradScaler
from .cases import ContractSGD, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def _nan_then_clean(cls, n_nan=200, n_clean=5, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    s = cls("cpu", **kwargs)
    scales, x = [], torch.randn(8, 4)
    for i in range(n_nan + n_clean):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        if i < n_nan:
            loss = loss * math.nan
        s.scale(loss).backward()
        s.step(opt)
        s.update()
        scales.append(s.get_scale())
    return scales, model


def test_scale_floor_survives_200_nan_steps():
    with pytest.warns(RuntimeWarning, match="floor"):
        scales, model = _nan_then_clean(GradScaler)
    assert min(scales) == DEFAULT_MIN_SCALE
    assert scales[39] == 2.0**16 * 2.0**-40 == DEFAULT_MIN_SCALE  # 40 back-offs reach the floor
    assert all(s == DEFAULT_MIN_SCALE for s in scales[39:])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the clean steps really trained
    before = [p.detach().clone() for p in _nan_then_clean(GradScaler, n_clean=0,
                                                         floor_patience=0)[1].parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_torch_collapses_where_we_do_not():
    # the fault we fix: torch's scale reaches exactly 0 and the next clean step writes NaN
    scales, model = _nan_then_clean(torch.amp.GradScaler)
    assert scales[-1] == 0.0
    assert all(torch.isnan(p).all() for p in model.parameters())


def test_identical_to_torch_until_the_floor():
    a, _ = _nan_then_clean(torch.amp.GradScaler, n_nan=60, n_clean=0)
    b, _ = _nan_then_clean(GradScaler, n_nan=60, n_clean=0, floor_patience=0)
    assert a[:40] == b[:40] and a[40] < DEFAULT_MIN_SCALE == b[40]


def test_raise_at_floor():
    with pytest.raises(RuntimeError, match="floor"):
        _nan_then_clean(GradScaler, n_nan=80, min_scale=1.0, floor_patience=20,
                        raise_at_floor=True)


def test_floor_warning_silenced_and_patience():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _nan_then_clean(GradScaler, n_nan=120, n_clean=0, floor_patience=0)
        _nan_then_clean(GradScaler, n_nan=100, n_clean=0, floor_patience=70)  # 61 at floor
    s_scales, _ = _nan_then_clean(GradScaler, n_nan=30, n_clean=0, min_scale=2.0**10,
                                  floor_patience=0)
    assert min(s_scales) == 2.0**10


def test_stats_report_floor_run():
    s = GradScaler("cpu", init_scale=4.0, min_scale=1.0, floor_patience=0)
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(7):
        s.scale(model(torch.ones(1, 2)).sum() * math.inf).backward()
        s.step(opt)
        s.update()
    st = s.stats()
    assert st["steps_at_floor"] == 6  # 4 -> 2 -> 1, then at 1 for updates 2..7
    assert st["skipped_steps"] == 7 and st["scale"] == 1.0


def _updates(s, pattern):
    """Drive update() with a found_inf pattern (1 = overflow) via a contract optimizer."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = ContractSGD([p])
    scales = []
    for bad in pattern:
        s.scale(p.sum()).backward()
        if bad:
            p.grad[0] = math.inf
        s.step(opt)
        s.update()
        p.grad = None
        scales.append(s.get_scale())
    return scales


def test_hysteresis_backs_off_on_consecutive_overflows_only():
    s = GradScaler("cpu", init_scale=64.0, growth_interval=100, hysteresis=2)
    assert _updates(s, [1, 0, 1, 0, 1, 1, 1, 0, 1]) == [64, 64, 64, 64, 64, 32, 16, 16, 16]
    sd = s.state_dict()
    assert sd["hysteresis"] == 2 and sd["_hysteresis_tracker"] == 1


def test_max_scale_caps_growth():
    s = GradScaler("cpu", init_scale=4.0, growth_interval=1, max_scale=20.0)
    assert _updates(s, [0, 0, 0, 0]) == [8.0, 16.0, 20.0, 20.0]


def test_growth_never_reaches_inf():
    s = GradScaler("cpu", init_scale=2.0**127, growth_interval=1)
    assert _updates(s, [0, 0]) == [2.0**127, 2.0**127]


def test_after_unscale_check_catches_fp16_overflow():
    # finite fp16 grads that a tiny scale turns into inf: torch writes inf and steps
    results = {}
    for cls in (torch.amp.GradScaler, GradScaler):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
        # ours: an optimizer with an fp32 master, so unscale_ takes the fp16 grads
        opt = amp_optim.SGD([p], lr=0.1) if cls is GradScaler else torch.optim.SGD([p], lr=0.1)
        s = cls("cpu", init_scale=2.0**-10)
        s.scale(torch.ones(()))
        p.grad = torch.full((4,), 1000.0, dtype=torch.float16)  # 1000 * 2**10 > 65504
        if cls is GradScaler:
            s.unscale_(opt)
        else:
            torch._amp_foreach_non_finite_check_and_unscale_(
                [p.grad], fi := torch.zeros(()), torch.tensor(2.0**10))
            results["torch_found_inf"] = fi.item()
            continue
        s.step(opt)
        results["ours_skipped"] = s.last_step_skipped
        assert torch.equal(p.detach(), torch.zeros(4, dtype=torch.float16))
    assert results == {"torch_found_inf": 0.0, "ours_skipped": True}


def test_torch_fused_gets_exactly_one():
    # torch's fused kernels skip only on found_inf == 1.0: many infs, several
    # optimizers, must all hand over exactly 1.0 (never a sum)
    params = [torch.nn.Parameter(torch.zeros(6)) for _ in range(2)]
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    seen = []
    orig = opt.step
    opt.step = lambda *a, **k: (seen.append(opt.found_inf.clone()), orig(*a, **k))[1]
    s = GradScaler("cpu", init_scale=2.0)
    s.scale(torch.ones(()))
    for p in params:
        p.grad = torch.full((6,), math.inf)
    s.step(opt)
    assert seen[0].item() == 1.0 and seen[0].dtype == torch.float32
    assert all(torch.equal(p.detach(), torch.zeros(6)) for p in params)
    s.update()
    assert s.get_scale() == 1.0


def test_bf16_and_fp16_grads_mixed_in_one_optimizer():
    ps = [torch.nn.Parameter(torch.ones(3, dtype=dt))
          for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
    opt = amp_optim.SGD(ps, lr=1.0)  # fp32 masters: fp16 grads may be unscaled in place
    s = GradScaler("cpu", init_scale=4.0)
    s.scale(torch.ones(()))
    for p in ps:
        p.grad = torch.full((3,), 2.0, dtype=p.dtype)
    s.unscale_(opt)
    assert all(torch.equal(p.grad, torch.full((3,), 0.5, dtype=p.dtype)) for p in ps)
    s.step(opt)
    assert all(torch.equal(p.detach(), torch.full((3,), 0.5, dtype=p.dtype)) for p in ps)


def test_fp16_grads_refused_without_masters():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    for opt in (amp_optim.SGD([p], lr=1.0, master_weights=False), ContractSGD([p], lr=1.0)):
        s = GradScaler("cpu", init_scale=4.0)
        s.scale(torch.ones(()))
        p.grad = torch.full((3,), 2.0, dtype=torch.float16)
        with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients."):
            s.unscale_(opt)
        assert torch.equal(p.grad, torch.full((3,), 2.0, dtype=torch.float16))
        s.step(opt)  # without unscale_: the fused check, as torch's fused path
        s.update()
        assert torch.equal(p.detach(), torch.full((3,), 0.5, dtype=torch.float16))
        p.data.fill_(1.0)


def test_per_device_flags_combine_with_max_never_sum():
    # two devices' flags (two CPU device objects stand in for two GPUs)
    s = GradScaler("cpu")
    s.scale(torch.ones(()))
    state = {"found_inf_per_device": {torch.device("cpu"): torch.ones(()),
                                      torch.device("cpu", 0): torch.ones(())},
             "found_inf": None, "mesh": None}
    fi = s._found_inf(state)
    assert fi.item() == 1.0
    assert all(t.item() == 1.0 for t in state["found_inf_per_device"].values())
