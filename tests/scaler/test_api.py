"""The public API: the same exceptions as torch in the same situations, argument
validation, lazy device placement, state_dict interop both ways, pickling."""
import copy
import math
import pickle
import warnings

import pytest
import torch

from amp_engine.scaler import GradScaler
from .cases import ContractSGD, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
BOTH = [pytest.param(torch.amp.GradScaler, id="torch"), pytest.param(GradScaler, id="ours")]


def setup(cls, opt_cls=torch.optim.SGD, **kwargs):
    model = torch.nn.Linear(3, 2)
    opt = opt_cls(model.parameters(), lr=0.1, **kwargs)
    scaler = cls("cpu", init_scale=4.0)
    scaler.scale(model(torch.ones(4, 3)).sum()).backward()
    return scaler, opt


def test_is_a_torch_grad_scaler():
    assert isinstance(GradScaler("cpu"), torch.amp.GradScaler)


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("case", ["unscale_twice", "unscale_after_step", "step_twice",
                                  "closure", "step_without_scale", "unscale_without_scale",
                                  "update_without_scale", "update_without_step",
                                  "pickle_mid_iteration", "load_empty",
                                  "new_scale_tensor_numel", "new_scale_tensor_grad"])
def test_errors_match_torch(cls, case):
    scaler, opt = setup(cls)
    expected = RuntimeError
    if case == "unscale_twice":
        scaler.unscale_(opt)
        call = lambda: scaler.unscale_(opt)  # noqa: E731
    elif case == "unscale_after_step":
        scaler.step(opt)
        call = lambda: scaler.unscale_(opt)  # noqa: E731
    elif case == "step_twice":
        scaler.step(opt)
        call = lambda: scaler.step(opt)  # noqa: E731
    elif case == "closure":
        call = lambda: scaler.step(opt, closure=lambda: 0.0)  # noqa: E731
    elif case in ("step_without_scale", "unscale_without_scale", "update_without_scale"):
        scaler = cls("cpu")
        expected = AssertionError
        call = {"step_without_scale": lambda: scaler.step(opt),
                "unscale_without_scale": lambda: scaler.unscale_(opt),
                "update_without_scale": lambda: scaler.update()}[case]
    elif case == "update_without_step":
        expected = AssertionError
        call = scaler.update
    elif case == "pickle_mid_iteration":
        scaler.unscale_(opt)
        expected = AssertionError
        call = lambda: pickle.dumps(scaler)  # noqa: E731
    elif case == "load_empty":
        call = lambda: scaler.load_state_dict({})  # noqa: E731
    elif case == "new_scale_tensor_numel":
        scaler.step(opt)
        expected = AssertionError
        call = lambda: scaler.update(torch.ones(2))  # noqa: E731
    else:  # new_scale_tensor_grad
        scaler.step(opt)
        expected = AssertionError
        call = lambda: scaler.update(torch.ones((), requires_grad=True))  # noqa: E731
    with pytest.raises(expected):
        call()


def test_clip_counts_as_unscale():
    scaler, opt = setup(GradScaler)
    scaler.clip_grad_norm_(opt, 1.0)
    with pytest.raises(RuntimeError, match="clip_grad_norm_"):
        scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.clip_grad_norm_(opt, 1.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="after step"):
        scaler.clip_grad_norm_(opt, 1.0)


def test_fused_closure_and_step_twice():
    scaler, opt = setup(GradScaler, torch.optim.AdamW, fused=True)
    with pytest.raises(RuntimeError, match="Closure"):
        scaler.step(opt, closure=lambda: 0.0)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("kwargs, name", [
    ({"growth_factor": 1.0}, "growth_factor"), ({"growth_factor": 0.5}, "growth_factor"),
    ({"growth_factor": math.inf}, "growth_factor"), ({"backoff_factor": 1.0}, "backoff_factor"),
    ({"backoff_factor": 0.0}, "backoff_factor"), ({"backoff_factor": -0.5}, "backoff_factor"),
    ({"growth_interval": 0}, "growth_interval"), ({"growth_interval": 2.5}, "growth_interval"),
    ({"growth_interval": True}, "growth_interval"), ({"init_scale": math.inf}, "init_scale"),
    ({"init_scale": math.nan}, "init_scale"), ({"init_scale": 0.0}, "init_scale"),
    ({"init_scale": -1.0}, "init_scale"), ({"hysteresis": 0}, "hysteresis"),
    ({"min_scale": 0.0}, "min_scale"), ({"min_scale": -1.0}, "min_scale"),
    ({"min_scale": 4.0, "max_scale": 2.0}, "max_scale"),
    ({"init_scale": 2.0**20, "max_scale": 2.0**16}, "init_scale"),
    ({"init_scale": 1e-9}, "init_scale"), ({"floor_patience": -1}, "floor_patience"),
    ({"overflow_history": 0}, "overflow_history"), ({"growth_factor": "2"}, "growth_factor"),
])
def test_argument_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GradScaler("cpu", **kwargs)


