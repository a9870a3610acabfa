"""megatrain.data: tokenized shards -> packed, DP/worker-split, resumable token windows.

Use:
    from megatrain.data import ShardStream
    stream = ShardStream("shards/index.json", seq_len=4096, seed=0, dp_rank=r, dp_size=n, objective="clm")
    stream = ShardStream(sources=[Source("web", "s3://bucket/web/", 0.7), Source("code", "/d/code", 0.3)], ...)
See stream.py for ordering, splitting and resume rules; mixture.py for the token-cursor plan and the weighted
schedule; remote.py for local/pipe:/https/s3 reads and retries; shards.py for the on-disk format.
Names are imported lazily so data_tools (which need no torch) start fast.
"""
import importlib

_EXPORTS = {"ShardStream": "stream", "DataError": "shards", "Manifest": "shards",
            "MaskingConfig": "masking", "Source": "mixture", "RetryPolicy": "remote"}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"megatrain.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'megatrain.data' has no attribute {name!r}")
