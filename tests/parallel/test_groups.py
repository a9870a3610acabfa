"""DP x SP groups and the DeepSpeed contract they rely on.

Run: PYTHONPATH=. python -m pytest -q tests/parallel/test_groups.py
The DeepSpeed test is the proof behind exact SP training: with our mpu, the per-rank loss
(slice loss sum / window label count) plus DeepSpeed's gradient reduction (sum over DP x SP ranks, divided by DP)
gives exactly the update of one process training on the whole windows, for ZeRO stages 0-3.
"""
import pytest
import torch

from megatrain.parallel.groups import layout
from tests.dist_util import run_ranks


def test_layout_consecutive_sp_ranks():
    assert [layout(r, 2, 2) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [layout(r, 1, 4) for r in range(4)] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    with pytest.raises(ValueError, match="outside"):
        layout(4, 2, 2)
    with pytest.raises(ValueError, match="sp_size=0"):
        layout(0, 2, 0)


def _group_sums(rank, world):
    """What each group of this rank sums to when every rank contributes its own rank number."""
    import torch.distributed as dist
    from megatrain.parallel.groups import ParallelGroups
    with pytest.raises(ValueError, match="world size"):
        ParallelGroups(dp_size=3, sp_size=2)
    g = ParallelGroups(dp_size=2, sp_size=2)
    sums = {}
    for name, grp in [("sp", g.sp_group), ("dp", g.dp_group), ("all", g.get_sequence_data_parallel_group()),
                      ("mp", g.get_model_parallel_group())]:
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=grp)
        sums[name] = t.item()
    return (g.dp_rank, g.sp_rank, g.get_data_parallel_world_size(), g.get_sequence_parallel_world_size(),
            g.get_sequence_data_parallel_world_size(), sums)


# ---- DeepSpeed reduces our per-rank losses into the single-process gradient ----
L, DIM = 8, 3


def _windows(dp):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dp, L, DIM, generator=g, dtype=torch.float64).float()
    y = torch.randn(dp, L, generator=g, dtype=torch.float64).float()
    keep = torch.ones(dp, L)
    keep[:, 1] = 0  # an ignored label, so label counts differ between slices
    return x, y, keep


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def _reference(dp):
    """One process: each DP window's mean token loss, averaged over windows; one SGD step (lr=1)."""
    x, y, keep = _windows(dp)
    m = _model().double()
    losses = [((m(x[d].double()).squeeze(-1) - y[d].double()) ** 2 * keep[d]).sum() / keep[d].sum()
              for d in range(dp)]
    torch.stack(losses).mean().backward()
    return [(p - p.grad).detach().float() for p in m.parameters()]


def _ds_worker(rank, world, dp, sp, stages):
    import deepspeed
    from megatrain.config import Config
    from megatrain.parallel.zero import deepspeed_config
    from megatrain.parallel.groups import ParallelGroups
    from megatrain.parallel.sequence import reduce_sp_loss
    g = ParallelGroups(dp_size=dp, sp_size=sp)
    x, y, keep = _windows(dp)
    s = slice(g.sp_rank * L // sp, (g.sp_rank + 1) * L // sp)
    xs, ys, ks = x[g.dp_rank, s], y[g.dp_rank, s], keep[g.dp_rank, s]
    out = {"groups": _group_sums(rank, world)}
    for stage in stages:
        run = Config()
        run.parallel.zero_stage, run.parallel.sequence_parallel_size, run.train.grad_clip = stage, sp, 0.0
        # SGD (exact lr=1 arithmetic) is not on ZeRO's list of tested optimizers (the trainer's AdamW is)
        run.deepspeed = {"zero_allow_untested_optimizer": True}
        cfg = deepspeed_config(run, world)  # the production JSON (batch sizes, ZeRO settings)
        model = _model()
        g.zero3_partition(model, cfg)  # ZeRO-3 must partition over DP x SP, like its gradients (see groups.py)
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                          config=cfg, mpu=g)
        loss_sum = ((engine(xs).squeeze(-1) - ys) ** 2 * ks).sum()
        loss = reduce_sp_loss(loss_sum, ks.sum(), g.sp_group, grad_average_size=1)
        engine.backward(loss.backward_loss)
        engine.step()
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
            out[stage] = [p.detach().clone() for p in engine.module.parameters()]
        engine.destroy()
    return out


@pytest.mark.slow
def test_groups_and_deepspeed_reduction_equal_single_process():
    """4 ranks = DP 2 x SP 2: the groups have the documented members, and for ZeRO 0-3 every rank ends with the
    single-process SGD update."""
    ref = _reference(dp=2)
    res = run_ranks(_ds_worker, 4, 2, 2, (0, 1, 2, 3))
    # SP groups {0,1},{2,3}; DP groups {0,2},{1,3}; everything {0..3}; model-parallel = the rank alone
    assert res[0].pop("groups") == (0, 0, 2, 2, 4, {"sp": 1.0, "dp": 2.0, "all": 6.0, "mp": 0.0})
    assert res[1].pop("groups") == (0, 1, 2, 2, 4, {"sp": 1.0, "dp": 4.0, "all": 6.0, "mp": 1.0})
    assert res[2].pop("groups") == (1, 0, 2, 2, 4, {"sp": 5.0, "dp": 2.0, "all": 6.0, "mp": 2.0})
    assert res[3].pop("groups") == (1, 1, 2, 2, 4, {"sp": 5.0, "dp": 4.0, "all": 6.0, "mp": 3.0})
    for per_rank in res:
        for stage, params in per_rank.items():
            for p, r in zip(params, ref):
                torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6, msg=lambda m: f"ZeRO {stage}: {m}")
