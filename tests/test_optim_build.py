"""build_optimizers partition and the Optimizers bundle's step rules (every-other-step Adam)."""
import copy

import pytest
import torch
from optim_helpers import FakeModel, labelled
from torch import nn

from speedrun.config import OptimConfig
from speedrun.optim.adam import DistAdam
from speedrun.optim.build import ADAM_LR_MUL, build_optimizers


def _cfg(**adam):
    cfg = OptimConfig()
    cfg.muon.kernel = "torch"
    for k, v in adam.items():
        setattr(cfg.adam, k, v)
    return cfg


def test_partition_and_lr_muls():
    model = FakeModel()
    opt = build_optimizers(model, _cfg())
    muon_labels = {p.label for g in opt.muon.param_groups for p in g["params"]}
    assert muon_labels == {"attn", "mlp_fc", "mlp_proj", "smear_gate", "attn_gate"}
    lr_mul = {g["params"][0].label: g["lr_mul"] for g in opt.muon.param_groups}
    assert lr_mul == {"attn": 1.0, "mlp_fc": 2.0, "mlp_proj": 1.0, "smear_gate": 1.0, "attn_gate": 1.0}
    lr_mul = {g["params"][0].label: g["lr_mul"] for g in opt.adam.param_groups}
    assert lr_mul == {"embed": 75.0, "value_embed": 75.0, "lm_head": 1.0, "scalars": 5.0}
    n_params = sum(1 for _ in model.parameters())
    assert sum(len(g["params"]) for o in opt.optimizers for g in o.param_groups) == n_params


def test_unknown_label_is_an_error():
    model = FakeModel()
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="'extra' has label None"):
        build_optimizers(model, _cfg())


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g).to(p.dtype) for n, p in model.named_parameters()}


def _accumulate(model, grads):
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if p.grad is None else p.grad + grads[n]


def test_adam_every_other_step_sums_two_steps():
    model = FakeModel()
    twin = copy.deepcopy(model)  # for a standalone DistAdam stepped once on g0 + g1
    opt = build_optimizers(model, _cfg())
    adam_names = [n for n, p in model.named_parameters() if p.label in ("embed", "value_embed", "lm_head", "scalars")]
    muon_names = [n for n, _ in model.named_parameters() if n not in adam_names]
    params = dict(model.named_parameters())
    start = {n: p.detach().clone() for n, p in params.items()}
    g0, g1 = _grads(model, 0), _grads(model, 1)

    opt.begin_step(0)
    _accumulate(model, g0)
    opt.step(0, 1.0, 0.9)
    assert all(torch.equal(params[n], start[n]) for n in adam_names)          # Adam waits
    assert all(not torch.equal(params[n], start[n]) for n in muon_names)      # NorMuon steps
    opt.zero_grad(0)
    assert all(params[n].grad is None for n in muon_names)
    assert all(torch.equal(params[n].grad, g0[n]) for n in adam_names)        # kept for step 1

    opt.begin_step(1)
    _accumulate(model, g1)
    opt.step(1, 0.8, 0.9)
    opt.zero_grad(1)
    assert all(p.grad is None for p in model.parameters())

    cfg = _cfg()
    tp = dict(twin.named_parameters())
    # (deepcopy drops param.label, so labels come from the original params)
    ref = DistAdam([{"params": [tp[n]], "lr_mul": getattr(cfg.adam, ADAM_LR_MUL[params[n].label])}
                    for n in adam_names], lr=cfg.adam.lr, betas=(cfg.adam.beta1, cfg.adam.beta2))
    for n in adam_names:
        tp[n].grad = (g0[n] + g1[n])
    ref.step(lr_mult=0.8)
    for n in adam_names:
        torch.testing.assert_close(params[n], tp[n], atol=0, rtol=0)
    assert all(st["step"] == 1 for st in opt.adam.state.values())


def test_adam_every_step_when_disabled():
    model = FakeModel()
    opt = build_optimizers(model, _cfg(every_other_step=False))
    before = model.embed.detach().clone()
    opt.begin_step(0)
    _accumulate(model, _grads(model, 0))
    opt.step(0, 1.0, 0.9)
    assert not torch.equal(model.embed, before)
    opt.zero_grad(0)
    assert all(p.grad is None for p in model.parameters())


def test_sync_flag_armed_only_on_adam_steps():
    opt = build_optimizers(FakeModel(), _cfg())
    for step, armed in [(0, False), (1, True), (2, False), (3, True)]:
        opt.begin_step(step)
        assert opt.adam.should_sync is False
        opt.before_last_backward()
        assert opt.adam.should_sync is armed


def test_bundle_state_roundtrip():
    model = FakeModel()
    opt = build_optimizers(model, _cfg())
    for step in range(2):
        opt.begin_step(step)
        _accumulate(model, _grads(model, step))
        opt.step(step, 1.0, 0.9)
        opt.zero_grad(step)
    sd = opt.state_dict()
    assert sd["rank"] == 0 and sd["world_size"] == 1
    other = build_optimizers(model, _cfg())
    other.load_state_dict(sd)
    torch.testing.assert_close(other.muon.buckets[-1].momentum, opt.muon.buckets[-1].momentum)
    with pytest.raises(ValueError, match="world size"):
        other.load_state_dict(dict(sd, world_size=2))
    other.reset()
    assert all(b.momentum.abs().sum() == 0 for b in other.muon.buckets)


def test_adam_rows_must_divide_world_size():
    from speedrun.distributed import World
    model = nn.Module()
    model.scalars = labelled((5,), "scalars")
    with pytest.raises(ValueError, match="'scalars'.*divisible by the world size 2"):
        build_optimizers(model, _cfg(), World(rank=0, world_size=2))
