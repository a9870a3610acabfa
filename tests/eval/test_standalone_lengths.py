"""launch/evaluate.py's length check is the window rule of training (parallel/sequence.py check_window), for every
family, with the command's own flags in its messages.

Run: PYTHONPATH=. python -m pytest -q tests/eval/test_standalone_lengths.py
"""
import pytest

from megatrain.eval.standalone import check_lengths
from megatrain.model.mega.config import MegaConfig
from megatrain.model.megalodon.config import MegalodonConfig


@pytest.mark.parametrize("config", [MegaConfig(chunk_size=8, use_chunking=True, is_decoder=True, bidirectional=False),
                                    MegalodonConfig(chunk_size=8)], ids=["mega", "megalodon"])
def test_lengths_follow_the_window_rule_with_the_commands_flags(config):
    check_lengths([16, 32], config, 2)                       # whole chunks per SP slice
    with pytest.raises(ValueError, match=r"--seq-len=24: SP slice length 24/2 = 12 .* --sp = 8 x 2"):
        check_lengths([16, 24], config, 2)
    with pytest.raises(ValueError, match=r"--seq-len=17 is not divisible by --sp=2"):
        check_lengths([17], config, 2)
    with pytest.raises(ValueError, match=r"--passkey-lengths=12: must be a multiple of model.chunk_size=8"):
        check_lengths([12], config, 1, "--passkey-lengths")
    with pytest.raises(ValueError, match=r"--seq-len 0: expected a positive length"):
        check_lengths([0], config, 1)


def test_a_transformers_model_takes_any_length():
    from transformers import LlamaConfig
    check_lengths([17, 1000], LlamaConfig(), 1)
