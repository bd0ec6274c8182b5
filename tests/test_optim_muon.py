"""NorMuon, one process: each feature against the hand-written reference in optim_helpers."""
import math

import pytest
import torch
from optim_helpers import labelled, reference_normuon

from speedrun.optim.muon import NorMuon
from speedrun.optim.polar_express import polar_express_reference

ATOL = 1e-6  # the reference feeds Polar Express bitwise the same input, so only fp32 rounding differs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)   # every test sees the same random inputs


def _run(shapes_labels, steps=3, *, ref_kwargs=None, opt_kwargs=None, lr_mult=1.0, mu=0.9,
         groups_lr_mul=None, seed=0):
    """Run NorMuon and the reference side by side on fresh params; return (ours, reference) params."""
    gen = torch.Generator().manual_seed(seed)
    params = [labelled(s, l, gen=gen) for s, l in shapes_labels]
    ref = [p.detach().clone() for p in params]
    lr_muls = groups_lr_mul or [1.0] * len(params)
    opt_kwargs = {"lr": 0.02, "weight_decay": 0.0, **(opt_kwargs or {})}
    opt = NorMuon([{"params": [p], "lr_mul": m} for p, m in zip(params, lr_muls)], kernel="torch", **opt_kwargs)
    states = [{} for _ in params]
    ref_kwargs = ref_kwargs or {}
    for step in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.to(p.dtype)
            ref[i] = reference_normuon(ref[i], g, states[i], lr=opt_kwargs["lr"], wd=opt_kwargs["weight_decay"],
                                       mu=mu, lr_mult=lr_mult, lr_mul=lr_muls[i], split=p.label == "attn",
                                       **ref_kwargs)
        opt.step(lr_mult=lr_mult, momentum=mu)
    return [p.detach() for p in params], ref


def _close(ours, ref, atol=ATOL):
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=0)


def test_plain_momentum_and_nesterov():
    for nesterov in (True, False):
        kw = dict(nesterov=nesterov, normalize=False, cautious=False)
        ours, ref = _run([((8, 24), "mlp_proj")], ref_kwargs=kw,
                         opt_kwargs=dict(nesterov=nesterov, normalize=False, cautious_weight_decay=False))
        _close(ours, ref)
    # the two variants really differ (the switch does something)
    a, _ = _run([((8, 24), "mlp_proj")], opt_kwargs=dict(nesterov=True, normalize=False))
    b, _ = _run([((8, 24), "mlp_proj")], opt_kwargs=dict(nesterov=False, normalize=False))
    assert (a[0] - b[0]).abs().max() > 1e-3


def test_first_step_is_orthogonalized_gradient():
    """Momentum 0, plain Muon: p moves by exactly lr * PolarExpress(g). (Polar Express is not
    bitwise scale-free in bf16, so the test feeds it exactly g.)"""
    p = labelled((8, 24), "mlp_proj")
    p0 = p.detach().clone()
    g = torch.randn(8, 24)
    p.grad = g.clone()
    NorMuon([p], lr=0.1, weight_decay=0.0, normalize=False, kernel="torch").step(momentum=0.0)
    expected = p0 - 0.1 * polar_express_reference(g).float()
    torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_attention_is_four_separate_matrices():
    kw = dict(normalize=False, cautious=False)
    ours, ref = _run([((8, 32), "attn")], steps=1, ref_kwargs=kw, opt_kwargs=dict(normalize=False))
    _close(ours, ref)
    # whole-matrix orthogonalization would be a different update
    whole, _ = _run([((8, 32), "mlp_proj")], steps=1, opt_kwargs=dict(normalize=False))
    assert (whole[0] - ours[0]).abs().max() > 1e-3


@pytest.mark.parametrize("shape,label", [((8, 24), "mlp_fc"), ((24, 8), "mlp_proj"), ((8, 32), "attn"),
                                         ((2, 4), "attn_gate")])
def test_normalization_axis_and_norm_restore(shape, label):
    """Wide params: statistic per column; tall: per row; ||O'||_F restored to ||O||_F per matrix."""
    ours, ref = _run([(shape, label)], steps=3, ref_kwargs=dict(cautious=False), opt_kwargs={})
    _close(ours, ref)


def test_normalization_statistic_shape_and_restore():
    p = labelled((8, 24), "mlp_fc")
    p.grad = torch.randn(8, 24)
    opt = NorMuon([p], lr=1.0, weight_decay=0.0, kernel="torch")
    before = p.detach().clone()
    opt.step(momentum=0.0)  # u == g exactly, so O below is bitwise what the optimizer saw
    b = opt.buckets[0]
    assert b.second_moment.shape == (1, 24)            # one entry per column of the wide param
    O = polar_express_reference(p.grad).float()
    torch.testing.assert_close(b.second_moment[0], 0.05 * (O ** 2).mean(0), atol=1e-6, rtol=1e-4)
    # norm restore: the step has the Frobenius norm of the orthogonalized momentum
    assert abs((before - p.detach()).norm().item() - O.norm().item()) < 1e-3 * O.norm().item()
    # tall param: one entry per row
    q = labelled((24, 8), "mlp_proj")
    q.grad = torch.randn(24, 8)
    opt = NorMuon([q], kernel="torch")
    opt.step()
    assert opt.buckets[0].second_moment.shape == (1, 24)


