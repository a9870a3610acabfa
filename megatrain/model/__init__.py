"""The MEGA model (pure PyTorch; imports nothing distributed).

    from megatrain.model import MegaConfig, MegaModel, MegaForCausalLM, MegaForMaskedLM
    model = MegaForCausalLM(MegaConfig(vocab_size=256, hidden_size=64, is_decoder=True, bidirectional=False))
    out = model(input_ids, labels=input_ids)          # out.logits, out.loss, out.num_loss_tokens
    ids = megatrain.generate(model, input_ids, max_new_tokens=20)
Tests: PYTHONPATH=. python -m pytest -q tests/model tests/hf

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
from megatrain.model.backbone import MegaCache, MegaModel
from megatrain.model.config import MegaConfig
from megatrain.model.heads import (HeadOutput, MegaForMultipleChoice, MegaForQuestionAnswering,
                                   MegaForSequenceClassification, MegaForTokenClassification)
from megatrain.model.lm import MegaForCausalLM, MegaForMaskedLM, MegaOutput, build_model

__all__ = ["MegaConfig", "MegaModel", "MegaForCausalLM", "MegaForMaskedLM", "MegaOutput", "MegaCache", "build_model",
           "MegaForSequenceClassification", "MegaForTokenClassification", "MegaForQuestionAnswering",
           "MegaForMultipleChoice", "HeadOutput"]
