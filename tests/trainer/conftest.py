"""Trainer tests: tiny models on the CPU, one intra-op thread.

The test machines are shared by several processes on two cores; torch's
OpenMP threads then spin against each other and a tiny step takes 25x longer.
One thread keeps the whole folder fast; nothing here depends on parallelism.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
