"""Where the op tests run, from MEGATRAIN_TEST_DEVICE: "cpu" (default: the Triton kernels under the Triton
interpreter, FlexAttention eagerly) or "cuda" (the compiled kernels; bench/gpu/check.sh runs
`MEGATRAIN_TEST_DEVICE=cuda python3 -m pytest -q tests/ops` on the GPU machine). tests/ops/conftest.py checks the
value and sets up either mode."""
import os

import pytest

DEVICE = os.environ.get("MEGATRAIN_TEST_DEVICE", "cpu")
ON_CUDA = DEVICE == "cuda"


def cpu_only(why: str):
    """Skip a test that only makes sense without a GPU (interpreter or CPU specifics) when running on CUDA."""
    return pytest.mark.skipif(ON_CUDA, reason=f"CPU-only ({why})")
