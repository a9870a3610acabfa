"""Tests of megatrain.model.mega.ema: PYTHONPATH=. python -m pytest -q tests/model/test_ema.py

The fast blocked EMA is compared with the naive recurrence `ema_ref` (fp64), with transformers' MEGA EMA (fp32,
copied weights), and with itself split into pieces (state hand-off, simulated sequence-parallel boundary exchange).
"""

import pytest
import torch

from megatrain.model.mega.ema import MultiDimDampedEMA, ema_ref
from tests.probes import MaxNumel

PARAMS = ["damping_factor", "decay_factor", "ema_expansion_matrix", "kernel_projection_matrix", "residual_weight"]


def make_ema(d=6, n=4, bidirectional=False, truncation=None, block=8, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    ema = MultiDimDampedEMA(d, n, bidirectional, truncation=truncation, block_size=block).to(dtype)
    with torch.no_grad():  # spread the decays so that both fast and slow EMA dimensions are exercised
        ema.decay_factor.normal_(0.0, 1.5)
        ema.damping_factor.normal_(0.0, 1.5)
    return ema


def doc_ids_from_lengths(lengths_per_row):
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]) for lengths in lengths_per_row]
    return torch.stack(rows)


def grads(ema, *tensors):
    return [p.grad.clone() for p in (getattr(ema, n) for n in PARAMS)] + [t.grad.clone() for t in tensors]


def zero_grads(ema, *tensors):
    for t in [getattr(ema, n) for n in PARAMS] + list(tensors):
        t.grad = None


# ---------------------------------------------------------------- vs the naive recurrence (fp64)

