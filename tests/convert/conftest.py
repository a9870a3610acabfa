"""Tiny-model tests run single-threaded: on a loaded 2-core machine intra-op threads only contend
(a decode step of a 16-wide model goes from ~100 ms to ~2 ms)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
