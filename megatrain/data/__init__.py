"""megatrain.data: tokenized shards -> packed, DP/worker-split, resumable token windows.

Use:
    from megatrain.data import ShardStream, sp_slice
    stream = ShardStream("shards/index.json", seq_len=4096, seed=0, dp_rank=r, dp_size=n, objective="clm")
See stream.py for ordering, splitting and resume rules; shards.py for the on-disk format.
"""
from megatrain.data.shards import DataError, Manifest
from megatrain.data.sp import sp_slice
from megatrain.data.stream import ShardStream

__all__ = ["ShardStream", "sp_slice", "DataError", "Manifest"]
