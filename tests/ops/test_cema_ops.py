"""Tests of megatrain.ops.cema (Megalodon's complex EMA): PYTHONPATH=. python -m pytest -q tests/ops/test_cema_ops.py
(on a GPU, the compiled kernel: MEGATRAIN_TEST_DEVICE=cuda python -m pytest -q tests/ops/test_cema_ops.py)

Both paths (MEGA's blocked PyTorch EMA with complex coefficients; our Triton kernel -- under TRITON_INTERPRET=1 on
CPU, compiled on CUDA) against the sequential complex128 recurrence: forward, the complex outgoing state and every
gradient (u, p, c, logq, h_in), with ragged lengths, several block sizes, batch > 1, incoming states and document
resets; fp32/bf16 inputs against their own error bound; the state recurrence of ops/ema/state.py on complex pieces
(segments and SP slices); and every Megalodon kernel variant (this op's and the timestep norm's) compiled for
sm_80/sm_90 without a GPU. Inputs are drawn on CPU (fp64) and moved, so both devices test the same values.
"""
import pytest
import torch

from megatrain.ops.cema import cema_scan, cema_scan_ref, crossing_decay, incoming_contribution
from megatrain.ops.ema.state import carry, prefix
from tests.ops.test_ema_chunked import compile_family
from tests.ops.test_ema_ops import backend  # noqa: F401  (the fixture: torch, and triton interpreted)
from tests.ops.util import DEVICE, cpu_only
from tests.probes import MaxNumel

NAMES = ["out", "state", "u", "p", "c", "logq", "h_in"]