@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length,block", [(1, 8), (7, 8), (8, 8), (37, 8), (64, 16), (50, 128)])
def test_matches_ref_fp64(bidirectional, length, block):
    ema = make_ema(bidirectional=bidirectional, block=block)
    x = torch.randn(3, length, 6, dtype=torch.float64)
    mask = (torch.rand(3, length) > 0.25).long()
    y, state = ema(x, mask=mask)
    y_ref, state_ref = ema_ref(x, ema, mask=mask)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_grads_match_ref(bidirectional):
    ema = make_ema(bidirectional=bidirectional, block=8)
    x = torch.randn(2, 29, 6, dtype=torch.float64, requires_grad=True)
    doc_ids = doc_ids_from_lengths([[10, 19], [29]])
    w = torch.randn(2, 29, 6, dtype=torch.float64)
    ws = torch.randn(2, 6, 4, dtype=torch.float64)
    results = []
    for fn in (ema, lambda *a, **k: ema_ref(*a, ema, **k)):
        zero_grads(ema, x)
        y, s = fn(x, doc_ids=doc_ids)
        ((y * w).sum() + (s * ws).sum()).backward()
        results.append(grads(ema, x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_gradcheck_small():
    ema = make_ema(d=2, n=2, bidirectional=True, block=4)
    x = torch.randn(1, 9, 2, dtype=torch.float64, requires_grad=True)
    doc_ids = doc_ids_from_lengths([[3, 6]])
    assert torch.autograd.gradcheck(lambda x, *p: ema(x, doc_ids=doc_ids)[0], (x, *ema.parameters()))


# ---------------------------------------------------------------- vs transformers' MEGA (fp32)

def hf_ema(ema, truncation):
    from transformers.models.deprecated.mega.configuration_mega import MegaConfig
    from transformers.models.deprecated.mega.modeling_mega import MegaMultiDimensionDampedEma
    cfg = MegaConfig(hidden_size=ema.hidden_size, ema_projection_size=ema.ema_projection_size,
                     bidirectional=ema.bidirectional, truncation=truncation)
    hf = MegaMultiDimensionDampedEma(cfg)
    hf.load_state_dict(ema.state_dict())
    return hf


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("truncation", [None, 5, 40, 500])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matches_transformers(bidirectional, truncation, with_mask):
    ema = make_ema(d=16, n=8, bidirectional=bidirectional, truncation=truncation, block=16, dtype=torch.float32)
    hf = hf_ema(ema, truncation)
    x = torch.randn(2, 83, 16)
    mask = (torch.rand(2, 83) > 0.2).long() if with_mask else None
    y, _ = ema(x, mask=mask)
    y_hf, _ = hf(x.transpose(0, 1), attention_mask=mask)
    torch.testing.assert_close(y, y_hf.transpose(0, 1), rtol=0, atol=1e-5)
    # gradients agree too (HF's FFT path vs our blocked one)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_hf.transpose(0, 1) * g).sum().backward()
    for name in PARAMS:
        torch.testing.assert_close(getattr(ema, name).grad, getattr(hf, name).grad, rtol=1e-4, atol=1e-4)


def test_truncation_matches_ref_with_doc_resets():
    ema = make_ema(bidirectional=True, truncation=6, block=8)
    x = torch.randn(2, 40, 6, dtype=torch.float64)
    doc_ids = doc_ids_from_lengths([[3, 20, 17], [40]])
    torch.testing.assert_close(ema(x, doc_ids=doc_ids)[0], ema_ref(x, ema, doc_ids=doc_ids)[0], rtol=0, atol=1e-12)


def test_init_matches_transformers_distributions():
    torch.manual_seed(0)
    ema = MultiDimDampedEMA(64, 16, bidirectional=True)
    ema.reset_parameters(delta_alpha_range=0.2, beta_range=0.02, gamma_omega_range=1.0)
    assert ema.damping_factor.shape == (128, 16, 1) and ema.kernel_projection_matrix.shape == (128, 16)
    assert ema.residual_weight.shape == (64,)
    assert abs(ema.damping_factor.std().item() - 0.2) < 0.02 and abs(ema.decay_factor.std().item() - 0.2) < 0.02
    beta = ema.ema_expansion_matrix[..., 0]
    signs = torch.tensor([1.0, -1.0] * 8)
    assert (beta - signs).abs().max() < 0.15 and abs((beta - signs).std().item() - 0.02) < 0.003
    assert abs(ema.kernel_projection_matrix.std().item() - 1.0) < 0.1


def test_init_draws_exactly_what_transformers_draws():
    # same distributions in the same order: with one seed the initial weights are identical
    from types import SimpleNamespace

    from transformers.models.deprecated.mega.modeling_mega import MegaPreTrainedModel
    ema = MultiDimDampedEMA(8, 6, bidirectional=True)
    hf = hf_ema(ema, None)
    ranges = dict(ema_delta_alpha_range=0.3, ema_beta_range=0.05, ema_gamma_omega_range=0.7)
    torch.manual_seed(123)
    ema.reset_parameters(0.3, 0.05, 0.7)
    torch.manual_seed(123)
    cfg = SimpleNamespace(ema_projection_size=6, **ranges)
    MegaPreTrainedModel._init_weights(SimpleNamespace(config=cfg), hf)
    for name in PARAMS:
        torch.testing.assert_close(getattr(ema, name), getattr(hf, name), rtol=0, atol=0)


# ---------------------------------------------------------------- state hand-off, step, boundary

@pytest.mark.parametrize("splits", [[1], [5], [8], [13, 29], [3, 4, 5, 6, 40], [16, 32]])
def test_split_with_state_equals_full(splits):
    ema = make_ema(block=8)
    x = torch.randn(2, 45, 6, dtype=torch.float64)
    mask = (torch.rand(2, 45) > 0.2).long()
    doc_ids = doc_ids_from_lengths([[20, 25], [45]])
    y_full, s_full = ema(x, mask=mask, doc_ids=doc_ids)
    state, pieces, edges = None, [], [0, *splits, 45]
    for lo, hi in zip(edges[:-1], edges[1:]):
        y, state = ema(x[:, lo:hi], mask=mask[:, lo:hi], doc_ids=doc_ids[:, lo:hi], state=state)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), y_full, rtol=0, atol=1e-12)
    torch.testing.assert_close(state, s_full, rtol=0, atol=1e-12)


def test_step_equals_forward():
    ema = make_ema(block=4)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    y_full, s_full = ema(x)
    state = None
    for t in range(11):
        y_t, state = ema.step(x[:, t], state)
        torch.testing.assert_close(y_t, y_full[:, t], rtol=0, atol=1e-12)
    torch.testing.assert_close(state, s_full, rtol=0, atol=1e-12)


