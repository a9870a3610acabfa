"""Tests of megatrain.ops.tsn (Megalodon's timestep normalization):
    PYTHONPATH=. python -m pytest -q tests/ops/test_tsn_ops.py
    (on a GPU, compiled: MEGATRAIN_TEST_DEVICE=cuda python -m pytest -q tests/ops/test_tsn_ops.py)

The float64 reference against the literal definition (every value of the group seen so far, two-pass, per
timestep); both paths (blocked PyTorch with Chan merges; our Triton kernels -- under TRITON_INTERPRET=1 on CPU)
against the reference: forward, the returned (count, mean, var) and every gradient (x, gamma, beta, incoming mean
and variance), with padding, documents, incoming states, group sizes that are not powers of two, ragged lengths;
fp32/bf16 error bounds; 64K positions where fp32 prefix sums drift and the merged statistics do not; and the state
crossing pieces two ways: carried from piece to piece (segments, decoding) and in the additive form through the
state recurrence of ops/ema/state.py (sequence parallelism), each equal to the unsplit computation.
(The sm_80/sm_90 compile of these kernels: tests/ops/test_cema_ops.py.)
"""
import pytest
import torch

from megatrain.ops.ema.state import prefix
from megatrain.ops.tsn import from_additive, timestep_norm, timestep_norm_ref, to_additive
from tests.ops.test_ema_ops import backend  # noqa: F401  (the fixture: torch, and triton interpreted)
from tests.ops.util import DEVICE

NAMES = ["y", "count", "mean", "var", "x", "gamma", "beta", "mean_in", "var_in"]


def make_inputs(bsz, length, dim, groups, mask=False, resets=False, state=False, offset=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, length, dim, generator=g, dtype=torch.float64) * 2 + offset
    x = x + torch.randn(1, length, 1, generator=g, dtype=torch.float64)          # statistics that move in time
    gamma = torch.randn(dim, generator=g, dtype=torch.float64)
    beta = torch.randn(dim, generator=g, dtype=torch.float64)
    m = None
    if mask:
        m = (torch.rand(bsz, length, generator=g) > 0.25).long()
        m[0, :3] = 0                                       # left padding: no statistics before the first real token
    r = None
    if resets:
        r = torch.rand(bsz, length, generator=g) < 0.1
        r[0, 0] = True                                     # cuts the incoming state of row 0
        r[-1, 4:6] = True                                  # one-position documents
    s = None
    if state:
        s = (torch.randint(0, 40, (bsz,), generator=g), torch.randn(bsz, groups, generator=g, dtype=torch.float64),
             torch.rand(bsz, groups, generator=g, dtype=torch.float64) + 0.5)
        s[0][-1] = 0                                       # an empty incoming state
    return x, gamma, beta, groups, m, r, s


def run(fn, x, gamma, beta, groups, mask, resets, state, device="cpu", **kw):
    """y, the returned state and the gradients of a fixed random functional of y and the state."""
    leaves = [t.detach().to(device).clone().requires_grad_() for t in (x, gamma, beta)]
    st = None if state is None else (state[0].to(device),
                                     *(t.detach().to(device).clone().requires_grad_() for t in state[1:]))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    y, (count, mean, var) = fn(*leaves, groups, dev(mask), dev(resets), st, **kw)
    g = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=device, dtype=t.dtype)
         for t in (y, mean, var)]
    ((y * w[0]).sum() + (mean * w[1]).sum() + (var * w[2]).sum()).backward()
    grads = [t.grad for t in leaves] + ([None, None] if st is None else [st[1].grad, st[2].grad])
    got = [y.detach(), count, mean.detach(), var.detach()] + grads
    return [None if t is None else t.cpu() for t in got]


def assert_all_close(got, want, **tol):
    for name, a, b in zip(NAMES, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, name=name: f"{name}: {m}")


def definition(x, gamma, beta, groups, mask, resets, state, eps=1e-5):
    """The literal definition, position by position: mean and biased variance of every value of the group at the
    real positions <= t of t's document, two-pass, plus the incoming state's n0 positions."""
    bsz, length, dim = x.shape
    k = dim // groups
    y = torch.zeros_like(x)
    for b in range(bsz):
        start = 0
        for t in range(length):
            if resets is not None and resets[b, t]:
                start = t
            first = resets is None or not bool(resets[b, :t + 1].any())
            rows = [s for s in range(start, t + 1) if mask is None or mask[b, s]]
            if mask is not None and not mask[b, t]:
                continue
            for gi in range(groups):
                vals = x[b, rows, gi * k:(gi + 1) * k].reshape(-1)
                n, total = len(rows), vals.sum()
                n0 = int(state[0][b]) if state is not None and first else 0
                if n0:
                    total = total + n0 * k * state[1][b, gi]
                mu = total / (n * k + n0 * k)
                sq = ((vals - mu) ** 2).sum()
                if n0:
                    sq = sq + n0 * k * (state[2][b, gi] + (state[1][b, gi] - mu) ** 2)
                var = sq / (n * k + n0 * k)
                cols = slice(gi * k, (gi + 1) * k)
                y[b, t, cols] = (x[b, t, cols] - mu) / torch.sqrt(var + eps) * gamma[cols] + beta[cols]
    return y


