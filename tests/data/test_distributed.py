"""DP ranks with unequal shares of shards step in lockstep: a collective per window never hangs.

Run: PYTHONPATH=. python -m pytest -q tests/data/test_distributed.py
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatrain.data import ShardStream
from megatrain.parallel.env import free_port

L = 16


def _rank(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    stream = ShardStream(manifest, seq_len=L, seed=11, dp_rank=rank, dp_size=world, num_workers=1)
    steps = 0
    tokens = []
    for sample in torch.utils.data.DataLoader(stream, batch_size=2):
        n = torch.tensor([sample["input_ids"].numel()])
        dist.all_reduce(n)  # would hang if one rank ran out of windows earlier
        steps += 1
        tokens.append(sample["input_ids"].flatten())
    torch.save({"steps": steps, "tokens": torch.cat(tokens)}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_three_gloo_ranks_step_together(synthetic, tmp_path):
    manifest, _ = synthetic   # 7 shards over 3 ranks
    world = 3
    mp.spawn(_rank, args=(world, free_port(), manifest, str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert len({r["steps"] for r in results}) == 1 and results[0]["steps"] > 0
    content = torch.cat([r["tokens"] for r in results])
    content = content[content != 2]
    assert content.unique().numel() == content.numel()  # no window seen by two ranks
