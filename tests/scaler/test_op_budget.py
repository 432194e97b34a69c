"""The op budget (DESIGN.md §5): per step, amp_engine dispatches no more ops than
torch's recipe for the same job, in every recipe, at any number of param tensors;
clip + our AdamW + update (one device, one dtype group) in at most 8.

Counted with a TorchDispatchMode around clip -> step -> update
(amp_engine.bench.op_count): deterministic, so a regression fails here.
"""
import pytest
import torch

from amp_engine.bench import op_count

MISSING = op_count.contract_missing()
needs_contract = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}")

FULL_PATH_BUDGET = 8


def _total(ops) -> int:
    return sum(ops.values())


@needs_contract
@pytest.mark.parametrize("recipe,dtype,n,clip", [
    pytest.param(r, d, n, c, id=f"{r}-{d}-{n}-{'clip' if c else 'noclip'}")
    for r, d, n, c in op_count.cases()])
def test_never_more_ops_than_torch(recipe, dtype, n, clip):
    theirs = op_count.measure(recipe, "torch", op_count.DTYPES[dtype], n, clip)
    ours = op_count.measure(recipe, "amp_engine", op_count.DTYPES[dtype], n, clip)
    assert _total(ours) <= _total(theirs), f"ours {dict(ours)}\ntorch {dict(theirs)}"


@needs_contract
@pytest.mark.parametrize("dtype", list(op_count.DTYPES))
@pytest.mark.parametrize("n", [1, 24, 240])
def test_full_path_within_budget(dtype, n):
    ours = op_count.measure("ours-adamw", "amp_engine", op_count.DTYPES[dtype], n, clip=True)
    assert _total(ours) <= FULL_PATH_BUDGET, dict(ours)
    # the launches that must be there: one norm pass, one step, one update
    assert ours["amp_engine::grad_norm_and_check"] == 1
    assert ours["amp_engine::adam_step_"] == 1 and ours["amp_engine::update_scale_"] == 1


@needs_contract
def test_count_does_not_grow_with_tensors():
    small = op_count.measure("torch-fused", "amp_engine", torch.float32, 2, clip=True)
    large = op_count.measure("torch-fused", "amp_engine", torch.float32, 500, clip=True)
    assert small == large


def test_the_counter_sees_every_op():
    """The counter can fail: an extra op in the step is counted (profiler ops are not)."""
    def step():
        a = torch.ones(3)
        with torch.autograd.profiler.record_function("annotated"):
            a.add_(1).mul_(2)
    ops = op_count.count_ops(step)
    assert _total(ops) == 3 and not any(k.startswith("profiler::") for k in ops)


def test_device_events_counts_what_ran_on_that_device():
    """The launch counter's filter (run on CPU events here: no GPU needed)."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.ones(8)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        a.add_(1).mul_(2)
        a.add_(3)
    cpu = op_count.device_events(prof.events(), torch.autograd.DeviceType.CPU)
    assert cpu["aten::add_"] == 2 and cpu["aten::mul_"] == 1
    assert op_count.device_events(prof.events(), torch.autograd.DeviceType.CUDA) == {}


def test_launches_need_a_cuda_device():
    with pytest.raises(ValueError, match="device='cpu'"):
        op_count.count_launches(lambda: None, "cpu")
    with pytest.raises(SystemExit):
        op_count.main(["--launches", "--sizes", "1"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("recipe", ["torch-fused", "ours-adamw"])
def test_never_more_gpu_launches_than_torch(recipe):
    """On a GPU each launch costs host and device time: count what really ran."""
    theirs = op_count.measure(recipe, "torch", torch.float32, 24, True, device="cuda", launches=True)
    ours = op_count.measure(recipe, "amp_engine", torch.float32, 24, True, device="cuda",
                            launches=True)
    assert sum(theirs.values()) > 0
    assert _total(ours) <= _total(theirs), f"ours {dict(ours)}\ntorch {dict(theirs)}"
