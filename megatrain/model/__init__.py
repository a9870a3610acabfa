"""The model families: MEGA (megatrain/model/mega/) and Megalodon (megatrain/model/megalodon/); pure PyTorch,
imports nothing distributed. What both share: lm.py, context.py, pieces.py, boundary.py, segments.py, generate.py,
layers.py; the registry (build_model by config.model_type): registry.py.

    from megatrain.model import MegaConfig, MegaModel, MegaForCausalLM, MegaForMaskedLM, build_model
    model = MegaForCausalLM(MegaConfig(vocab_size=256, hidden_size=64, is_decoder=True, bidirectional=False))
    model = build_model(MegalodonConfig(vocab_size=256, hidden_size=64, chunk_size=16, norm_num_groups=4, ...))
    out = model(input_ids, labels=input_ids)          # out.logits, out.loss, out.num_loss_tokens
    ids = megatrain.generate(model, input_ids, max_new_tokens=20)
Tests: PYTHONPATH=. python -m pytest -q tests/model tests/hf

MEGA:

HF checkpoints: megatrain.hf. Activation checkpointing / offload are applied from outside
(megatrain.parallel.checkpointing.apply_checkpointing): the model itself only names its pieces (pieces.py).

Same numbers as transformers 4.57.6 on everything it computes correctly (tests/hf/test_hf_parity.py);
different where it does not (tests/hf/test_hf_known_bugs.py, tests/model/test_mega.py):
- chunking at any length (HF: L must be a multiple of chunk_size, and a causal L < chunk_size crashes);
- left padding in a causal LM (HF: softmax rows without a key become NaN and the EMA spreads them over the sample);
  laplace/relu2 normalise by the number of valid keys (HF: i + 1 even when keys are padding);
- rmsnorm normalizes (HF's multiplies by its weight only; load_hf keeps that via config.hf_rmsnorm_noop);
- truncation is always applied (HF's causal LM skips it on its use_cache path, its default without labels);
- batch-norm statistics exclude padding; syncbatchnorm = batchnorm statistics per process;
- feature dropout drops features (HF drops whole chunks of the value tensor);
- layernorm with norm_affine=False works (HF's init crashes); all-ignored labels give loss 0, not NaN;
- generation works, with chunking, carrying EMA state + current-chunk K/V (HF lost generate() in 4.50).
"""
# Every name is resolved lazily: importing one family's module (the exported remote code ships MEGA's alone) loads
# neither the other family nor the registry.
_LAZY = {
    **dict.fromkeys(("LanguageModel", "LMOutput", "MegaOutput"), "megatrain.model.lm"),
    **dict.fromkeys(("MegaCache", "MegaModel"), "megatrain.model.mega.backbone"),
    "MegaConfig": "megatrain.model.mega.config",
    **dict.fromkeys(("HeadOutput", "MegaForMultipleChoice", "MegaForQuestionAnswering",
                     "MegaForSequenceClassification", "MegaForTokenClassification"), "megatrain.model.mega.heads"),
    **dict.fromkeys(("MegaForCausalLM", "MegaForMaskedLM"), "megatrain.model.mega.lm"),
    **dict.fromkeys(("MegalodonCache", "MegalodonModel"), "megatrain.model.megalodon.backbone"),
    "MegalodonConfig": "megatrain.model.megalodon.config",
    "MegalodonForCausalLM": "megatrain.model.megalodon.lm",
    **dict.fromkeys(("MODEL_SPECS", "MODEL_TYPES", "build_model", "model_spec"), "megatrain.model.registry"),
}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