def make_inputs(bsz, length, dim, ndim, resets=None, h_in=False, seed=0):
    """fp64 / complex128 inputs: decays |q| from fast (~0.05) to slow (~0.999), angles in (0, 2 pi / N * n]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(bsz, length, dim, generator=g, dtype=torch.float64)
    p = torch.sigmoid(torch.randn(dim, ndim, generator=g, dtype=torch.float64))
    c = torch.complex(torch.randn(dim, ndim, generator=g, dtype=torch.float64),
                      torch.randn(dim, ndim, generator=g, dtype=torch.float64)) * ndim ** -0.5
    mag = torch.log1p(-torch.sigmoid(torch.randn(dim, ndim, generator=g, dtype=torch.float64) * 3 - 1.5) ** 1.2)
    angle = torch.rand(dim, 1, generator=g, dtype=torch.float64) * torch.arange(1, ndim + 1) * (6.2832 / ndim)
    logq = torch.complex(mag, angle)
    r = None
    if resets == "random":
        r = torch.rand(bsz, length, generator=g) < 0.12
        r[0, 0] = True                        # a document at the very first position cuts h_in for that row
        r[-1, 5:8] = True                     # one-position documents
    h = torch.complex(torch.randn(bsz, dim, ndim, generator=g, dtype=torch.float64),
                      torch.randn(bsz, dim, ndim, generator=g, dtype=torch.float64)) if h_in else None
    return u, p, c, logq, r, h


def run(fn, u, p, c, logq, resets, h_in, device="cpu", **kw):
    """out, state and the gradients of a fixed random real functional of both, computed on `device`."""
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (u, p, c, logq)]
    h = None if h_in is None else h_in.detach().to(device).clone().requires_grad_()
    r = None if resets is None else resets.to(device)
    out, state = fn(*leaves, r, h, **kw)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=device, dtype=out.dtype)
    ws = torch.randn(state.shape, generator=g, dtype=torch.complex128).to(device=device, dtype=state.dtype)
    ((out * w).sum() + (state * ws).real.sum()).backward()
    got = [out.detach(), state.detach()] + [t.grad for t in leaves] + [None if h is None else h.grad]
    return [None if t is None else t.cpu() for t in got]


def assert_all_close(got, want, **tol):
    for name, x, y in zip(NAMES, got, want):
        assert (x is None) == (y is None), name
        if x is not None:
            y = y.to(torch.complex128 if y.is_complex() else torch.float64)
            torch.testing.assert_close(x.to(y.dtype), y, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bsz,length,dim,ndim,block,resets,h_in", [
    (1, 1, 3, 2, 8, None, False),             # one position
    (2, 37, 5, 3, 8, "random", True),         # ragged last block, resets, incoming state
    (2, 80, 8, 4, 16, "random", True),
    (3, 29, 6, 16, 128, None, True),          # one block longer than the sequence; Megalodon's N = 16
    (2, 45, 4, 3, 1, "random", False),        # one position per block
])
def test_matches_reference_fp64(backend, bsz, length, dim, ndim, block, resets, h_in):
    inputs = make_inputs(bsz, length, dim, ndim, resets, h_in)
    got = run(cema_scan, *inputs, device=DEVICE, block=block, backend=backend)
    want = run(cema_scan_ref, *inputs)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_bounded(backend, dtype):
    # inputs rounded to fp32 (u also to bf16), the oracle in complex128 from the same values: the math is fp32 on
    # both paths, so the error is what the input dtype allows; the kernel may not be more than 2x worse than PyTorch
    u, p, c, logq, resets, h_in = make_inputs(2, 70, 8, 16, "random", True, seed=3)
    low = (u.float().to(dtype), p.float(), c.to(torch.complex64), logq.to(torch.complex64), resets,
           h_in.to(torch.complex64))
    want = run(cema_scan_ref, low[0].double(), *[t.to(torch.complex128) if t.is_complex() else t.double()
                                                  for t in low[1:4]], resets, low[5].to(torch.complex128))
    got = run(cema_scan, *low, device=DEVICE, block=16, backend=backend)
    torch_path = run(cema_scan, *low, device=DEVICE, block=16, backend="torch")
    for name, k, t, w in zip(NAMES, got, torch_path, want):
        scale = w.abs().max().item()
        err = (k.to(w.dtype) - w).abs().max().item()
        err_torch = (t.to(w.dtype) - w).abs().max().item()
        assert err <= (2 ** -7 if dtype == torch.bfloat16 else 1e-4) * scale, (name, err, scale)
        assert err <= 2 * err_torch + 1e-6 * scale, (name, err, err_torch)
        if name == "u":
            assert k.dtype == dtype
        elif name == "state":
            assert k.dtype == torch.complex64


@pytest.mark.parametrize("block", [4, 16])
def test_boundary_helpers_match_reference(block):
    # what an incoming complex state alone does: the closed forms SP and segments add afterwards
    _, p, c, logq, resets, h_in = make_inputs(2, 23, 5, 3, "random", True)
    zeros = torch.zeros(2, 23, 5, dtype=torch.float64)
    out, state = cema_scan_ref(zeros, p, c, logq, resets, h_in)
    torch.testing.assert_close(incoming_contribution(h_in, c, logq, 23, resets, block), out, rtol=0, atol=1e-12)
    torch.testing.assert_close(crossing_decay(logq, 2, 23, resets) * h_in, state, rtol=0, atol=1e-12)


def test_pieces_through_the_shared_state_recurrence():
    # a sequence cut into pieces, each scanned alone from zero; state.py's prefix hands the complex state from
    # piece to piece (a document starting exactly at an edge cuts it): output, state and every gradient equal the
    # unsplit scan -- the mechanism of segments and SP slices, for the complex state
    u, p, c, logq, resets, h_in = make_inputs(2, 40, 4, 3, "random", True, seed=7)
    resets[1, 17] = True                                   # exactly at the edge of pieces 1 and 2
    bounds = [(0, 9), (9, 17), (17, 18), (18, 40)]

    def split(u, p, c, logq, resets, h_in):
        outs, locs, decays = [], [], []
        for s, e in bounds:
            out, loc = cema_scan(u[:, s:e], p, c, logq, resets[:, s:e], block=4)
            outs.append(out)
            locs.append(loc)
            decays.append(crossing_decay(logq, 2, e - s, resets[:, s:e]))
        keep = torch.stack([torch.ones(2, dtype=torch.bool)] + [~resets[:, s] for s, _ in bounds[1:]])
        entering = prefix(torch.stack(locs), torch.stack(decays), keep, h_in)
        outs = [o + incoming_contribution(h, c, logq, e - s, resets[:, s:e], block=4)
                for o, h, (s, e) in zip(outs, entering, bounds)]
        return torch.cat(outs, 1), carry(locs[-1], decays[-1], keep[-1], entering[-1])

    got = run(split, u, p, c, logq, resets, h_in)
    want = run(cema_scan_ref, u, p, c, logq, resets, h_in)
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


def test_triton_memory_linear(triton_interpreter):
    length, dim, ndim = 256, 4, 8
    u, p, c, logq, resets, h_in = make_inputs(1, length, dim, ndim, "random", True)
    low = (u.float(), p.float(), c.to(torch.complex64), logq.to(torch.complex64), resets, h_in.to(torch.complex64))
    with MaxNumel() as probe:
        run(cema_scan, *low, device=DEVICE, block=32, backend="triton")
    assert probe.max_numel <= length * dim, probe.max_numel        # u-sized; chunk states are L/32 * D * N


def test_clear_errors(monkeypatch):
    u, p, c, logq, resets, h_in = make_inputs(2, 10, 4, 3, "random", True)
    cases = [
        (lambda: cema_scan(u[0], p, c, logq), "u must be"),
        (lambda: cema_scan(u, c, c, logq), "p must be real"),
        (lambda: cema_scan(u, p, c.real, logq), "c must be complex"),
        (lambda: cema_scan(u, p, c, logq[:2]), "logq must be complex"),
        (lambda: cema_scan(u, p, c, logq, resets.long()), "resets must be bool"),
        (lambda: cema_scan(u, p, c, logq, h_in=h_in.real), "h_in must be complex"),
        (lambda: cema_scan(u, p, c, logq, block=0), "block must be"),
        (lambda: cema_scan(u, p, c, logq, backend="cuda"), "kernel_backend='cuda'"),
        (lambda: cema_scan(u, p, c, logq, backend="torch", path="scan"), "contradicts"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"MegaConfig.kernel_backend='triton': cannot run here") as info:
            cema_scan(u, p, c, logq, backend="triton")
        assert "\n" not in str(info.value)


@cpu_only("compiles for sm_80/sm_90 without a GPU; on CUDA the tests run every kernel compiled")
@pytest.mark.slow
def test_every_megalodon_kernel_variant_compiles_for_sm80_and_sm90():
    # the complex EMA's and the timestep norm's kernels (tests/ops/kernel_compile.py), bf16 and fp32 inputs, with
    # resets and padding, for both GPU generations (~35 s uncached on 2 cores)
    lines = compile_family("megalodon")
    assert len(lines) == 2 * (6 + 4 + 4 + 4), lines      # per arch: cema 6 fp32 + 4 bf16, tsn 4 per dtype
    for arch in (80, 90):
        for kernel in ("_cema_forward_chunk", "_cema_backward_chunk", "_cema_scan_chunks", "_tsn_summary",
                       "_tsn_normalize", "_tsn_backward_terms", "_tsn_backward_dx"):
            assert any(f"sm_{arch} " in line and f".{kernel} " in line for line in lines), (arch, kernel)


def test_megalodon_model_on_the_kernels_equals_torch(triton_interpreter, monkeypatch):
    # kernel_backend="triton" (the interpreter on CPU): the complex EMA and both timestep norms run our kernels,
    # attention FlexAttention; logits and every parameter gradient equal the PyTorch path's (fp64 on CPU), with
    # left padding and two documents
    import torch.nn.attention.flex_attention as flex_mod

    from megatrain.model import MegalodonConfig, MegalodonForCausalLM
    from tests.model.util import ids
    from tests.ops.util import ON_CUDA
    if not ON_CUDA:
        monkeypatch.setattr(flex_mod, "_validate_device", lambda *args: None)   # FlexAttention's backward on CPU
    length, dtype = (32, torch.float32) if ON_CUDA else (16, torch.float64)
    x = ids(2, length).to(DEVICE)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    doc = (torch.arange(length) >= 6).long().expand(2, length).to(DEVICE)
    res = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = MegalodonForCausalLM(MegalodonConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, shared_representation_size=16,
            intermediate_size=16, nffn_hidden_size=32, cema_ndim=2, chunk_size=8, norm_num_groups=2,
            kernel_backend=backend)).to(device=DEVICE, dtype=dtype).train()
        out = model(x, attention_mask=mask, labels=x, doc_ids=doc)
        out.loss.backward()
        res[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = res["torch"], res["triton"]
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(l1[real], l0[real], **tol)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], **tol, msg=lambda m, n=n: f"{n}: {m}")