def test_reference_is_the_definition():
    x, gamma, beta, groups, mask, resets, state = make_inputs(2, 17, 6, 2, True, True, True)
    y, _ = timestep_norm_ref(x, gamma, beta, groups, mask, resets, state)
    torch.testing.assert_close(y, definition(x, gamma, beta, groups, mask, resets, state), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bsz,length,dim,groups,block,mask,resets,state", [
    (1, 1, 4, 2, 8, False, False, False),            # one position
    (2, 45, 12, 3, 8, True, True, True),             # K = 4, ragged blocks, everything on
    (2, 40, 6, 2, 16, True, True, True),             # K = 3: not a power of two (masked lanes)
    (1, 33, 8, 8, 256, False, True, False),          # G = D (K = 1); one block longer than the sequence
    (2, 40, 10, 1, 1, True, False, True),            # G = 1; one position per block
])
def test_matches_reference_fp64(backend, bsz, length, dim, groups, block, mask, resets, state):
    inputs = make_inputs(bsz, length, dim, groups, mask, resets, state)
    got = run(timestep_norm, *inputs, device=DEVICE, block=block, backend=backend)
    want = run(timestep_norm_ref, *inputs)
    assert_all_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_error_bounded(backend, dtype):
    x, gamma, beta, groups, mask, resets, state = make_inputs(2, 40, 16, 4, True, True, True, seed=3)
    low = (x.float().to(dtype), gamma.float(), beta.float(), groups, mask, resets,
           (state[0], state[1].float(), state[2].float()))
    want = run(timestep_norm_ref, low[0].double(), *low[1:])
    got = run(timestep_norm, *low, device=DEVICE, block=16, backend=backend)
    torch_path = run(timestep_norm, *low, device=DEVICE, block=16, backend="torch")
    for name, k, t, w in zip(NAMES, got, torch_path, want):
        scale = w.double().abs().max().item()
        err = (k.double() - w.double()).abs().max().item()
        err_torch = (t.double() - w.double()).abs().max().item()
        assert err <= (2 ** -6 if dtype == torch.bfloat16 else 1e-5) * max(scale, 1.0), (name, err, scale)
        assert err <= 2 * err_torch + 1e-6 * max(scale, 1.0), (name, err, err_torch)
    assert got[0].dtype == dtype and got[4].dtype == dtype and got[2].dtype == torch.float32


def test_64k_positions_do_not_drift():
    # mean 30, std ~2: fp32 prefix sums of x and x^2 lose var = E[x^2] - E[x]^2 to cancellation (~L eps mu^2 /
    # var); the merged statistics keep fp32 accuracy at every position, in the output and every gradient
    length = 65536
    x, gamma, beta, groups, _, _, _ = make_inputs(1, length, 8, 2, offset=30.0, seed=5)
    want = run(timestep_norm_ref, x, gamma, beta, groups, None, None, None)
    got = run(timestep_norm, x.float(), gamma.float(), beta.float(), groups, None, None, None, backend="torch")
    for name, a, b in zip(NAMES, got, want):
        if a is not None:
            err = (a.double() - b.double()).abs().max().item()
            assert err <= 2e-5 * max(b.abs().max().item(), 1.0), (name, err)
    # the same formula with fp32 prefix sums drifts an order of magnitude further
    xg = x.float().reshape(1, length, groups, -1)
    n = torch.arange(1, length + 1, dtype=torch.float32)[None, :, None]
    mu = xg.mean(-1).cumsum(1) / n
    var = xg.square().mean(-1).cumsum(1) / n - mu * mu
    naive = ((xg - mu[..., None]) * torch.rsqrt(var + 1e-5)[..., None]).reshape(1, length, -1) * gamma.float() \
        + beta.float()
    err_naive = (naive.double() - want[0]).abs().max().item()
    err_ours = (got[0].double() - want[0]).abs().max().item()
    assert err_naive > 10 * err_ours, (err_naive, err_ours)


