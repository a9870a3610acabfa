"""Shared pytest setup: offline, and CPU tests deterministic. (pytest puts the repository root on sys.path itself:
tests/ is a package, so `megatrain` and `tests.*` import from the checkout.)"""
import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# Tiny test models run 10-40x faster on one thread than on two contended ones; multi-process tests start their own
# interpreters and set threads themselves.
torch.set_num_threads(1)
