"""Optimizer pieces: LR schedule, weight-decay groups, the NaN guard + clipping used without ZeRO.

Run: PYTHONPATH=. python -m pytest -q tests/train/test_optim.py
"""
import math

import pytest
import torch

from megatrain.config import TrainCfg
from megatrain.model import MegaConfig, MegaForCausalLM
from megatrain.train.optim import GuardedAdamW, build_optimizer, lr_factor, param_groups


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
