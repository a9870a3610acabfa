"""Op tests: Triton kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

triton wraps its own library functions (tl.sum, ...) for interpreter or compiler once, when triton is first
imported, so on a machine without CUDA -- where compiled Triton cannot run anyway -- this conftest imports triton
with TRITON_INTERPRET=1 and then restores the environment. megatrain's own kernels are wrapped per mode at first
launch (megatrain.ops.ema.triton_kernel._kernels), so the variable itself is only set per test, by the
`triton_interpreter` fixture, and never leaks into other tests. triton is a dev dependency: a machine without it
fails these tests rather than skipping them.
"""
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    except ImportError:
        pass  # reported by the tests that need it
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved


@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for this test only (monkeypatch restores it)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.standard.sum, InterpretedFunction):
        pytest.fail("triton was imported for the compiler before tests/ops/conftest.py could import it for the "
                    "interpreter; run the op tests in a process that has not imported triton yet")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
