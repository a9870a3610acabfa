"""Tests of the chunked tensor-core EMA (megatrain/ops/ema/triton_chunked.py), the path table (ops/ema/paths.py)
and the sm_80/sm_90 compile of every EMA kernel variant:
    PYTHONPATH=. python -m pytest -q tests/ops/test_ema_chunked.py
(on a GPU, compiled: MEGATRAIN_TEST_DEVICE=cuda python -m pytest -q tests/ops/test_ema_chunked.py)

On CPU the kernels run under TRITON_INTERPRET=1 (tests/ops/conftest.py): tiny shapes, C = 16 (block <= 16) unless a
case asks for the 64-position chunk. Lengths are picked to hit the kernel's edges: one position, ragged fronts
(the sequence is right-aligned on the chunk grid), several 16-chunk tiles (the state carried between tiles), a
chunk count that is a multiple of the tile (the state after the last chunk lives one tile further), N > 16
(padded state lanes), resets at the first position, in consecutive positions and several in one chunk.
"""
import os
import subprocess
import sys

import pytest
import torch

from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.ops.ema import EMA_PATH_TABLE, EMA_PATHS, choose_path, ema_scan, ema_scan_ref, paths
from megatrain.ops.ema.triton_chunked import ema_scan_chunked
from tests.ops.test_ema_ops import NAMES, assert_all_close, make_inputs, module_run, run
from tests.ops.util import DEVICE, cpu_only
from tests.probes import MaxNumel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def chunked(*args, **kw):
    return ema_scan(*args, backend="triton", path="chunked", **kw)


# ---------------------------------------------------------------- exact against the naive recurrence (fp64)

@pytest.mark.parametrize("bsz,length,dim,ndim,block,resets,h_in", [
    (1, 1, 3, 2, 16, None, False),            # one position: 15 padding positions in front
    (2, 37, 5, 3, 16, "random", True),        # ragged front, resets, incoming state
    (2, 300, 3, 4, 16, "random", True),       # 19 chunks: two tiles, the state carried from tile to tile
    (1, 256, 2, 3, 16, None, False),          # 16 chunks: the end state is the next tile's first column
    (1, 240, 2, 17, 16, "random", False),     # N = 17: state lanes padded to 32
    (2, 130, 3, 3, 128, "random", True),      # C = 64 (block 128 -> the table's chunk)
    (1, 1100, 2, 3, 128, "random", True),     # C = 64, 18 chunks: two tiles
])
def test_chunked_matches_reference_fp64(triton_interpreter, bsz, length, dim, ndim, block, resets, h_in):
    inputs = make_inputs(bsz, length, dim, ndim, resets, h_in)
    got = run(chunked, *inputs, device=DEVICE, block=block)
    want = run(ema_scan_ref, *inputs)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


def test_chunked_many_resets_in_one_chunk(triton_interpreter):
    # every other position a document start, plus runs of one-position documents: up to 9 segments per chunk
    u, a, c, logq, _, h_in = make_inputs(2, 40, 3, 4, None, True, seed=5)
    resets = torch.zeros(2, 40, dtype=torch.bool)
    resets[0, ::2] = True
    resets[1, 3:12] = True
    got = run(chunked, u, a, c, logq, resets, h_in, device=DEVICE, block=16)
    want = run(ema_scan_ref, u, a, c, logq, resets, h_in)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_chunked_token_major_layout_equals_channel_major(triton_interpreter, dtype):
    # the kernels' in-place [B, L, D] addressing (channel_major=False) against the default [B, D, L] copies
    inputs = make_inputs(2, 300, 3, 4, "random", True, dtype=torch.float32 if dtype != torch.float64 else dtype)
    u, rest = inputs[0].to(dtype), inputs[1:]
    got = run(ema_scan_chunked, u, *rest, device=DEVICE, chunk=16, channel_major=False)
    want = run(ema_scan_chunked, u, *rest, device=DEVICE, chunk=16, channel_major=True)
    for name, x, y in zip(NAMES, got, want):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("truncation,resets", [(5, "random"), (20, None)])
def test_chunked_truncation_matches_reference_fp64(triton_interpreter, truncation, resets):
    inputs = make_inputs(2, 41, 4, 3, resets)
    got = run(chunked, *inputs, device=DEVICE, truncation=truncation, block=16)
    want = run(ema_scan_ref, *inputs, truncation=truncation)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_error_at_most_twice_pytorch_error(dtype, triton_interpreter):
    # as tests/ops/test_ema_ops.py for the scan kernel: same rounding of u, fp32 math; bf16 runs the tensor-core
    # mode (fp32 factors and gradients split into bf16 hi + lo pairs), which may not be 2x worse than PyTorch
    u, a, c, logq, resets, h_in = make_inputs(2, 70, 8, 4, "random", True, dtype=torch.float32, seed=3)
    want = run(ema_scan_ref, u.double(), a.double(), c.double(), logq.double(), resets, h_in.double())
    low = (u.to(dtype), a, c, logq, resets, h_in)
    kernel = run(chunked, *low, device=DEVICE, block=16)
    torch_path = run(ema_scan, *low, device=DEVICE, block=16, backend="torch")
    for name, k, t, w in zip(NAMES, kernel, torch_path, want):
        assert k.dtype == t.dtype, name
        scale = w.abs().max().item()
        err_kernel = (k.double() - w).abs().max().item()
        err_torch = (t.double() - w).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6 * scale, (name, err_kernel, err_torch)
        assert err_kernel <= (2 ** -7 if dtype == torch.bfloat16 else 1e-4) * scale, (name, err_kernel, scale)