def run_sequence_parallel(ema, x, doc_ids, ranks):
    """Simulate `ranks` SP ranks in one process: pass 1 records each slice's local edge states (zero incoming
    state), pass 2 reruns every slice with the prefix-combined incoming states. Grads flow through both passes
    exactly as through the autograd-aware exchange."""
    xs, ds = x.chunk(ranks, dim=1), doc_ids.chunk(ranks, dim=1)
    local = {"forward": [], "backward": []}

    def record(state, decay, direction):
        local[direction].append((state, decay))
        return torch.zeros_like(state)

    for xr, dr in zip(xs, ds):
        ema(xr, doc_ids=dr, boundary=record)

    def incoming(rank, direction):
        # prefix combine h_in_r = decay_{r-1} * h_in_{r-1} + local_{r-1}, cut where a document starts exactly at a
        # slice edge: only the exchange sees both sides of an edge, so it zeros that row (as the SP code must)
        order = range(rank) if direction == "forward" else range(ranks - 1, rank, -1)
        h = torch.zeros_like(local[direction][0][0])
        for r in order:
            state, decay = local[direction][r]
            nxt = r + 1 if direction == "forward" else r - 1
            near, far = (ds[r][:, -1], ds[nxt][:, 0]) if direction == "forward" else (ds[r][:, 0], ds[nxt][:, -1])
            h = (decay * h + state) * (near == far).to(h.dtype)[:, None, None]
        return h

    outs, states = [], []
    for rank, (xr, dr) in enumerate(zip(xs, ds)):
        calls = []

        def boundary(state, decay, direction, rank=rank, calls=calls):
            calls.append(direction)
            assert state.dtype == decay.dtype == torch.float64 and state.shape == decay.shape
            return incoming(rank, direction)

        y, s = ema(xr, doc_ids=dr, boundary=boundary)
        assert calls == (["forward", "backward"] if ema.bidirectional else ["forward"])
        outs.append(y)
        states.append(s)
    return torch.cat(outs, 1), states[-1]


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("ranks,docs", [(2, [[48], [48]]), (3, [[10, 38], [48]]), (4, [[5, 7, 30, 6], [12, 36]])])
def test_boundary_exchange_equals_unsplit_fwd_and_bwd(bidirectional, ranks, docs):
    ema = make_ema(bidirectional=bidirectional, block=8)
    x = torch.randn(2, 48, 6, dtype=torch.float64, requires_grad=True)
    doc_ids = doc_ids_from_lengths(docs)
    w = torch.randn(2, 48, 6, dtype=torch.float64)
    ws = torch.randn(2, 6, 4, dtype=torch.float64)
    results = []
    for fn in (lambda: ema(x, doc_ids=doc_ids), lambda: run_sequence_parallel(ema, x, doc_ids, ranks)):
        zero_grads(ema, x)
        y, s = fn()
        ((y * w).sum() + (s * ws).sum()).backward()
        results.append([y.detach(), s.detach()] + grads(ema, x))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


# ---------------------------------------------------------------- document resets

# block 8: boundary blocks use masked Toeplitz matrices; block 32: they are redone with 16-blocks (then masked)
@pytest.mark.parametrize("block", [8, 32])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("lengths", [[40, 24], [3, 50, 11], [1] * 64, [2, 1, 5, 3, 1, 9, 8, 7, 4, 24]])
def test_doc_resets_equal_separate_documents(bidirectional, lengths, block):
    ema = make_ema(bidirectional=bidirectional, block=block)
    x = torch.randn(1, 64, 6, dtype=torch.float64)
    y, state = ema(x, doc_ids=doc_ids_from_lengths([lengths]))
    start, pieces = 0, []
    for n in lengths:
        y_doc, state_doc = ema(x[:, start:start + n])
        pieces.append(y_doc)
        start += n
    torch.testing.assert_close(y, torch.cat(pieces, 1), rtol=0, atol=1e-12)
    torch.testing.assert_close(state, state_doc, rtol=0, atol=1e-12)


