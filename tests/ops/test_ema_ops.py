"""Tests of megatrain.ops.ema: PYTHONPATH=. python -m pytest -q tests/ops/test_ema_ops.py
(on a GPU, the compiled kernel: MEGATRAIN_TEST_DEVICE=cuda python -m pytest -q tests/ops/test_ema_ops.py)

Every path (blocked PyTorch, our Triton kernel -- under TRITON_INTERPRET=1 on CPU, compiled on CUDA) against the
naive recurrence (fp64, always on CPU: exact and cheap there): forward, the outgoing state and every gradient (u, a,
c, logq, h_in), with ragged lengths, several block sizes, batch > 1, incoming states, document resets and
truncation; fp32/bf16 inputs against PyTorch's own error; the whole MultiDimDampedEMA module on both backends.
The kernel runs fp64 on CUDA too (Triton lowers fp64 exp to libdevice), so the fp64 tolerances hold on both
devices. Inputs are drawn on CPU and moved, so both devices test the same values. Interpreter shapes stay tiny.
"""
import pytest
import torch

from megatrain.model.mega.config import MegaConfig
from megatrain.model.mega.ema import MultiDimDampedEMA
from megatrain.ops.ema import crossing_decay, ema_scan, ema_scan_ref, incoming_contribution
from tests.ops.util import DEVICE
from tests.probes import MaxNumel

NAMES = ["out", "state", "u", "a", "c", "logq", "h_in"]


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("triton_interpreter")
    return request.param


def make_inputs(bsz, length, dim, ndim, resets=None, h_in=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, length, dim, generator=g, dtype=dtype)
    a = torch.randn(dim, ndim, generator=g, dtype=dtype)
    c = torch.randn(dim, ndim, generator=g, dtype=dtype)
    # decays from fast (q ~ 0.05) to slow (q ~ 0.999): both ends of the state's memory are exercised
    logq = torch.log1p(-torch.sigmoid(torch.randn(dim, ndim, generator=g, dtype=dtype) * 3 - 1.5) ** 1.2)
    r = None
    if resets == "random":
        r = torch.rand(bsz, length, generator=g) < 0.12
        r[0, 0] = True                        # a document at the very first position cuts h_in for that row
        r[-1, 5:8] = True                     # one-position documents
    h = torch.randn(bsz, dim, ndim, generator=g, dtype=dtype) if h_in else None
    return u, a, c, logq.to(dtype), r, h


def run(fn, u, a, c, logq, resets, h_in, device="cpu", **kw):
    """out, state and the gradients of a fixed random functional of both, computed on `device` (CPU inputs are
    moved there), returned on CPU."""
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (u, a, c, logq)]
    h = None if h_in is None else h_in.detach().to(device).clone().requires_grad_()
    r = None if resets is None else resets.to(device)
    out, state = fn(*leaves, r, h, **kw)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=out.dtype)
    ws = torch.randn(state.shape, generator=g, dtype=torch.float64).to(device=device, dtype=state.dtype)
    ((out * w).sum() + (state * ws).sum()).backward()
    got = [out.detach(), state.detach()] + [t.grad for t in leaves] + [None if h is None else h.grad]
    return [None if t is None else t.cpu() for t in got]


def assert_all_close(got, want, **tol):
    for name, x, y in zip(NAMES, got, want):
        assert (x is None) == (y is None), name
        if x is not None:
            torch.testing.assert_close(x.double(), y.double(), **tol, msg=lambda m, name=name: f"{name}: {m}")


# ---------------------------------------------------------------- every path vs the naive recurrence (fp64)

@pytest.mark.parametrize("bsz,length,dim,ndim,block,resets,h_in", [
    (1, 1, 3, 2, 8, None, False),             # one position
    (2, 37, 5, 3, 8, "random", True),         # ragged last block, resets, incoming state
    (2, 80, 8, 4, 16, "random", True),
    (3, 29, 6, 4, 128, None, True),           # one block longer than the sequence
    (2, 45, 4, 3, 1, "random", False),        # one position per block
])
def test_matches_reference_fp64(backend, bsz, length, dim, ndim, block, resets, h_in):
    inputs = make_inputs(bsz, length, dim, ndim, resets, h_in)
    got = run(ema_scan, *inputs, device=DEVICE, block=block, backend=backend)
    want = run(ema_scan_ref, *inputs)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("truncation,resets", [(5, "random"), (12, None), (60, "random")])