def test_chunked_memory_linear(triton_interpreter):
    # nothing [L, D, N]-sized: u-sized tensors, chunk-entering states (L/C * D * N) and D * C * C factors
    length, dim, ndim = 512, 4, 8
    u, a, c, logq, resets, h_in = make_inputs(1, length, dim, ndim, "random", True, dtype=torch.float32)
    with MaxNumel() as probe:
        run(chunked, u, a, c, logq, resets, h_in, device=DEVICE, block=16)
    assert probe.max_numel <= length * dim, probe.max_numel


def test_module_on_chunked_path_equals_torch(triton_interpreter, monkeypatch):
    # the model reaches the chunked kernel through `auto` and the table (here: every length -> chunked), with the
    # SP boundary interface and both directions
    for row in list(EMA_PATH_TABLE):  # every row: the interpreter's on CPU, the GPU's under MEGATRAIN_TEST_DEVICE
        monkeypatch.setitem(EMA_PATH_TABLE, row, dict(measured=False, bands=((1, "chunked"),), chunk=64))
    seen = []
    real = paths.choose_path
    monkeypatch.setattr("megatrain.ops.ema.choose_path", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    got, calls = module_run("triton", True, None, False, True)
    assert set(seen) == {"chunked"}, seen
    want, calls_torch = module_run("torch", True, None, False, True)
    assert calls == calls_torch == ["forward", "backward"]
    for i, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=lambda m, i=i: f"output {i}: {m}")


def test_module_hands_its_unresolved_backend_to_the_table(monkeypatch):
    # `auto` must reach ops/ema/paths.py as "auto" (a resolved "triton" would keep a GPU row's blocked band from
    # ever running, a resolved "torch" every kernel)
    seen = []
    real = paths.choose_path
    monkeypatch.setattr("megatrain.ops.ema.choose_path", lambda requested, *a, **k: seen.append(requested) or
                        real(requested, *a, **k))
    ema = MultiDimDampedEMA(4, 3, bidirectional=True, kernel_backend="auto")
    ema(torch.randn(1, 9, 4))
    assert seen == ["auto", "auto"], seen


# ---------------------------------------------------------------- the path table

def test_path_table_is_well_formed():
    for row, entry in EMA_PATH_TABLE.items():
        starts = [start for start, _ in entry["bands"]]
        assert starts[0] == 1 and starts == sorted(set(starts)), row
        assert all(p in EMA_PATHS for _, p in entry["bands"]), row
        assert entry["chunk"] in (16, 32, 64) and entry["measured"] in (True, False), row


def test_choose_path(monkeypatch):
    u = torch.zeros(1, 4096, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert choose_path("auto", u) == "blocked" == choose_path("torch", u)          # CPU: PyTorch only
    with pytest.raises(ValueError, match="kernel_backend='triton': cannot run here"):
        choose_path("auto", u, "chunked")                                         # asked for, cannot run
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_path("triton", u) == "scan"                                     # the interpreter's row
    assert choose_path("triton", u, "chunked") == "chunked" == choose_path("auto", u, "chunked")
    for requested, path in (("torch", "scan"), ("torch", "chunked"), ("triton", "blocked")):
        with pytest.raises(ValueError, match=f"path='{path}' contradicts backend='{requested}'"):
            choose_path(requested, u, path)
    with pytest.raises(ValueError, match="path='fast': must be one of"):
        choose_path("triton", u, "fast")
    # a GPU row, by length: decode and short inputs stay on the scan, long ones run chunked
    monkeypatch.setattr(paths, "resolve_backend", lambda requested, t: "triton")
    monkeypatch.setattr(paths, "device_row", lambda t: "sm_90")
    assert [choose_path("auto", torch.zeros(1, n, 2)) for n in (1, 2047, 2048, 131072)] == \
        ["scan", "scan", "chunked", "chunked"]
    # a row that prefers PyTorch: `auto` takes it, an explicit triton request gets the kernel below it
    monkeypatch.setitem(EMA_PATH_TABLE, "sm_90", dict(measured=True, bands=((1, "scan"), (8, "blocked")), chunk=64))
    assert choose_path("auto", torch.zeros(1, 64, 2)) == "blocked"
    assert choose_path("triton", torch.zeros(1, 64, 2)) == "scan"


def test_chunk_length():
    assert [paths.chunk_length(b, "sm_90") for b in (1, 8, 16, 17, 32, 64, 128, 4096)] == \
        [16, 16, 16, 32, 32, 64, 64, 64]


# ---------------------------------------------------------------- every kernel variant compiled, without a GPU

@cpu_only("compiles for sm_80/sm_90 without a GPU; on CUDA the tests run every kernel compiled")
@pytest.mark.slow
def test_every_ema_kernel_variant_compiles_for_sm80_and_sm90():
    # the interpreter runs the kernels' Python; only the compiler sees typing/lowering errors (a 1-bit mask in
    # shared memory, a dot shape): compile every variant of both kernels for both GPU generations in a fresh
    # process (this one imported triton for the interpreter); Triton's cache makes a rerun of unchanged kernels
    # fast
    lines = compile_family("ema")
    # scan kernel: (4 bf16 + 6 fp32) x 2 archs + 6 fp64 on sm_90 = 26; chunked (fwd, bwd): 2 x (2 dtypes x 2 archs
    # + fp64 on sm_90 + the [B, L, D] layout on sm_90) = 12
    assert len(lines) == 26 + 12, lines
    for arch in (80, 90):
        for kernel in ("_forward_chunk", "_backward_chunk", "_scan_chunks", "_ema_chunked_fwd", "_ema_chunked_bwd"):
            assert any(f"sm_{arch} " in line and f".{kernel} " in line for line in lines), (arch, kernel)


def compile_family(family: str) -> list[str]:
    """tests/ops/kernel_compile.py for `family` in a fresh process (triton for the compiler): its output lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "tests.ops.kernel_compile", family], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.splitlines()
