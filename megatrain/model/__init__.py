"""The MEGA model (pure PyTorch; imports nothing distributed).

    from megatrain.model import MegaConfig, MegaModel, MegaForCausalLM, MegaForMaskedLM
    model = MegaForCausalLM(MegaConfig(vocab_size=256, hidden_size=64, is_decoder=True, bidirectional=False))
    out = model(input_ids, labels=input_ids)          # out.logits, out.loss, out.num_loss_tokens
"""
from megatrain.model.config import MegaConfig
from megatrain.model.mega import MegaCache, MegaForCausalLM, MegaForMaskedLM, MegaModel, MegaOutput

__all__ = ["MegaConfig", "MegaModel", "MegaForCausalLM", "MegaForMaskedLM", "MegaOutput", "MegaCache"]
