"""The kernel path of MEGA's per-chunk softmax attention: PyTorch FlexAttention (torch.nn.attention.flex_attention).

    out = flex_chunk_attention(q, k, v, bias, scale=Z**-0.5, causal=True, key_mask=km, doc_ids=d)

Shapes as in megatrain.ops.attention.reference; the mask is given by parts (causal, key_mask [B, n, Tk] real keys,
doc_ids [B, n, T] same-document) or as one dense `valid` [B, n, Tq, Tk] (decoding), never both.

How MEGA maps onto it: every chunk is an independent sequence, so chunks are the batch ([B*n, heads, C, dim]):
the kernel sees short sequences. The relative-position bias is one [Tq, Tk] tensor read in `score_mod`
(score + bias[q_idx, kv_idx]); FlexAttention gives captured tensors their gradient, so the rotary alpha/beta or the
simple-bias table get theirs through the ordinary autograd of how `bias` was built -- no [B*n, C, C] bias or bias
gradient is ever materialised (SDPA with a float mask materialises both). The mask is a `mask_mod` turned into a
block mask: blocks above the diagonal are skipped, partially masked blocks are masked in the kernel, and a query
whose keys are all masked (left padding) gets 0. Nothing [C, C]-sized is kept for backward.

Value width: MEGA's values are wide (E = intermediate_size, 2048 in the 350M config) while the kernel holds a
[block, E] accumulator per program; so E is split into `heads` slices of at most V_HEAD_MAX columns that share q
and k (q, k are broadcast over the head axis, their gradients are summed over it by autograd).

Where it runs: CUDA compiles it (torch.compile(flex_attention) emits Triton kernels; this is what
kernel_backend 'triton' means for attention). CPU runs FlexAttention eagerly (an unfused reference that
materialises the scores -- for tests only); PyTorch refuses FlexAttention backward on CPU, so there it is forward
only (the tests lift that check to compare gradients of the same math). There is no dropout on the attention
probabilities and only softmax: the dispatcher sends laplace/relu2/attention dropout to the PyTorch path.
MEGATRAIN_FLEX_COMPILE overrides where it is compiled: "inductor" compiles on CPU too (forward only: how
tests/ops/test_flex_compiled.py checks the compiled forward and its recompiles without a GPU), "eager" traces it with
dynamo but runs it eagerly (compiles counted at no compile cost: bench/gpu/check.sh --dry-run's timing model).

The block mask of a padding/document mask is built once per micro-batch, not once per layer: every layer (and the
recompute of each, under gradient checkpointing) passes views of the same key_mask / doc_ids storage, so the mask
is memoised on that storage (_BlockMaskCache below); building it costs a [B*n, C, C] mask evaluation each time.

QK^T is computed once per value slice (`heads` times): FlexAttention computes one score matrix per output head and
cannot share it between heads, and a single head as wide as E does not fit a kernel's accumulator. The extra cost
is (heads - 1) x 2 C^2 Z per chunk (heads = 8 at E = 2048: as much again as the P V matmul);
bench/gpu/bench_attention.py --v-head-max 256,512 measures the trade-off.
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Optional

import torch
from torch.nn.attention.flex_attention import and_masks, create_block_mask, flex_attention

V_HEAD_MAX = 256  # widest value slice per kernel head (flex's own examples go to 256)


COMPILE_MODES = ("inductor", "eager")


@functools.lru_cache(maxsize=None)
def _compiled_flex(backend: str):
    return torch.compile(flex_attention, backend=backend)


def _runner(device: torch.device):
    """flex_attention compiled (CUDA, or as MEGATRAIN_FLEX_COMPILE says) or eager (CPU default)."""
    mode = os.environ.get("MEGATRAIN_FLEX_COMPILE", "")
    if mode and mode not in COMPILE_MODES:
        raise ValueError(f"MEGATRAIN_FLEX_COMPILE={mode!r}: expected one of {', '.join(COMPILE_MODES)} (or unset)")
    if mode:
        return _compiled_flex(mode)
    return _compiled_flex("inductor") if device.type == "cuda" else flex_attention


class _BlockMaskCache:
    """Block masks of recent (key_mask, doc_ids) inputs, keyed by their storage (address, layout, version).

    Sound because an entry holds its tensors: while their storage lives no other tensor can occupy that address,
    and any in-place write through any view bumps the version the key holds. Inference tensors have no version
    counter: they are not memoised. `size` covers one entry per segment of a segmented forward (megatrain/model/
    segments.py runs each layer over every segment in turn) at up to 128 segments; beyond it, masks are rebuilt.
    """

    def __init__(self, size: int = 128):
        self.size = size
        self.entries: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self.builds = 0  # how many block masks were built (tests count them)

    @staticmethod
    def _key_of(t: Optional[torch.Tensor]):
        if t is None:
            return None
        if t.is_inference():
            raise LookupError
        return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride(), t._version)

    def get(self, causal: bool, tensors: tuple, build):
        try:
            key = (causal,) + tuple(self._key_of(t) for t in tensors)
        except LookupError:
            self.builds += 1
            return build()
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit[0]
        self.builds += 1
        mask = build()
        self.entries[key] = (mask, tensors)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return mask


_block_masks = _BlockMaskCache()


@functools.lru_cache(maxsize=32)
def _causal_block_mask(tq: int, tk: int, device: torch.device):
    # the same for every chunk and layer: built once per (length, device), broadcast over the batch
    return create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, tq, tk, device=device)


def _value_heads(e: int, v_head_max: int) -> int:
    """The fewest slices of equal width <= v_head_max that E splits into."""
    for h in range(-(-e // v_head_max), e + 1):
        if e % h == 0:
            return h
    return e


def _compute_dtype(q, k, v):
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def flex_chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, *, scale: float,
                         causal: bool = False, key_mask: Optional[torch.Tensor] = None,
                         doc_ids: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                         v_head_max: int = V_HEAD_MAX) -> torch.Tensor:
    b, n, tq, z = q.shape
    tk, e = k.shape[-2], v.shape[-1]
    bn = b * n
    dev = q.device

    def build():
        mods = []
        if causal:
            mods.append(lambda bb, h, qi, ki: ki <= qi)
        if key_mask is not None:
            km = key_mask.reshape(bn, tk).bool()
            mods.append(lambda bb, h, qi, ki: km[bb, ki])
        if doc_ids is not None:
            d = doc_ids.reshape(bn, tq)
            mods.append(lambda bb, h, qi, ki: d[bb, qi] == d[bb, ki])
        if valid is not None:
            vm = valid.expand(b, n, tq, tk).reshape(bn, tq, tk)
            mods.append(lambda bb, h, qi, ki: vm[bb, qi, ki])
        return create_block_mask(and_masks(*mods), bn, None, tq, tk, device=dev)

    if valid is not None:  # decoding: a new mask every token
        block_mask = build()
    elif key_mask is not None or doc_ids is not None:
        block_mask = _block_masks.get(causal, (key_mask, doc_ids), build)
    elif causal:
        block_mask = _causal_block_mask(tq, tk, dev)
    else:
        block_mask = None

    cdt = _compute_dtype(q, k, v)
    heads = _value_heads(e, v_head_max)
    with torch.autocast(dev.type, enabled=False):
        qh = q.to(cdt).reshape(bn, 1, tq, z).expand(bn, heads, tq, z)
        kh = k.to(cdt).reshape(bn, 1, tk, z).expand(bn, heads, tk, z)
        # [B, n, Tk, E] -> [B*n, heads, Tk, E/heads]: head j holds columns [j*E/heads, (j+1)*E/heads)
        vh = v.to(cdt).reshape(bn, tk, heads, e // heads).transpose(1, 2)

        # at least fp32 whatever the model dtype: the kernel's scores are fp32, and the bias gradient is a sum over every
        # chunk of the batch (atomic adds in the compiled backward), which bf16 would round at each step
        bias32 = bias.to(torch.promote_types(bias.dtype, torch.float32))

        def score_mod(score, bb, h, qi, ki):
            return score + bias32[qi, ki]

        run = _runner(dev)
        out = run(qh, kh, vh, score_mod=score_mod, block_mask=block_mask, scale=scale)
    return out.transpose(1, 2).reshape(b, n, tq, e)
