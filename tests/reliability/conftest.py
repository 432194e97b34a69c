"""Reliability tests: hypothesis profiles and one intra-op thread.

Profiles (hypothesis): "ci" (the default here) runs a modest, derandomized
number of examples so CI stays fast and reproducible; "long" runs many random
examples on demand: ``HYPOTHESIS_PROFILE=long python -m pytest tests/reliability``
(or pytest's ``--hypothesis-profile=long``). The fuzz tests scale the example
count down for the Triton interpreter (≈1.4 s per million elements on a CPU).
"""
import importlib.util
import os

import pytest
import torch

# hypothesis is optional (the `test` extra): without it the fuzz module skips with the
# reason, and the other reliability tests still run
if importlib.util.find_spec("hypothesis") is not None:
    from hypothesis import HealthCheck, settings

    _SLOW_CHECKS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_SLOW_CHECKS, print_blob=True)
    settings.register_profile("long", max_examples=1500, deadline=None,
                              suppress_health_check=_SLOW_CHECKS, print_blob=True)
    # an explicit choice (the variable, or pytest's --hypothesis-profile) wins over our default
    _chosen = os.environ.get("HYPOTHESIS_PROFILE")
    if _chosen is not None:
        settings.load_profile(_chosen)
    elif settings.get_current_profile_name() == "default":
        settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors on shared cores: torch's thread pool costs more than it saves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
