"""The EMA state op (megatrain.ops.ema.state) against the fp64 reference scan: PYTHONPATH=. python -m pytest -q
tests/ops/test_ema_state.py

A sequence with document resets (inside pieces and exactly at piece edges) is cut into pieces; each piece is
scanned alone from zero state (ema_scan_ref, fp64); the op hands the state from piece to piece. The outgoing
state, the state entering every piece, and the whole output (piece outputs + incoming_contribution) must equal the
unsplit scan, and so must every gradient (u, a, c, logq, h_in), in both directions, for fp64 / fp32 / bf16 states.
"""
import pytest
import torch
import torch.nn.functional as F

from megatrain.ops.ema import ema_scan_ref, incoming_contribution
from megatrain.ops.ema.state import DIRECTIONS, carry, crossing_decay, cut, fold, prefix, traversal

B, L, D, N = 3, 24, 4, 3
BOUNDS = [(0, 5), (5, 11), (11, 12), (12, 20), (20, 24)]   # ragged pieces, one of a single position


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    a, c = torch.randn(D, N, generator=g, dtype=torch.float64), torch.randn(D, N, generator=g, dtype=torch.float64)
    logq = torch.log(torch.rand(D, N, generator=g, dtype=torch.float64) * 0.5 + 0.45)
    doc = torch.zeros(B, L, dtype=torch.int64)
    doc[0, 8] = 1                       # row 0: a reset inside piece 1
    doc[1, 11] = doc[1, 20] = 1         # row 1: resets exactly at edges (one entering the one-position piece)
    doc[1, 15] = 1                      # ... and one inside piece 3
    h_in = torch.randn(B, D, N, generator=g, dtype=torch.float64)   # row 2: one document, h_in reaches the end
    return u, a, c, logq, doc.cumsum(1), h_in


def resets_of(doc):
    return F.pad(doc[:, 1:] != doc[:, :-1], (1, 0), value=False)


def split(u, a, c, logq, doc, h_in, direction, dtype, ignore_keep=False):
    """The pieces scanned alone, then the op: (output [B, L, D], state after the last piece), in `direction`."""
    bounds = BOUNDS
    if direction == "backward":       # right to left = left to right on the reversed sequence
        u, doc = u.flip(1), doc.flip(1)
        bounds = [(L - e, L - s) for s, e in reversed(BOUNDS)]
    outs, locs, decays = [], [], []
    for s, e in bounds:
        r = resets_of(doc[:, s:e])
        out, loc = ema_scan_ref(u[:, s:e], a, c, logq, r)
        outs.append(out)
        locs.append(loc.to(dtype))
        decays.append(crossing_decay(logq, B, e - s, r).to(dtype))
    # keep[k]: the state crosses the edge entering piece k (False where a document starts exactly there)
    keep = torch.stack([torch.ones(B, dtype=torch.bool)] + [doc[:, s] == doc[:, s - 1] for s, _ in bounds[1:]])
    if ignore_keep:
        keep = torch.ones_like(keep)
    local, decay = torch.stack(locs), torch.stack(decays)
    h0 = h_in.to(dtype)
    entering = prefix(local, decay, keep, h0)
    outs = [o + incoming_contribution(h.double(), c, logq, e - s, resets_of(doc[:, s:e]), block=4)
            for o, h, (s, e) in zip(outs, entering, bounds)]
    whole_local, whole_decay = fold(local, decay, keep)
    state = carry(whole_local, whole_decay, keep[0], h0)
    # the log-depth prefix is the sequential chain of carries (up to rounding)
    h, tol = h0, 1e-12 if dtype == torch.float64 else 2e-2
    for k in range(len(bounds)):
        torch.testing.assert_close(cut(h, keep[k]), entering[k], rtol=tol, atol=tol)
        h = carry(local[k], decay[k], keep[k], h)
    out = torch.cat(outs, 1)
    return (out.flip(1) if direction == "backward" else out), state


def full(u, a, c, logq, doc, h_in, direction):
    if direction == "backward":
        out, state = ema_scan_ref(u.flip(1), a, c, logq, resets_of(doc.flip(1)), h_in)
        return out.flip(1), state
    return ema_scan_ref(u, a, c, logq, resets_of(doc), h_in)


def grads(fn, u, a, c, logq, h_in):
    leaves = [t.clone().requires_grad_() for t in (u, a, c, logq, h_in)]
    out, state = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum() + \
        (state.double() * torch.randn(state.shape, generator=g, dtype=torch.float64)).sum()
    loss.backward()
    return [out.detach(), state.detach().double()] + [t.grad for t in leaves]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_pieces_equal_unsplit_scan(direction, dtype):
    u, a, c, logq, doc, h_in = make()
    got = grads(lambda u, a, c, logq, h: split(u, a, c, logq, doc, h, direction, dtype), u, a, c, logq, h_in)
    want = grads(lambda u, a, c, logq, h: full(u, a, c, logq, doc, h, direction), u, a, c, logq, h_in)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2 ** -6}[dtype]
    for name, x, y in zip(["out", "state", "u", "a", "c", "logq", "h_in"], got, want):
        scale = y.abs().max().item()
        assert (x - y).abs().max().item() <= tol * max(scale, 1.0), (name, (x - y).abs().max().item(), scale)


def test_edge_resets_matter():
    # the cut where a document starts exactly at an edge (row 1 only) is what makes row 1 exact
    u, a, c, logq, doc, h_in = make()
    want, _ = full(u, a, c, logq, doc, h_in, "forward")
    out, _ = split(u, a, c, logq, doc, h_in, "forward", torch.float64, ignore_keep=True)
    assert (out[1] - want[1]).abs().max() > 1e-3
    torch.testing.assert_close(out[[0, 2]], want[[0, 2]])


def test_traversal_maps_edges_to_the_pieces_they_enter():
    local = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 1)
    edges = torch.tensor([[True, True], [False, True], [True, False], [True, True]])   # [K+1, B]
    lf, _, kf = traversal("forward", local, local, edges)
    lb, _, kb = traversal("backward", local, local, edges)
    assert lf[:, 0, 0, 0].tolist() == [0, 1, 2] and kf.tolist() == edges[:3].tolist()
    assert lb[:, 0, 0, 0].tolist() == [2, 1, 0] and kb.tolist() == [[True, True], [True, False], [False, True]]


def test_fold_and_prefix_of_one_piece():
    loc, dec = torch.randn(1, 2, 3, 4), torch.rand(1, 2, 3, 4)
    h0 = torch.randn(2, 3, 4)
    keep = torch.tensor([[True, False]])
    assert torch.equal(fold(loc, dec, None)[0], loc[0]) and torch.equal(fold(loc, dec, None)[1], dec[0])
    torch.testing.assert_close(prefix(loc, dec, keep, h0)[0], h0 * torch.tensor([1.0, 0.0])[:, None, None])
    assert torch.equal(prefix(loc, dec), torch.zeros_like(loc))
