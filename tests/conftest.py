"""Shared pytest setup: run from a plain checkout (no install needed) and keep CPU tests deterministic."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Tiny test models run 10-40x faster on one thread than on two contended ones; multi-process tests start their own
# interpreters and set threads themselves.
torch.set_num_threads(1)