def test_truncation_matches_reference_fp64(backend, truncation, resets):
    inputs = make_inputs(2, 41, 4, 3, resets)
    got = run(ema_scan, *inputs, device=DEVICE, truncation=truncation, block=8, backend=backend)
    want = run(ema_scan_ref, *inputs, truncation=truncation)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_error_at_most_twice_pytorch_error(dtype, triton_interpreter):
    # inputs in fp32 (u also in bf16); oracle fp64 from the same fp32 values: both paths see the same rounding of
    # u to `dtype`, then fp32 math. The kernel may not be more than 2x less accurate than the PyTorch path.
    u, a, c, logq, resets, h_in = make_inputs(2, 70, 8, 4, "random", True, dtype=torch.float32, seed=3)
    want = run(ema_scan_ref, u.double(), a.double(), c.double(), logq.double(), resets, h_in.double())
    low = (u.to(dtype), a, c, logq, resets, h_in)
    kernel = run(ema_scan, *low, device=DEVICE, block=16, backend="triton")
    torch_path = run(ema_scan, *low, device=DEVICE, block=16, backend="torch")
    for name, k, t, w in zip(NAMES, kernel, torch_path, want):
        assert k.dtype == t.dtype, name              # out/state fp32; d u in u's dtype
        scale = w.abs().max().item()
        err_kernel = (k.double() - w).abs().max().item()
        err_torch = (t.double() - w).abs().max().item()
        assert err_kernel <= 2 * err_torch + 1e-6 * scale, (name, err_kernel, err_torch)
        # and the error is what the dtype allows (not merely as bad as PyTorch's)
        assert err_kernel <= (2 ** -7 if dtype == torch.bfloat16 else 1e-4) * scale, (name, err_kernel, scale)


# ---------------------------------------------------------------- boundary helpers, memory, errors