def test_cautious_weight_decay_mask():
    kw = dict(cautious=True)
    ours, ref = _run([((8, 24), "mlp_proj"), ((8, 32), "attn")], ref_kwargs=kw,
                     opt_kwargs=dict(weight_decay=1.2, cautious_weight_decay=True), lr_mult=0.7)
    _close(ours, ref)
    kw = dict(cautious=False)
    plain, ref = _run([((8, 24), "mlp_proj"), ((8, 32), "attn")], ref_kwargs=kw,
                      opt_kwargs=dict(weight_decay=1.2, cautious_weight_decay=False), lr_mult=0.7)
    _close(plain, ref)
    assert (plain[0] - ours[0]).abs().max() > 1e-5


def test_cautious_decay_only_where_signs_agree():
    """With a huge decay the mask is visible directly: entries where update and p disagree in sign
    move by exactly lr*O', the others additionally shrink."""
    p = labelled((8, 24), "mlp_proj", scale=1.0)
    p0 = p.detach().clone()
    p.grad = torch.randn(8, 24)
    NorMuon([p], lr=0.01, weight_decay=10.0, normalize=False, kernel="torch").step(momentum=0.0)
    O = polar_express_reference(p.grad).float()
    agree = O * p0 >= 0
    step = p0 - p.detach()
    torch.testing.assert_close(step[~agree], 0.01 * O[~agree], atol=1e-6, rtol=0)
    torch.testing.assert_close(step[agree], 0.01 * (O[agree] + 0.1 * p0[agree]), atol=1e-6, rtol=0)


def test_lr_multipliers_and_shape_scaling():
    """lr_mult (schedule), per-group lr_mul (c_fc), sqrt(max(1, rows/cols)) for tall params."""
    shapes = [((8, 24), "mlp_fc"), ((8, 24), "mlp_proj"), ((24, 8), "mlp_proj"), ((32, 8), "mlp_proj")]
    ours, ref = _run(shapes, steps=2, lr_mult=0.3, groups_lr_mul=[2.0, 1.0, 1.0, 3.0],
                     ref_kwargs=dict(cautious=True), opt_kwargs=dict(weight_decay=0.5))
    _close(ours, ref)
    # direct check of the tall factor on a first plain step: |dp|_F = lr * sqrt(R/C) * |PE(g)|_F
    q = labelled((32, 8), "mlp_proj")
    q0 = q.detach().clone()
    q.grad = torch.randn(32, 8)
    NorMuon([q], lr=0.01, weight_decay=0.0, normalize=False, kernel="torch").step(momentum=0.0)
    O = polar_express_reference(q.grad).float()
    torch.testing.assert_close(q0 - q.detach(), 0.01 * math.sqrt(32 / 8) * O, atol=1e-6, rtol=0)


def test_bf16_gate_params():
    ours, ref = _run([((2, 12), "attn_gate"), ((1, 12), "smear_gate")], steps=2)
    for p in ours:
        assert p.dtype == torch.float32  # labelled() default; now check bf16 storage explicitly
    p = labelled((2, 12), "attn_gate", torch.bfloat16)
    p.grad = torch.randn(2, 12).bfloat16()
    opt = NorMuon([p], kernel="torch")
    opt.step()
    assert p.dtype == torch.bfloat16 and opt.buckets[0].momentum.dtype == torch.bfloat16
    assert torch.isfinite(p.float()).all()


def test_mixed_bucket_runs_and_state_roundtrip():
    """attn and mlp of the same shape share one bucket (attn first) and still match the reference."""
    shapes = [((8, 32), "mlp_fc"), ((8, 32), "attn"), ((8, 32), "mlp_proj"), ((8, 32), "attn")]
    ours, ref = _run(shapes, steps=2, groups_lr_mul=[2.0, 1.0, 1.0, 1.0], opt_kwargs=dict(weight_decay=1.2))
    _close(ours, ref)
    params = [labelled(s, l) for s, l in shapes]
    opt = NorMuon(params, kernel="torch")
    assert len(opt.buckets) == 1 and [p.label for p in opt.buckets[0].params] == ["attn", "attn", "mlp_fc", "mlp_proj"]
    attn_plan, mlp_plan = opt.buckets[0].plans[0], opt.buckets[0].plans[2]
    assert opt.buckets[0].runs() == [(0, 2, attn_plan), (2, 4, mlp_plan)] and attn_plan[0].count == 4
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    opt2 = NorMuon(params, kernel="torch")
    opt2.load_state_dict(sd)
    torch.testing.assert_close(opt2.buckets[0].momentum, opt.buckets[0].momentum)
    bad = dict(sd, world_size=2)
    with pytest.raises(ValueError, match="world size"):
        opt2.load_state_dict(bad)


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        NorMuon([labelled((4,), "scalars")])


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_shard_layout_any_world_size(world_size):
    """The record's 43 matrices: every slot owned by exactly one rank, chunk = ceil(n / world)."""
    from speedrun.distributed import World
    shapes = [((16, 64), "attn")] * 10 + [((16, 64), "mlp_fc")] * 11 + [((16, 64), "mlp_proj")] * 11 \
        + [((6, 12), "attn_gate")] * 10 + [((1, 12), "smear_gate")]
    params = [labelled(s, l) for s, l in shapes]
    owned = {}
    for rank in range(world_size):
        opt = NorMuon(params, world=World(rank=rank, world_size=world_size), kernel="torch")
        assert [len(b.params) for b in opt.buckets] == [1, 10, 32]            # small buckets first
        for b in opt.buckets:
            assert b.chunk == -(-len(b.params) // world_size)
            assert b.momentum.shape[0] == b.real
            for i in range(b.start, b.start + b.real):
                owned.setdefault(id(b.params[i]), []).append(rank)
    assert sorted(len(v) for v in owned.values()) == [1] * 43
