"""Op tests: on CPU (default) the Triton kernels run on CPU tensors under the Triton interpreter
(TRITON_INTERPRET=1); with MEGATRAIN_TEST_DEVICE=cuda (tests/ops/util.py) they run compiled, on CUDA tensors.

CPU: triton builds its library functions (tl.sum, ...) and every @triton.jit kernel for interpreter or compiler
once, at import, so the root tests/conftest.py imports triton and megatrain's kernels for the interpreter before any
test module can import triton (the whole suite runs in one process); the variable itself is set only per test, by
the `triton_interpreter` fixture (megatrain.ops.backend reads it per call), so it never leaks into other tests. triton is a dev dependency: a machine without it fails these tests rather than skipping them.

CUDA: nothing is interpreted (TRITON_INTERPRET must be unset, `triton_interpreter` does nothing), and
torch.compile(flex_attention) -- the production attention path on CUDA -- compiles once per shape/mask/dtype the
tests use: automatic dynamic shapes off (every shape static, as in training), a recompile limit above the number of
variants, and hitting it is an error (never a silent eager fallback).
"""
import os

import pytest
import torch

from tests.ops.util import DEVICE, ON_CUDA

if DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"MEGATRAIN_TEST_DEVICE={DEVICE!r}: expected 'cpu' or 'cuda'")
if ON_CUDA and not torch.cuda.is_available():
    raise pytest.UsageError("MEGATRAIN_TEST_DEVICE=cuda but torch.cuda.is_available() is False (torch "
                            f"{torch.__version__}, CUDA {torch.version.cuda})")
if ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise pytest.UsageError("MEGATRAIN_TEST_DEVICE=cuda runs the compiled kernels: unset TRITON_INTERPRET")

@pytest.fixture
def triton_interpreter(monkeypatch):
    """TRITON_INTERPRET=1 for this test only (monkeypatch restores it); nothing on CUDA (compiled kernels)."""
    if ON_CUDA:
        return
    from triton.runtime.interpreter import InterpretedFunction

    from megatrain.ops.ema import triton_kernel
    if not isinstance(triton_kernel._forward_chunk, InterpretedFunction):
        pytest.fail("triton was imported for the compiler before tests/ops/conftest.py could import it for the "
                    "interpreter; run the op tests in a process that has not imported triton yet")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _compiled_flex_settings():
    """CUDA: static shapes, room for every compiled FlexAttention variant, and a loud error past it (see above)."""
    if not ON_CUDA:
        yield
        return
    import torch._dynamo

    cfg = torch._dynamo.config
    wanted = dict(automatic_dynamic_shapes=False, recompile_limit=64, fail_on_recompile_limit_hit=True)
    saved = {k: getattr(cfg, k) for k in wanted if hasattr(cfg, k)}
    for k in saved:
        setattr(cfg, k, wanted[k])
    yield
    for k, v in saved.items():
        setattr(cfg, k, v)