def test_triton_long_input_matches_reference(triton_interpreter):
    # 256 positions in 32 chunks of 8 (the scan over chunks in play) at a mean of 30: fp32 kernels within 2e-5
    # (the interpreter walks ~20 positions a second here: the 64K case is the PyTorch path's, above)
    x, gamma, beta, groups, mask, resets, _ = make_inputs(1, 256, 8, 2, True, True, offset=30.0, seed=6)
    want = run(timestep_norm_ref, x, gamma, beta, groups, mask, resets, None)
    got = run(timestep_norm, x.float(), gamma.float(), beta.float(), groups, mask, resets, None, device=DEVICE,
              block=8, backend="triton")
    for name, a, b in zip(NAMES, got, want):
        if a is not None:
            err = (a.double() - b.double()).abs().max().item()
            assert err <= 2e-5 * max(b.abs().max().item(), 1.0), (name, err)


BOUNDS = [(0, 11), (11, 20), (20, 21), (21, 32)]


def test_state_carried_piece_to_piece(backend):
    # segments and decoding: each piece starts from the state the previous one returned
    x, gamma, beta, groups, mask, resets, state = make_inputs(2, 32, 8, 2, True, True, True, seed=8)
    resets[1, 20] = True                                  # a document starting exactly at a piece edge

    def pieces(x, gamma, beta, groups, mask, resets, state):
        ys = []
        for s, e in BOUNDS:
            y, state = timestep_norm(x[:, s:e], gamma, beta, groups, mask[:, s:e], resets[:, s:e], state, block=4,
                                     backend=backend)
            ys.append(y)
        return torch.cat(ys, 1), state

    assert_all_close(run(pieces, x, gamma, beta, groups, mask, resets, state, device=DEVICE),
                     run(timestep_norm_ref, x, gamma, beta, groups, mask, resets, state), rtol=1e-9, atol=1e-9)


def test_additive_pieces_through_the_state_recurrence(backend):
    # sequence parallelism: every piece's own statistics (the state it returns from the prior) go into the additive
    # form; state.py's prefix gives each piece its incoming statistics (cut where a document starts exactly at an
    # edge); forward and every gradient (through the other pieces' statistics too) equal the unsplit norm
    x, gamma, beta, groups, mask, resets, _ = make_inputs(2, 32, 8, 2, True, True, seed=9)
    resets[0, 20] = True

    def pieces(x, gamma, beta, groups, mask, resets, state):
        part = lambda t, s, e: t[:, s:e]  # noqa: E731
        local, decay = [], []
        for s, e in BOUNDS:
            _, own = timestep_norm(part(x, s, e), gamma, beta, groups, part(mask, s, e), part(resets, s, e),
                                   backend=backend)
            pair = to_additive((own[0].unsqueeze(-1), own[1], own[2]), ~part(resets, s, e).any(1))
            local.append(pair[0])
            decay.append(pair[1])
        keep = torch.stack([torch.ones(2, dtype=torch.bool)] + [~resets[:, s] for s, _ in BOUNDS[1:]])
        entering = prefix(torch.stack(local), torch.stack(decay), keep)
        ys = []
        for (s, e), h in zip(BOUNDS, entering):
            # the hook an SP rank uses: its summary out, the incoming statistics back (here: the prefix's)
            seen = []

            class Handle:
                def wait(self, h=h):
                    return from_additive(h)

            def on_summary(count, mean, var, crosses):
                seen.append((count, mean, var, crosses))
                return Handle()

            y, state = timestep_norm(part(x, s, e), gamma, beta, groups, part(mask, s, e), part(resets, s, e),
                                     block=4, backend=backend, on_summary=on_summary)
            assert torch.equal(seen[0][3], ~part(resets, s, e).any(1))
            ys.append(y)
        return torch.cat(ys, 1), state

    got = run(pieces, x, gamma, beta, groups, mask, resets, None, device=DEVICE)
    want = run(timestep_norm_ref, x, gamma, beta, groups, mask, resets, None)
    assert_all_close(got, want, rtol=1e-9, atol=1e-9)


def test_clear_errors():
    x, gamma, beta, groups, mask, resets, state = make_inputs(2, 10, 8, 2, True, True, True)
    cases = [
        (lambda: timestep_norm(x[0], gamma, beta, 2), "x must be"),
        (lambda: timestep_norm(x, gamma, beta, 3), "num_groups=3 must be a positive int dividing D=8"),
        (lambda: timestep_norm(x, gamma[:4], beta, 2), "gamma must be"),
        (lambda: timestep_norm(x, gamma, beta, 2, mask=mask[:, :4]), "mask must be"),
        (lambda: timestep_norm(x, gamma, beta, 2, resets=resets.long()), "resets must be"),
        (lambda: timestep_norm(x, gamma, beta, 2, state=(state[0], state[1][:, :1], state[2])), "state must be"),
        (lambda: timestep_norm(x, gamma, beta, 2, block=0), "block must be"),
        (lambda: timestep_norm(x, gamma, beta, 2, backend="cuda"), "kernel_backend='cuda'"),
        (lambda: timestep_norm(x, gamma, beta, 2, state=state, on_summary=print), "either state or on_summary"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