@pytest.mark.parametrize("block,group", [(16, 64), (64, 64), (32, 1)])
def test_doc_resets_many_short_documents_grads_match_ref(block, group, monkeypatch):
    import megatrain.ops.ema.torch_blocked as blocked
    monkeypatch.setattr(blocked, "_FINE_GROUP_BLOCKS", group)  # group 1: boundary blocks redone one by one
    ema = make_ema(block=block)
    x = torch.randn(2, 150, 6, dtype=torch.float64, requires_grad=True)
    doc_ids = torch.randint(0, 3, (2, 150)).cumsum(1)  # a new document at about 2 of every 3 positions
    doc_ids[:, 70:] = doc_ids[:, 70:71]  # ... then one long document
    results = []
    for fn in (ema, lambda *a, **k: ema_ref(*a, ema, **k)):
        zero_grads(ema, x)
        y, _ = fn(x, doc_ids=doc_ids)
        (y ** 2).sum().backward()
        results.append([y.detach()] + grads(ema, x))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------- precision, memory, errors

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp32_math_under_bf16_autocast(dtype):
    ema = make_ema(d=8, n=4, block=16, dtype=torch.float32)
    x = torch.randn(2, 200, 8).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ema(x)
    assert y.dtype == dtype and state.dtype == torch.float32
    y64, state64 = ema_ref(x.double(), ema)
    # only the final rounding to x's dtype: bf16 has 8 mantissa bits
    tol = 2 ** -8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.double(), y64, rtol=tol, atol=tol)
    torch.testing.assert_close(state.double(), state64, rtol=1e-5, atol=1e-5)


def test_saturated_decay_stays_finite():
    # sigmoid rounds to exactly 1 in fp32 here, so q = 1 - p * alpha = 0: no memory at all, h_t = p * beta * x_t
    ema = make_ema(d=4, n=2, bidirectional=True, block=8, dtype=torch.float32)
    with torch.no_grad():
        ema.damping_factor.fill_(40.0)
        ema.decay_factor.fill_(40.0)
    x = torch.randn(2, 20, 4, requires_grad=True)
    y, state = ema(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(state).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y, ema_ref(x, ema)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("with_docs", [False, True])
def test_no_tensor_scales_with_length_times_dim_times_ndim(with_docs):
    length, dim, ndim = 8192, 8, 16
    ema = MultiDimDampedEMA(dim, ndim, bidirectional=True, block_size=64)
    x = torch.randn(1, length, dim, requires_grad=True)
    doc_ids = doc_ids_from_lengths([[3000, 5, 17, 5170]]) if with_docs else None
    with MaxNumel() as probe:
        y, _ = ema(x, doc_ids=doc_ids)
        y.sum().backward()
    # biggest legitimate tensors: B*L*D (activations) and D*C*C (block Toeplitz)
    assert probe.max_numel <= max(length * dim, dim * 64 * 64), probe.max_numel
    assert probe.max_numel < length * dim * ndim // 8


def test_clear_errors():
    uni = make_ema(block=8)
    bi = make_ema(bidirectional=True, block=8)
    trunc = make_ema(truncation=4, block=8)
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    state = torch.zeros(2, 6, 4, dtype=torch.float64)
    cases = [
        (lambda: uni(torch.randn(2, 10, 5)), "x must be"),
        (lambda: uni(x, mask=torch.ones(2, 9)), "mask must be"),
        (lambda: uni(x, doc_ids=torch.zeros(10, dtype=torch.long)), "doc_ids must be"),
        (lambda: uni(x, state=torch.zeros(2, 6, 3)), "state must be"),
        (lambda: uni(x, state=state, boundary=lambda s, d, k: s), "either state or boundary"),
        (lambda: uni(x, boundary="left"), "boundary must be callable"),
        (lambda: bi(x, state=state), "unidirectional"),
        (lambda: bi.step(x[:, 0]), "bidirectional=False"),
        (lambda: trunc(x, state=state), "truncation=4"),
        (lambda: trunc(x, boundary=lambda s, d, k: s), "truncation=4"),
        (lambda: uni.step(x, None), "x_t must be"),
        (lambda: MultiDimDampedEMA(6, 0, False), "ema_projection_size"),
        (lambda: MultiDimDampedEMA(6, 4, False, truncation=0), "truncation"),
        (lambda: MultiDimDampedEMA(6, 4, False, block_size=0), "block_size"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