def test_setters_validate():
    s = GradScaler("cpu")
    for setter, bad, name in [(s.set_growth_factor, 1.0, "growth_factor"),
                              (s.set_backoff_factor, 1.5, "backoff_factor"),
                              (s.set_growth_interval, 0, "growth_interval")]:
        with pytest.raises(ValueError, match=name):
            setter(bad)
    s.set_growth_factor(3.0)
    s.set_backoff_factor(0.25)
    s.set_growth_interval(5)
    assert (s.get_growth_factor(), s.get_backoff_factor(), s.get_growth_interval()) == (3.0, 0.25, 5)
    assert s.is_enabled() and s.get_hysteresis() == 1


def test_lazy_device_placement_and_get_scale():
    s = GradScaler("cpu", init_scale=8.0)
    assert s._scale is None and s._growth_tracker is None and s._hysteresis_tracker is None
    assert s.get_scale() == 8.0 and s._get_scale_async() is None
    out = s.scale(torch.ones(3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.tolist() == [8.0] * 3
    assert s._scale.device.type == "cpu" and s._scale.dtype == torch.float32
    assert s._growth_tracker.dtype == torch.int32 and s._hysteresis_tracker.dtype == torch.int32
    # lists / tuples / generators as torch's
    a, b = s.scale((torch.ones(1), [torch.ones(2)]))
    assert a.tolist() == [8.0] and b[0].tolist() == [8.0, 8.0]
    assert [t.tolist() for t in s.scale(iter([torch.ones(1)]))] == [[8.0]]
    with pytest.raises(ValueError):
        s.scale([1.0])


def test_scale_of_half_scalar_is_float32_like_torch():
    for cls in (torch.amp.GradScaler, GradScaler):
        assert cls("cpu").scale(torch.tensor(1.0, dtype=torch.float16)).dtype == torch.float32


def test_update_accepts_int_float_tensor():
    s, opt = setup(GradScaler)
    s.step(opt)
    s.update(1024)  # torch crashes on an int
    assert s.get_scale() == 1024.0
    s.scale(torch.ones(()))
    s.update(512.0)
    assert s.get_scale() == 512.0
    s.update(torch.tensor(256.0))
    assert s.get_scale() == 256.0
    s.update(torch.tensor([128.0]))  # shape (1,): torch's message allows it, torch crashes
    assert s.get_scale() == 128.0
    s.update(1e-30)  # clamped to the floor
    assert s.get_scale() == s.min_scale
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="new_scale"):
            s.update(bad)


def test_disabled_scaler_is_transparent():
    s = GradScaler("cpu", enabled=False)
    x = torch.ones(2)
    assert s.scale(x) is x and s.get_scale() == 1.0 and not s.is_enabled()
    assert s.state_dict() == {} and s.stats() == {"enabled": False}
    s.load_state_dict({})  # no-op, as torch
    model = torch.nn.Linear(2, 1)
    opt = ContractSGD(model.parameters())
    model(x).sum().backward()
    s.unscale_(opt)
    norm = s.clip_grad_norm_(opt, 1e-3)
    assert norm > 1e-3 and s.step(opt) == "stepped" and opt.seen == [(None, None, None)]
    s.update()
    assert s.overflow_report() == []
    with pytest.raises(AttributeError):
        s.get_growth_factor()  # as torch's disabled scaler


def test_no_cuda_default_device_disables_with_warning():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.warns(UserWarning, match="CUDA is not available"):
        s = GradScaler()
    assert not s.is_enabled()


EXTRAS = {"hysteresis", "_hysteresis_tracker", "min_scale", "max_scale", "steps",
          "skipped_steps", "steps_at_floor"}


def _run(scaler, steps, model=None, opt=None, inf_at=()):
    model = model or torch.nn.Linear(3, 2)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(steps):
        opt.zero_grad()
        scaler.scale(model(torch.ones(4, 3)).pow(2).sum()).backward()
        if i in inf_at:
            model.weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
    return model, opt


def test_state_dict_superset_and_interop_both_ways():
    ours = GradScaler("cpu", init_scale=2.0**8, growth_interval=3, hysteresis=2)
    _run(ours, 10, inf_at=(2, 3, 7))
    sd = ours.state_dict()
    theirs_sd = torch.amp.GradScaler("cpu").state_dict()
    assert set(sd) == set(theirs_sd) | EXTRAS
    assert sd["steps"] == 10 and sd["skipped_steps"] == 3 and sd["hysteresis"] == 2
    # torch loads ours
    torch_scaler = torch.amp.GradScaler("cpu")
    torch_scaler.load_state_dict(sd)
    assert torch_scaler.state_dict() == {k: sd[k] for k in theirs_sd}
    # ours loads torch's: continue side by side, identical scales
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**5, growth_interval=2)
    _run(ref, 5, inf_at=(1,))
    mine = GradScaler("cpu")
    mine.load_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert mine.state_dict()[k] == v
    scales = []
    for s in (ref, mine):
        torch.manual_seed(0)
        model, _ = _run(s, 6, inf_at=(3,))
        scales.append((s.get_scale(), s._get_growth_tracker()))
    assert scales[0] == scales[1]


