"""Helpers shared by the model/hf tests: tiny configs and weights far from their init values."""
import torch

from megatrain.model import MegaConfig

TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, intermediate_size=24, ema_projection_size=4,
            shared_representation_size=8, nffn_hidden_size=20, max_positions=64)


def tiny_config(causal: bool = True, **kw) -> MegaConfig:
    base = dict(TINY, is_decoder=causal, bidirectional=not causal, dropout_prob=0.0, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, nffn_activation_dropout_prob=0.0)
    base.update(kw)
    return MegaConfig(**base)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.25) -> torch.nn.Module:
    """Move every float parameter/buffer away from its init (so a wrong mapping or a skipped op shows up in the
    logits); variances stay positive."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.dtype.is_floating_point or name.endswith("_float_tensor"):
            continue
        noise = torch.randn(t.shape, generator=g) * std
        if name.endswith("running_var"):
            t.copy_(noise.abs() + 0.5)
        else:
            t.add_(noise)
    return model


def ids(batch: int, length: int, vocab: int = 50, seed: int = 0, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (batch, length), generator=g)
