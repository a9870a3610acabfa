"""FlexAttention as CUDA runs it, checked on CPU: the document block mask is built once per micro-batch (not per
layer and recompute), and torch.compile(flex_attention) -- compiled here for CPU, forward only -- equals the
PyTorch path through the whole model and never recompiles after its first call at a fixed length, on the plain,
segmented and sequence-parallel paths.

Run: PYTHONPATH=. python -m pytest -q tests/ops/test_flex_compiled.py          (the compiled test is slow: one
     inductor compile, ~30-90 s on CPU; every path below is arranged to reuse it: same chunk count and mask kind)

PyTorch has no FlexAttention backward on CPU, so the compiled test is forward only; the backward's math is covered
by the eager tests in test_attention_ops.py. What compiles where: megatrain/ops/attention/flex_path.py
(MEGATRAIN_FLEX_COMPILE).
"""
import pytest
import torch
import torch.nn.attention.flex_attention as flex_mod
from torch._dynamo.utils import counters

import megatrain.ops.attention.flex_path as flex_path
from megatrain.model import MegaForCausalLM
from tests.model.util import ids, randomize_, tiny_config
from tests.ops.util import cpu_only

pytestmark = cpu_only("compiles FlexAttention for CPU; on CUDA test_attention_ops.py runs it compiled")

LENGTH, CHUNK = 32, 16  # two chunks per forward (and per segment / SP slice below): one compiled variant
DIMS = dict(shared_representation_size=16, intermediate_size=32, chunk_size=CHUNK, use_chunking=True,
            normalization_type="layernorm")


def _model(backend, **kw):
    torch.manual_seed(0)
    model = randomize_(MegaForCausalLM(tiny_config(True, kernel_backend=backend, **DIMS, **kw)))
    return model


def _docs(batch, length, first_len):
    # two packed documents; the first ends inside a chunk (partially masked blocks)
    return (torch.arange(length) >= first_len).long().expand(batch, length).contiguous()


@pytest.fixture
def count_block_masks(monkeypatch):
    built = []
    real = flex_path.create_block_mask
    monkeypatch.setattr(flex_path, "create_block_mask", lambda *a, **kw: built.append(1) or real(*a, **kw))
    return built


@pytest.mark.parametrize("segment_size", [0, CHUNK])
def test_document_block_mask_built_once_per_micro_batch(segment_size, count_block_masks, triton_interpreter,
                                                        monkeypatch):
    # fails before the memo: one build per layer (x segments)
    monkeypatch.setattr(flex_mod, "_validate_device", lambda *a: None)  # eager flex backward on CPU (same math)
    model = _model("triton", segment_size=segment_size).train()
    x = ids(2, 2 * LENGTH)
    for step in range(2):  # a new micro-batch (new doc_ids tensor) builds its masks again
        doc = _docs(2, 2 * LENGTH, 10 + step)
        model(x, labels=x, doc_ids=doc).loss.backward()
        segments = 2 * LENGTH // segment_size if segment_size else 1
        assert len(count_block_masks) == segments * (step + 1)


@pytest.mark.xfail(strict=True, reason="FOUND, not fixed (a torch limitation, eager only): eager FlexAttention under "
                   "autograd traces its joint graph (make_fx) on the real inputs, and that trace's autograd.grad "
                   "unpacks the enclosing non-reentrant checkpoint's saved tensors, which recomputes the layer under "
                   "the proxy mode; the nested checkpoint's frame then hands an UntypedStorage to the tracer "
                   "(NotImplementedError in torch/fx/proxy.py). An earlier failure on the way (our custom "
                   "context_fn, refused under a proxy mode) is fixed: megatrain/parallel/checkpointing.py tells the "
                   "recompute apart without it (tests/parallel/test_checkpointing.py::test_torch_compile). "
                   "Compiled FlexAttention (the CUDA path) is traced by dynamo on fake inputs, not by this eager "
                   "route; unverified on a GPU. Remove this marker when it passes.")
def test_flex_backward_under_gradient_checkpointing(triton_interpreter, monkeypatch):
    monkeypatch.setattr(flex_mod, "_validate_device", lambda *a: None)
    from megatrain.parallel.checkpointing import CheckpointPolicy, apply_checkpointing
    # checkpointing is applied from outside the model (the config flag alone no longer switches it)
    model = apply_checkpointing(_model("triton", gradient_checkpointing=True), CheckpointPolicy()).train()
    x = ids(2, LENGTH)
    model(x, labels=x, doc_ids=_docs(2, LENGTH, 10)).loss.backward()


def test_block_mask_memo_sees_in_place_writes(count_block_masks):
    q = torch.randn(1, 2, 8, 4)
    doc = _docs(1, 16, 5).reshape(1, 2, 8).clone()
    bias = torch.zeros(8, 8)
    a = flex_path.flex_chunk_attention(q, q, q, bias, scale=0.5, causal=True, doc_ids=doc)
    doc[0, 0, 5:] = 0  # same storage, new content: the version counter moved, so the mask is rebuilt
    b = flex_path.flex_chunk_attention(q, q, q, bias, scale=0.5, causal=True, doc_ids=doc)
    assert len(count_block_masks) == 2 and not torch.allclose(a, b)


@pytest.mark.slow
# as on CUDA: shapes static. Through dynamo's own patch, not monkeypatch: monkeypatch's undo on torch's config module
# deleted the key ("torch._dynamo.config.automatic_dynamic_shapes does not exist" in every later compile)
@torch._dynamo.config.patch(automatic_dynamic_shapes=False)
def test_compiled_forward_matches_pytorch_path_and_never_recompiles(triton_interpreter, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_FLEX_COMPILE", "inductor")
    flex_path._compiled_flex.cache_clear()
    torch._dynamo.reset()

    def zero_boundary(local_state, decay, direction):  # an SP rank 0: no state comes in from the left
        return torch.zeros_like(local_state)

    runs = {  # name: (model kwargs, batch length, forward kwargs)
        "plain": ({}, LENGTH, {}),
        "segmented": ({"segment_size": LENGTH}, 2 * LENGTH, {}),  # each segment: LENGTH tokens, as "plain"
        "sp": ({}, LENGTH, {"ema_boundary": zero_boundary}),        # the model's sequence-parallel path
    }
    graphs = None
    for name, (kw, length, fwd) in runs.items():
        with torch.no_grad():
            ref = _model("torch", **kw).eval()
            got = _model("triton", **kw).eval()
            for call in range(2):  # a second micro-batch at the same length: new tensors, no new graph
                x, doc = ids(2, length, seed=call), _docs(2, length, 10 + call)
                want = ref.mega(x, doc_ids=doc, **fwd)
                out = got.mega(x, doc_ids=doc, **fwd)
                torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5, msg=f"{name} call {call}")
                if graphs is None:
                    graphs = counters["stats"]["unique_graphs"]
                    assert graphs >= 1, "flex_attention was not compiled"
                assert counters["stats"]["unique_graphs"] == graphs, f"{name} call {call} recompiled"


def test_unknown_compile_mode_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("MEGATRAIN_FLEX_COMPILE", "fast")
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(ValueError, match="MEGATRAIN_FLEX_COMPILE='fast': expected one of inductor, eager"):
        flex_path.flex_chunk_attention(q, q, q, torch.zeros(8, 8), scale=0.5, causal=True)
