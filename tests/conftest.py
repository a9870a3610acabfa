"""Shared pytest setup: offline, and CPU tests deterministic. (pytest puts the repository root on sys.path itself:
tests/ is a package, so `megatrain` and `tests.*` import from the checkout.)"""
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (after the environment defaults above)

# Triton wraps its library functions and every @triton.jit kernel for the interpreter or the compiler once, at
# import. Without CUDA (where compiled Triton cannot run) import them for the interpreter now, before any test module
# can import triton (tests/ops sets TRITON_INTERPRET=1 per test; see tests/ops/conftest.py).
if os.environ.get("MEGATRAIN_TEST_DEVICE", "cpu") != "cuda" and "triton" not in sys.modules \
        and not torch.cuda.is_available():
    _saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import megatrain.ops.ema.triton_kernel  # noqa: F401  (imports triton)
        import megatrain.ops.ema.triton_chunked  # noqa: F401
        import megatrain.ops.cema.triton_kernel  # noqa: F401
        import megatrain.ops.tsn.triton_kernel  # noqa: F401
    except ImportError:
        pass  # reported by the tests that need it
    finally:
        if _saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _saved

# Tiny test models run 10-40x faster on one thread than on two contended ones; multi-process tests start their own
# interpreters and set threads themselves.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def megalodon_run(tmp_path_factory):
    """(run folder, tokenizer folder) of a tiny real Megalodon run (tests/export/run_fixture.py: ZeRO-3, SP 2, 2
    steps, ~40 s), made once for the export and client tests (tests/export/test_export.py,
    tests/hf/test_hf_clients.py)."""
    from tests.export.run_fixture import make_run
    return make_run(str(tmp_path_factory.mktemp("megalodon_run")), config="megalodon_tiny.yaml")
