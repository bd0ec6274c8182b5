"""build_optimizers partition and the Optimizers bundle's step rules (every-other-step Adam)."""
import copy

import pytest
import torch
from optim_helpers import FakeModel, labelled, reference_adam
from torch import nn

from speedrun.config import AdamGroup, OptimConfig
from speedrun.optim.adam import DistAdam
from speedrun.optim.build import adam_group, build_optimizers
from speedrun.presets import record89_optim


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


def _two_steps(model, opt):
    """Steps 0 (Muon) and 1 (Muon + Adam on both steps' gradients) on _grads."""
    for step in range(2):
        opt.begin_step(step)
        _accumulate(model, _grads(model, step))
        opt.step(step, 1.0, 0.9)
        opt.zero_grad(step)


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
    ref = DistAdam([{"params": [tp[n]], **adam_group(params[n].label, cfg)}
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
    _two_steps(model, opt)
    sd = opt.state_dict()
    assert sd["rank"] == 0 and sd["world_size"] == 1
    other = build_optimizers(model, _cfg())
    other.load_state_dict(sd)
    torch.testing.assert_close(other.muon.buckets[-1].momentum, opt.muon.buckets[-1].momentum)
    with pytest.raises(ValueError, match="world size"):
        other.load_state_dict(dict(sd, world_size=2))
    other.reset()
    assert all(b.momentum.abs().sum() == 0 for b in other.muon.buckets)


def test_adam_replicates_what_does_not_shard():
    """Params whose dim 0 does not divide by the world size (and 0-d ones) are replicated: full state
    on every rank; the others keep only this rank's rows."""
    from speedrun.distributed import World
    model = nn.Module()
    model.scalars = labelled((5,), "scalars")
    model.embed = labelled((8, 4), "embed")
    model.scale = labelled((), "mudd_gate_bias")
    opt = build_optimizers(model, _cfg(), World(rank=1, world_size=2))
    shapes = {p.label: tuple(opt.adam.state[p]["exp_avg"].shape) for p in model.parameters()}
    assert shapes == {"scalars": (5,), "embed": (4, 4), "mudd_gate_bias": ()}
    assert opt.adam._shard(model.embed).data_ptr() == model.embed[4:].data_ptr()


def test_record89_groups_per_label():
    """Each Adam label is one param group with its AdamGroup's betas, lr_mul and wd_mul; record 89
    puts the smear gate on Adam."""
    model = FakeModel(r89=True)
    opt = build_optimizers(model, record89_optim())
    groups = {g["params"][0].label: (g["betas"], g["lr_mul"], g["wd_mul"], g["eps"]) for g in opt.adam.param_groups}
    assert groups == {"embed": ((0.5, 0.95), 1.0, 150.0, 1e-10), "value_embed": ((0.75, 0.95), 75.0, 5.0, 1e-10),
                      "lm_head": ((0.5, 0.95), 1.0, 150.0, 1e-10), "scalars": ((0.9, 0.99), 5.0, 0.0, 1e-10),
                      "smear_gate": ((0.9, 0.99), 0.01, 0.0, 1e-10),
                      "bigram_embed": ((0.75, 0.95), 75.0, 5.0, 1e-10),
                      "resid_lambdas": ((0.9, 0.95), 5.0, 0.0, 1e-10), "ve_gate": ((0.9, 0.99), 1.0, 1.0, 1e-10),
                      "mudd_gate_bias": ((0.9, 0.99), 0.1, 0.0, 1e-10)}
    assert {g["params"][0].label for g in opt.muon.param_groups} == {"attn", "mlp_fc", "mlp_proj", "attn_gate"}
    # record 45's labels under record 45's config: one betas pair, wd_mul 1
    opt45 = build_optimizers(model, _cfg())
    assert {(g["betas"], g["wd_mul"]) for g in opt45.adam.param_groups
            if g["params"][0].label in ("embed", "value_embed", "lm_head", "scalars")} == {((0.65, 0.95), 1.0)}


def test_per_group_betas_and_weight_decay_multiplier_math():
    """Two steps of two groups with their own betas / lr_mul / wd_mul (cautious decay on) against
    Adam written out per parameter."""
    torch.manual_seed(0)
    a, b = labelled((6, 5), "embed"), labelled((4, 3), "bigram_embed")
    ref = {n: (p.detach().clone(), {}) for n, p in (("a", a), ("b", b))}
    hp = {"a": dict(b1=0.5, b2=0.9, lr_mul=2.0, wd_mul=150.0), "b": dict(b1=0.8, b2=0.99, lr_mul=0.5, wd_mul=0.0)}
    opt = DistAdam([{"params": [a], "betas": (0.5, 0.9), "lr_mul": 2.0, "wd_mul": 150.0},
                    {"params": [b], "betas": (0.8, 0.99), "lr_mul": 0.5, "wd_mul": 0.0}],
                   lr=0.01, eps=1e-10, weight_decay=0.005, cautious_weight_decay=True,
                   state_dtype=torch.float32, kernel="torch")
    for step in range(2):
        grads = {"a": torch.randn(6, 5), "b": torch.randn(4, 3)}
        a.grad, b.grad = grads["a"], grads["b"]
        opt.step(lr_mult=0.7)
        for n, p in (("a", a), ("b", b)):
            h = hp[n]
            lr = 0.01 * 0.7 * h["lr_mul"]
            want, state = ref[n]
            ref[n] = (reference_adam(want, grads[n], state, lr=lr, b1=h["b1"], b2=h["b2"], eps=1e-10,
                                     wd=0.005 * h["wd_mul"], cautious=True, state_dtype=torch.float32), state)
            torch.testing.assert_close(p.detach(), ref[n][0], rtol=1e-6, atol=1e-7)
    assert not torch.equal(ref["a"][0], a.detach() * 0)   # decayed and moved


def test_copy_adam_state_for_the_untie():
    model = FakeModel()
    opt = build_optimizers(model, _cfg())
    _two_steps(model, opt)
    head, embed = opt.adam.state[model.lm_head], opt.adam.state[model.embed]
    assert not torch.equal(head["exp_avg"], embed["exp_avg"])
    opt.copy_adam_state(model.lm_head, model.embed)
    assert embed["step"] == head["step"] == 1
    assert torch.equal(embed["exp_avg"], head["exp_avg"]) and torch.equal(embed["exp_avg_sq"], head["exp_avg_sq"])
    assert embed["exp_avg"].data_ptr() != head["exp_avg"].data_ptr()   # copied, not shared
    with pytest.raises(ValueError, match="shapes differ"):
        opt.copy_adam_state(model.lm_head, model.scalars)


def test_renamed_lr_fields_still_load():
    """Configs written before the per-label groups (embed_lr_mul, ...) load into the groups."""
    from speedrun.config import Config
    cfg = Config.from_dict({"optim": {"adam": {"embed_lr_mul": 3.0, "head_lr_mul": 2.0}}})
    assert cfg.optim.adam.embed == AdamGroup(3.0) and cfg.optim.adam.lm_head == AdamGroup(2.0)
    assert Config().override({"optim.adam.scalar_lr_mul": "4"}).optim.adam.scalars.lr_mul == 4.0


def test_sparse_bigram_comms_turns_on_from_eight_ranks_or_when_asked():
    from speedrun.optim.build import sparse_bigram_comms
    cfg = OptimConfig()
    assert cfg.adam.sparse_bigram_comms == "auto"
    assert [sparse_bigram_comms(cfg, w) for w in (1, 2, 4, 8, 16)] == [False, False, False, True, True]
    cfg.adam.sparse_bigram_comms = "on"
    assert [sparse_bigram_comms(cfg, w) for w in (1, 2, 8)] == [False, True, True]   # 1 rank: nothing to send
    cfg.adam.sparse_bigram_comms = "off"
    assert not sparse_bigram_comms(cfg, 8)
