import math

import torch
from torch import nn

from hist_vlm.train.config import OptimConfig, ScheduleConfig
from hist_vlm.train.optim import WarmupCosine, build_optimizer, build_scheduler, trainable_parameters


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


class Holder(nn.Module):
    """A loss module that keeps the model as a submodule and owns one parameter."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.scale = nn.Parameter(torch.ones(()))


def test_weight_decay_groups_follow_the_reference():
    model = Tiny()
    named = trainable_parameters(model, Holder(model))
    names = [n for n, _ in named]
    assert sorted(names) == ["norm.bias", "norm.weight", "pos_embed", "proj.bias", "proj.weight", "scale", "temp"]
    opt = build_optimizer(named, OptimConfig(lr=1e-3, weight_decay=0.02))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert ids(decay) == {id(model.proj.weight), id(model.pos_embed)}
    assert ids(no_decay) == {id(model.proj.bias), id(model.norm.weight), id(model.norm.bias), id(model.temp),
                             id(named[-1][1])}


def test_warmup_then_cosine_to_min_lr():
    curve = WarmupCosine(lr=1e-4, warmup_lr=1e-6, min_lr=1e-6, warmup_steps=10, total_steps=110)
    lrs = [1e-4 * curve(s) for s in range(111)]
    assert math.isclose(lrs[0], 1e-6) and math.isclose(lrs[5], 1e-6 + (1e-4 - 1e-6) / 2)
    assert math.isclose(lrs[10], 1e-4) and math.isclose(lrs[60], (1e-4 + 1e-6) / 2)
    assert math.isclose(lrs[110], 1e-6)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_scheduler_state_round_trips():
    params = [nn.Parameter(torch.zeros(2))]
    optim_cfg, sched_cfg = OptimConfig(lr=1e-3), ScheduleConfig(warmup_steps=3, warmup_lr=1e-5, min_lr=0.0)
    opt = build_optimizer([("w", params[0])], optim_cfg)
    sched = build_scheduler(opt, optim_cfg, sched_cfg, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    fresh_opt = build_optimizer([("w", params[0])], optim_cfg)
    fresh = build_scheduler(fresh_opt, optim_cfg, sched_cfg, total_steps=20)
    fresh.load_state_dict(sched.state_dict())
    assert fresh.get_last_lr() == sched.get_last_lr()
    fresh_opt.step()
    fresh.step()
    opt.step()
    sched.step()
    assert len(opt.param_groups) == 1   # the empty decay group is dropped
    assert fresh.get_last_lr() == sched.get_last_lr() == [opt.param_groups[0]["lr"]]
