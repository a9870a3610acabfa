"""Optimizer pieces: LR schedule, weight-decay groups, the NaN guard + clipping used without ZeRO.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_optim.py
"""
import math

import pytest
import torch

from megatrain.config import TrainCfg
from megatrain.model import MegaConfig, MegaForCausalLM
from megatrain.train.optim import (GuardedAdamW, build_optimizer, build_scheduler, lr_factor, param_groups,
                                   schedule_changes)


def test_warmup_then_cosine_linear_constant():
    t = TrainCfg(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    f = [lr_factor(s, t) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5) and f[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone after warmup
    t.lr_schedule = "linear"
    assert lr_factor(60, t) == pytest.approx(0.55) and lr_factor(110, t) == pytest.approx(0.1)
    t.lr_schedule = "constant"
    assert lr_factor(100, t) == 1.0


def test_weight_decay_groups_skip_vectors_and_ema():
    model = MegaForCausalLM(MegaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                       shared_representation_size=8, nffn_hidden_size=32, ema_projection_size=2,
                                       is_decoder=True, bidirectional=False))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 and "ema" not in names[id(p)] for p in decay["params"])
    ema_names = [names[id(p)] for p in no_decay["params"] if "ema" in names[id(p)]]
    assert any("damping_factor" in n for n in ema_names) and any("kernel_projection_matrix" in n for n in ema_names)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]


def test_guard_skips_non_finite_and_leaves_everything_alone():
    ps = _params()
    opt = GuardedAdamW(ps, max_norm=1.0, lr=0.1)
    before = [p.detach().clone() for p in ps]
    ps[0].grad = torch.ones(3, 2)
    ps[1].grad = torch.tensor([1.0, float("nan")])
    opt.step()
    assert opt.overflow and math.isnan(opt._global_grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, ps)) and not opt.state  # no moment updates either


def test_guard_reports_preclip_norm_and_clips_like_torch():
    ps, ref = _params(), _params()
    grads = [torch.full((3, 2), 3.0), torch.tensor([4.0, 0.0])]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    opt = GuardedAdamW(ps, max_norm=1.0, lr=0.1)
    opt.step()
    norm = math.sqrt(6 * 9 + 16)
    assert not opt.overflow and opt._global_grad_norm == pytest.approx(norm)
    torch_opt = torch.optim.AdamW(ref, lr=0.1)
    for p, g in zip(ref, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.0)  # same 1e-6 guard as ours
    torch_opt.step()
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b)


def test_build_optimizer_guards_only_when_asked():
    m = torch.nn.Linear(2, 2)
    assert build_optimizer(m, TrainCfg(grad_clip=0.5), guard=True).max_norm == 0.5
    # unguarded (ZeRO/bf16 wrap it): exactly torch's AdamW, which DeepSpeed's ZeRO treats as a tested optimizer
    assert type(build_optimizer(m, TrainCfg(grad_clip=0.5), guard=False)) is torch.optim.AdamW


def test_schedule_is_position_plus_config():
    """A checkpoint keeps only the schedule's position: loading it under another config gives that config's rate
    at once, bitwise the rate an uninterrupted run with that config has at the same position."""
    old, new = TrainCfg(max_steps=3, warmup_steps=1, lr=1e-3), TrainCfg(max_steps=7, warmup_steps=1, lr=2e-3)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=old.lr)
    sched = build_scheduler(opt, old)
    for _ in range(3):
        opt.step()
        sched.step()
    saved = sched.state_dict()
    assert saved == {"last_epoch": 3, "_step_count": 4}
    ref_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=new.lr)
    ref = build_scheduler(ref_opt, new)
    for _ in range(3):
        ref_opt.step()
        ref.step()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=new.lr)
    opt2.load_state_dict(opt.state_dict())  # what a checkpoint load does: the old run's rate comes back ...
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != ref_opt.param_groups[0]["lr"]
    resumed = build_scheduler(opt2, new)
    resumed.load_state_dict(saved)  # ... and the schedule replaces it with the new config's
    assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == new.lr * lr_factor(3, new)
    assert resumed.get_last_lr() == ref.get_last_lr()
    for _ in range(2):
        opt2.step(), resumed.step(), ref_opt.step(), ref.step()
        assert opt2.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]


def test_schedule_changes_names_each_field():
    assert schedule_changes(TrainCfg(max_steps=3), TrainCfg(max_steps=7)) == ["train.max_steps 3 -> 7"]
    assert schedule_changes(TrainCfg(lr=1e-3, seed=1), TrainCfg(lr=1e-3, seed=2)) == []
    assert schedule_changes(TrainCfg(lr_schedule="cosine", warmup_steps=0),
                            TrainCfg(lr_schedule="linear", warmup_steps=2)) == \
        ["train.lr_schedule cosine -> linear", "train.warmup_steps 0 -> 2"]