def test_load_state_dict_after_lazy_init_and_clamps_collapsed_scale():
    s = GradScaler("cpu")
    s.scale(torch.ones(()))
    sd = torch.amp.GradScaler("cpu", init_scale=2.0).state_dict()
    sd["scale"] = 0.0  # what torch's collapsed scale checkpoints
    s.load_state_dict(sd)
    assert s.get_scale() == s.min_scale
    with pytest.raises(ValueError, match="growth_factor"):
        s.load_state_dict(dict(sd, growth_factor=0.9))


def test_pickle_and_deepcopy_roundtrip():
    s = GradScaler("cpu", init_scale=2.0**6, growth_interval=2, hysteresis=3, min_scale=1.0)
    model, opt = _run(s, 5, inf_at=(1, 2))
    for clone in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert clone.state_dict() == s.state_dict()
        assert clone._scale is None  # re-created lazily, as torch's
        _run(clone, 3, model=copy.deepcopy(model))
        assert clone.stats()["steps"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = pickle.loads(pickle.dumps(GradScaler("cpu", enabled=False)))
    assert not d.is_enabled()


def test_step_returns_optimizer_result_and_records_skips():
    s, opt = setup(GradScaler, ContractSGD)
    assert s.step(opt) == "stepped" and s.last_step_skipped is False
    s.update()
    s.scale(opt.param_groups[0]["params"][0].sum()).backward()
    opt.param_groups[0]["params"][0].grad[0, 0] = math.nan
    assert s.step(opt) == "stepped"  # the fused path always calls step(); it skips on the device
    assert s.last_step_skipped_tensor.item() == 1.0 and s.last_step_skipped is True
    s.update()
    s2, opt2 = setup(GradScaler)
    opt2.param_groups[0]["params"][0].grad[0, 0] = math.inf
    assert s2.step(opt2) is None and s2.last_step_skipped is True
    assert s2.last_step_skipped_tensor.item() == 1.0


def test_torch_own_private_members_work():
    # what torch's own tests and ecosystem code read
    s, opt = setup(GradScaler)
    s.unscale_(opt)
    per_device = s._found_inf_per_device(opt)
    assert list(per_device) == [torch.device("cpu")] and per_device[torch.device("cpu")].item() == 0
    assert s._per_optimizer_states[id(opt)]["stage"].name == "UNSCALED"
    assert s._get_scale_async() is s._scale and s._get_growth_tracker() == 0


def test_torch_deprecated_grad_scaler_kwarg_contract():
    class PassItself(torch.optim.SGD):
        _step_supports_amp_scaling = True

        def step(self, closure=None, grad_scaler=None):
            self.got = grad_scaler
            found = grad_scaler._check_inf_per_device(self)
            if not sum(v.item() for v in found.values()):
                return super().step()

    for cls in (torch.amp.GradScaler, GradScaler):
        s, opt = setup(cls, PassItself)
        with pytest.warns(FutureWarning):
            s.step(opt)
        assert opt.got is s
        s.update()
        assert s.get_scale() == 4.0


def test_torch_private_unscale_grads_still_works():
    # code written against torch's internals calls _unscale_grads_ (shape-(1,) tensors)
    s, opt = setup(GradScaler)
    grads = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    found = s._unscale_grads_(opt, torch.full((1,), 0.25), torch.zeros(1), True)
    assert sum(v.item() for v in found.values()) == 0
    for p, g in zip(opt.param_groups[0]["params"], grads):
        assert torch.equal(p.grad, g * 0.25)


def test_resume_from_state_dict_is_exact():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    kw = dict(init_scale=2.0**6, growth_interval=3, hysteresis=2)
    straight = GradScaler("cpu", **kw)
    _run(straight, 8, model=copy.deepcopy(model), inf_at=(1, 2, 5, 6))
    first = GradScaler("cpu", **kw)
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    _run(first, 4, model=m, opt=opt, inf_at=(1, 2))
    resumed = GradScaler("cpu")
    resumed.load_state_dict(first.state_dict())
    _run(resumed, 4, model=m, opt=opt, inf_at=(1, 2))
    assert resumed.state_dict() == straight.state_dict()


def test_int_arguments_are_kept_as_given_like_torch():
    """torch keeps what it was given (int 3 stays int 3): getters, setters, state_dict, load."""
    kwargs = dict(init_scale=1024, growth_factor=3, backoff_factor=0.5, growth_interval=7)
    seen = {}
    for cls in (torch.amp.GradScaler, GradScaler):
        s = cls("cpu", **kwargs)
        before = (s.get_growth_factor(), s.get_scale(), s.state_dict()["growth_factor"])
        s.set_growth_factor(4)
        s.set_backoff_factor(0.25)
        after = (s.get_growth_factor(), s.get_backoff_factor())
        s.scale(torch.ones(()))
        sd = {k: s.state_dict()[k] for k in ("growth_factor", "backoff_factor", "growth_interval")}
        s2 = cls("cpu")
        s2.load_state_dict(s.state_dict())
        seen[cls] = [(v, type(v)) for v in (*before, *after, *sd.values(), s2.get_growth_factor())]
    assert seen[GradScaler] == seen[torch.amp.GradScaler]
    assert seen[GradScaler][0] == (3, int) and seen[GradScaler][1] == (1024, int)
