"""Op tests: Triton kernels run on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).

triton builds its library functions (tl.sum, ...) and every @triton.jit kernel for interpreter or compiler once,
at import. So on a machine without CUDA -- where compiled Triton cannot run anyway -- this conftest imports triton
and megatrain's kernels with TRITON_INTERPRET=1 and then restores the environment; the variable itself is set
only per test, by the `triton_interpreter` fixture (megatrain.ops.backend reads it per call), so it never leaks
into other tests. triton is a dev dependency: a machine without it fails these tests rather than skipping them.
"""
import os
import sys

import pytest
import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import megatrain.ops.ema.triton_kernel  # noqa: F401  (imports triton)
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
    from triton.runtime.interpreter import InterpretedFunction

    from megatrain.ops.ema import triton_kernel
    if not isinstance(triton_kernel._forward_chunk, InterpretedFunction):
        pytest.fail("triton was imported for the compiler before tests/ops/conftest.py could import it for the "
                    "interpreter; run the op tests in a process that has not imported triton yet")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