@pytest.mark.parametrize("block", [4, 16])
def test_boundary_helpers_match_reference(block):
    _, a, c, logq, resets, h_in = make_inputs(2, 23, 5, 3, "random", True)
    zeros = torch.zeros(2, 23, 5, dtype=torch.float64)
    out, state = ema_scan_ref(zeros, a, c, logq, resets, h_in)          # what h_in alone does
    torch.testing.assert_close(incoming_contribution(h_in, c, logq, 23, resets, block), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(crossing_decay(logq, 2, 23, resets) * h_in, state, rtol=0, atol=1e-12)


def test_triton_memory_linear_without_length_dim_ndim_tensor(triton_interpreter):
    length, dim, ndim = 256, 4, 8
    u, a, c, logq, resets, h_in = make_inputs(1, length, dim, ndim, "random", True, dtype=torch.float32)
    with MaxNumel() as probe:
        run(ema_scan, u, a, c, logq, resets, h_in, device=DEVICE, block=32, backend="triton")
    assert probe.max_numel <= length * dim, probe.max_numel        # u-sized; chunk states are L/32 * D * N


def test_clear_errors(monkeypatch):
    u, a, c, logq, resets, h_in = make_inputs(2, 10, 4, 3, "random", True)
    cases = [
        (lambda: ema_scan(u[0], a, c, logq), "u must be"),
        (lambda: ema_scan(u, a[:3], c, logq), "a must be"),
        (lambda: ema_scan(u, a, c[:, :2], logq), "c must be"),
        (lambda: ema_scan(u, a, c, logq, resets.long()), "resets must be bool"),
        (lambda: ema_scan(u, a, c, logq, h_in=h_in[:1]), "h_in must be"),
        (lambda: ema_scan(u, a, c, logq, h_in=h_in, truncation=3), "truncation=3"),
        (lambda: ema_scan(u, a, c, logq, truncation=0), "truncation must be"),
        (lambda: ema_scan(u, a, c, logq, block=0), "block must be"),
        (lambda: ema_scan(u, a, c, logq, backend="cuda"), "kernel_backend='cuda'"),
        (lambda: ema_scan_ref(u, a, c, logq, h_in=h_in, truncation=3), "truncation"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    # the fast path asked for where it cannot run: one line naming the config field, never a silent fallback
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ema = MultiDimDampedEMA(4, 3, bidirectional=False, kernel_backend="triton")
    for fn in (lambda: ema(torch.randn(1, 5, 4)), lambda: ema_scan(u, a, c, logq, backend="triton")):
        with pytest.raises(ValueError, match=r"MegaConfig.kernel_backend='triton': cannot run here") as info:
            fn()
        assert "\n" not in str(info.value)
    # an unknown value: the one check (ops/backend.check_backend), where the op resolves it -- and in MegaConfig
    with pytest.raises(ValueError, match="kernel_backend='cuda': must be one of auto, torch, triton"):
        MultiDimDampedEMA(4, 3, bidirectional=False, kernel_backend="cuda")(torch.randn(1, 5, 4))
    with pytest.raises(ValueError, match="kernel_backend='cuda': must be one of auto, torch, triton"):
        MegaConfig(kernel_backend="cuda")


# ---------------------------------------------------------------- the whole module on both backends

PARAMS = ["damping_factor", "decay_factor", "ema_expansion_matrix", "kernel_projection_matrix", "residual_weight"]


def module_run(backend, bidirectional, truncation=None, with_state=False, with_boundary=False):
    # parameters and inputs drawn on CPU, then moved to DEVICE; both backends run there (fp64)
    torch.manual_seed(0)
    ema = MultiDimDampedEMA(6, 4, bidirectional, truncation=truncation, block_size=8, kernel_backend=backend)
    ema = ema.double()
    with torch.no_grad():
        ema.decay_factor.normal_(0.0, 1.5)
        ema.damping_factor.normal_(0.0, 1.5)
    ema = ema.to(DEVICE)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, 6, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    mask = (torch.rand(2, 30, generator=g) > 0.2).long().to(DEVICE)
    doc_ids = torch.tensor([[0] * 12 + [1] * 18, [0] * 30]).to(DEVICE)
    kwargs = dict(mask=mask, doc_ids=doc_ids)
    fixed = torch.randn(2, 2, 6, 4, generator=g, dtype=torch.float64).to(DEVICE)
    calls = []
    if with_state:
        kwargs["state"] = fixed[0].clone().requires_grad_()
    if with_boundary:
        # the SP interface with a fake exchange: a fixed incoming state per direction, differentiable through the
        # local state and decay it is handed (as the real all-gather + prefix combine is)
        def boundary(state, decay, direction):
            calls.append(direction)
            return fixed[0 if direction == "forward" else 1] + 0.5 * decay * state
        kwargs["boundary"] = boundary
    y, state = ema(x, **kwargs)
    ((y * torch.randn(y.shape, generator=g, dtype=y.dtype).to(DEVICE)).sum() + (state ** 2).sum()).backward()
    extra = [kwargs["state"].grad] if with_state else []
    return [y.detach(), state.detach(), x.grad] + [getattr(ema, n).grad for n in PARAMS] + extra, calls


@pytest.mark.parametrize("bidirectional,truncation,with_state,with_boundary", [
    (False, None, False, True),
    (True, None, False, True),
    (False, None, True, False),
    (True, 7, False, False),
])
def test_module_triton_equals_torch(bidirectional, truncation, with_state, with_boundary, triton_interpreter):
    got, calls = module_run("triton", bidirectional, truncation, with_state, with_boundary)
    want, calls_torch = module_run("torch", bidirectional, truncation, with_state, with_boundary)
    assert calls == calls_torch == (["forward", "backward"][: 1 + bidirectional] if with_boundary else [])
    for i, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10, msg=lambda m, i=i: f"output {i}: {m}")


# The compile of every kernel variant for sm_80/sm_90 (no GPU needed): tests/ops/test_ema_chunked.py.
