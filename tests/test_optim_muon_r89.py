"""NorMuon's record-89 switches (optim.muon.axis, qk_head_pairs, bf16_weights, c_proj_lr_mul): each
against record 89's update written independently in the public code's layout (optim_helpers), the
off state bitwise record 45 (fixture), the mantissa's bits, checkpoints, the sharded layout."""
import math

import muon_r45_fixture
import numpy as np
import pytest
import torch
from optim_helpers import (
    FakeModel,
    from_public_layout,
    labelled,
    reference_normuon_r89,
    to_public_layout,
    truncate_to_bf16_bits,
)

from speedrun.config import Config, ConfigError, OptimConfig
from speedrun.distributed import World
from speedrun.optim.build import build_optimizers
from speedrun.optim.muon import NorMuon, join_master, matrix_plan, split_master_
from speedrun.optim.polar_express import polar_express_reference

MUON_LABELS = ("attn", "mlp_fc", "mlp_proj", "attn_gate", "smear_gate")


def r89_config(**overrides) -> OptimConfig:
    """Record 89's NorMuon values (r89-training 5.1, 5.2)."""
    cfg = OptimConfig()
    m = cfg.muon
    m.kernel, m.lr, m.beta2 = "torch", 0.023, 0.9
    m.axis, m.qk_head_pairs, m.bf16_weights = "matrix", True, True
    m.c_fc_lr_mul, m.c_proj_lr_mul = 2.0, 4.0
    for k, v in overrides.items():
        setattr(m, k, v)
    return cfg


def _muon_params(model):
    return [(n, p) for n, p in model.named_parameters() if p.label in MUON_LABELS]


def _masters(opt, model) -> dict[str, torch.Tensor]:
    """Each NorMuon param's fp32 master value: bits(p) << 16 | mantissa (world size 1)."""
    out = {}
    for b in opt.muon.buckets:
        for i, p in enumerate(b.params):
            out[id(p)] = join_master(p.detach(), b.mantissa[i]) if b.mantissa is not None else p.detach().float()
    return {n: out[id(p)] for n, p in _muon_params(model)}


# ---- record 45 stays -----------------------------------------------------------------------------

def test_off_state_is_bitwise_record45():
    """With every new switch at its default, params and state after 4 steps are bitwise those
    captured before the switches existed (tests/muon_r45_fixture.py)."""
    expected = torch.load(muon_r45_fixture.FIXTURE, weights_only=True)
    got = muon_r45_fixture.compute()
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k


# ---- every rule against the public-layout reference ----------------------------------------------

@pytest.mark.parametrize("num_heads", [2, 4])
def test_record89_update_matches_public_layout_reference(num_heads):
    """3 steps of build_optimizers' NorMuon with record 89's values on bf16 params vs
    reference_normuon_r89 applied slot by slot to the public layout's matrices in float64: Q/K per
    head pair, V/O whole, c_fc/c_proj transposed (shape factor 2, c_proj x2), the axis from each
    matrix's shape, cautious decay with >= and the fp32 master kept in the mantissa."""
    model = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=2, num_heads=num_heads, matrix_dtype=torch.bfloat16, seed=1)
    cfg = r89_config()
    opt = build_optimizers(model, cfg)
    params = _muon_params(model)
    ref = {n: [(M.double(), f) for M, f in to_public_layout(_as_labelled(p))] for n, p in params}
    states = {n: [{} for _ in ref[n]] for n, _ in params}
    gen = torch.Generator().manual_seed(5)
    for step, (lr_mult, mu) in enumerate([(1.0, 0.85), (0.7, 0.9), (0.4, 0.95)]):
        for n, p in params:
            g = torch.randn(p.shape, generator=gen).to(p.dtype)
            p.grad = g
            g_public = [M for M, _ in to_public_layout(_as_labelled(p, g.float()))]
            ref[n] = [(reference_normuon_r89(M, gM, st, lr=0.023, wd=1.2, mu=mu, beta2=0.9, lr_mult=lr_mult,
                                             factor=f), f)
                      for (M, f), gM, st in zip(ref[n], g_public, states[n])]
        opt.muon.step(lr_mult=lr_mult, momentum=mu)
        masters = _masters(opt, model)
        for n, p in params:
            expected = from_public_layout(p.label, [M for M, _ in ref[n]], p)
            torch.testing.assert_close(masters[n].double(), expected, atol=2e-6, rtol=0,
                                       msg=lambda m: f"step {step} {n}: {m}")


def _as_labelled(p, values=None):
    """A detached fp32 copy of p (or of ``values``) carrying p's label and head count."""
    t = (p.detach() if values is None else values).float().clone()
    t.label = p.label
    t.num_heads = getattr(p, "num_heads", None)
    return t


def test_each_rule_changes_the_update():
    """Every switch does something: toggling one of them alone moves the result."""
    def final(**kw):
        model = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=1, num_heads=4, seed=2,
                          matrix_dtype=torch.bfloat16 if kw.get("bf16_weights", True) else torch.float32)
        opt = build_optimizers(model, r89_config(**kw))
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            for _, p in _muon_params(model):
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.muon.step(lr_mult=1.0, momentum=0.9)
        return {n: m for n, m in _masters(opt, model).items()}
    base = final()
    stored = final(axis="stored")
    assert (stored["attn.0"] - base["attn.0"]).abs().max() > 1e-4
    # the MLP statistic is per hidden unit under both rules: the axis switch leaves the MLP alone
    assert torch.equal(stored["fc.0"], base["fc.0"]) and torch.equal(stored["proj.0"], base["proj.0"])
    for kw, moved in [({"qk_head_pairs": False}, "attn.0"), ({"c_proj_lr_mul": 1.0}, "proj.0")]:
        other = final(**kw)
        assert (other[moved] - base[moved]).abs().max() > 1e-4, kw


def test_matrix_plan_axes_and_statistic_shapes():
    """record 89's axes in our layout: Q/K pair blocks (2*hd, d) per column (input feature), V/O
    per row (output feature), c_fc (stored (in, out)) and c_proj (out, in) per hidden unit."""
    d, H = 12, 6
    attn = labelled((d, 4 * d), "attn")
    attn.num_heads = H
    (qk, vo), = [matrix_plan(attn, "matrix", True)]
    assert (qk.offset, qk.count, qk.rows, qk.cols, qk.per_row) == (0, H, 2 * d // H, d, False)
    assert (vo.offset, vo.count, vo.rows, vo.cols, vo.per_row) == (2 * d * d, 2, d, d, True)
    assert qk.stat_size + vo.stat_size == H * d + 2 * d
    (whole,) = matrix_plan(attn, "stored", False)               # record 45: 4 matrices, per column
    assert (whole.count, whole.rows, whole.cols, whole.per_row) == (4, d, d, False)
    (sq,) = matrix_plan(attn, "matrix", False)                 # square: per output feature
    assert sq.per_row
    fc, proj = labelled((d, 4 * d), "mlp_fc"), labelled((d, 4 * d), "mlp_proj")
    for rule in ("stored", "matrix"):
        assert not matrix_plan(fc, rule)[0].per_row and not matrix_plan(proj, rule)[0].per_row
    # a square c_fc (stored (in, out)): its per-output-feature statistic is per stored column
    assert not matrix_plan(labelled((8, 8), "mlp_fc"), "matrix")[0].per_row
    assert matrix_plan(labelled((8, 8), "mlp_proj"), "matrix")[0].per_row
    # the optimizer's second-moment buffers have those sizes
    opt = NorMuon([attn], kernel="torch", axis="matrix", qk_head_pairs=True)
    assert opt.buckets[0].second_moment.shape == (1, H * d + 2 * d)


def test_head_pairs_need_an_even_head_count():
    attn = labelled((12, 48), "attn")
    attn.num_heads = 3
    with pytest.raises(ValueError, match="num_heads=3.*even head count"):
        NorMuon([attn], qk_head_pairs=True)
    del attn.num_heads
    with pytest.raises(ValueError, match="num_heads=None"):
        NorMuon([attn], qk_head_pairs=True)
    NorMuon([attn])   # without head pairs the head count does not matter
    cfg = Config()
    cfg.model.num_heads, cfg.model.head_dim = 3, 256
    cfg.optim.muon.qk_head_pairs = True
    with pytest.raises(ConfigError, match="optim.muon.qk_head_pairs.*even model.num_heads"):
        cfg.validate()
    with pytest.raises(ValueError, match="optim.muon.axis"):
        NorMuon([attn], axis="rows")


# ---- bf16 weights with the mantissa --------------------------------------------------------------

def test_split_and_join_are_exact_bit_halves():
    """split_master_ writes the high 16 bits (truncation) and the low 16 bits, as numpy's views of
    the same fp32 values say; join_master gives back the fp32 values bit for bit."""
    g = torch.Generator().manual_seed(0)
    master = torch.cat([torch.randn(1000, generator=g) * 10.0 ** torch.randint(-6, 6, (1000,), generator=g).float(),
                        torch.tensor([0.0, -0.0, 1.0, -1.0, 1 + 2 ** -8, -(1 + 2 ** -8), 3.4e38, -1e-40,
                                      float("inf"), -float("inf")])])
    p = torch.empty(master.shape, dtype=torch.bfloat16)
    mantissa = torch.empty(master.shape, dtype=torch.uint16)
    split_master_(master, p, mantissa)
    high, low = truncate_to_bf16_bits(master)
    assert np.array_equal(p.view(torch.uint16).numpy(), high)
    assert np.array_equal(mantissa.numpy(), low)
    assert torch.equal(join_master(p, mantissa).view(torch.int32), master.view(torch.int32))
    # truncation toward zero, not rounding: |p| <= |master|, and some would have rounded up
    finite = torch.isfinite(master)
    assert (p.float().abs()[finite] <= master.abs()[finite]).all()
    assert (master.bfloat16() != p).any()


def test_bf16_weights_track_the_fp32_run_exactly():
    """bf16 params + mantissa follow fp32 params bit for bit: the same optimizer on fp32 copies
    (momentum fp32 either way) gives fp32 params equal to the masters, and every bf16 param is its
    master truncated. Gradients are bf16-exact so both runs see the same ones."""
    bf = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=2, seed=4, matrix_dtype=torch.bfloat16)
    fp = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=2, seed=4)
    with torch.no_grad():   # fp32 copies of the bf16 starting values (gates are bf16 in both)
        for (_, a), (_, b) in zip(_muon_params(bf), _muon_params(fp)):
            b.copy_(a.float())
    for (_, a), (_, b) in zip(_muon_params(bf), _muon_params(fp)):
        if a.label in ("attn_gate", "smear_gate"):   # gates: bf16 in the fake model; fp32 here too
            b.data = b.data.float()
    opt_bf = build_optimizers(bf, r89_config())
    opt_fp = build_optimizers(fp, r89_config(bf16_weights=False))
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        for (_, a), (_, b) in zip(_muon_params(bf), _muon_params(fp)):
            g = torch.randn(a.shape, generator=gen).bfloat16()
            a.grad, b.grad = g.clone(), g.float()
        opt_bf.muon.step(lr_mult=1.0 - 0.2 * step, momentum=0.9)
        opt_fp.muon.step(lr_mult=1.0 - 0.2 * step, momentum=0.9)
        masters = _masters(opt_bf, bf)
        for (n, a), (_, b) in zip(_muon_params(bf), _muon_params(fp)):
            assert torch.equal(masters[n], b.detach()), (step, n)
            high, _ = truncate_to_bf16_bits(masters[n])
            assert np.array_equal(a.detach().view(torch.uint16).numpy(), high), (step, n)
    for b in opt_bf.muon.buckets:
        assert b.momentum.dtype == b.second_moment.dtype == torch.float32 and b.mantissa.dtype == torch.uint16
    assert any(b.mantissa.any() for b in opt_bf.muon.buckets)


def test_bf16_weights_refuse_fp32_params():
    with pytest.raises(ValueError, match="bf16_weights: the block matrix attn .* torch.float32.*bfloat16"):
        build_optimizers(FakeModel(), r89_config())


def test_mantissa_checkpoint_round_trip_and_reset():
    """The mantissa is part of the state: a fresh optimizer loading it continues bit for bit; a
    state saved with other switches is refused naming them; reset zeroes the mantissa."""
    def make():
        model = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=1, seed=6, matrix_dtype=torch.bfloat16)
        return model, build_optimizers(model, r89_config())
    a, opt_a = make()
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen).bfloat16() for _, p in _muon_params(a)] for _ in range(4)]

    def step(model, opt, gs):
        for (_, p), g in zip(_muon_params(model), gs):
            p.grad = g.clone()
        opt.muon.step(lr_mult=0.8, momentum=0.9)
    for gs in grads[:2]:
        step(a, opt_a, gs)
    saved_params = {n: p.detach().clone() for n, p in a.named_parameters()}
    saved_state = opt_a.state_dict()
    assert all("mantissa" in b for b in saved_state["muon"]["buckets"])
    for gs in grads[2:]:
        step(a, opt_a, gs)

    b, opt_b = make()
    with torch.no_grad():
        for n, p in b.named_parameters():
            p.copy_(saved_params[n])
    opt_b.load_state_dict(saved_state)
    for gs in grads[2:]:
        step(b, opt_b, gs)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert all(torch.equal(x.mantissa, y.mantissa) for x, y in zip(opt_a.muon.buckets, opt_b.muon.buckets))

    model = FakeModel(d=8, n_attn=2, n_mlp=2, n_gates=1, seed=6, matrix_dtype=torch.bfloat16)
    for switch in ({"axis": "stored"}, {"qk_head_pairs": False}):   # (the first has the same shapes)
        other = build_optimizers(model, r89_config(**switch))
        with pytest.raises(ValueError, match=f"saved with optim.muon .*'{next(iter(switch))}'"):
            other.load_state_dict(saved_state)
    old_format = dict(saved_state["muon"])
    del old_format["switches"]   # a state from before the switches: record 45's
    with pytest.raises(ValueError, match="'axis': 'stored', 'qk_head_pairs': False, 'bf16_weights': False"):
        opt_a.muon.load_state_dict(old_format)
    opt_a.reset()
    assert all(not x.mantissa.any() and not x.momentum.any() for x in opt_a.muon.buckets)


# ---- lr rule, model storage, sharding ------------------------------------------------------------

def test_mlp_lr_rule_from_config():
    """c_fc_lr_mul / c_proj_lr_mul reach the groups; on a first plain step (momentum 0, no
    normalization, no decay) each param moves by exactly lr * lr_mul * PolarExpress(g)."""
    model = FakeModel(d=8, n_attn=1, n_mlp=1, n_gates=1)
    cfg = r89_config(bf16_weights=False, normalize=False, weight_decay=0.0)
    opt = build_optimizers(model, cfg)
    lr_mul = {g["params"][0].label: g["lr_mul"] for g in opt.muon.param_groups}
    assert lr_mul == {"attn": 1.0, "mlp_fc": 2.0, "mlp_proj": 4.0, "smear_gate": 1.0, "attn_gate": 1.0}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _, p in _muon_params(model):
        p.grad = torch.randn(p.shape).to(p.dtype)
    opt.muon.step(lr_mult=1.0, momentum=0.0)
    for name, mul in (("fc.0", 2.0), ("proj.0", 4.0)):
        p = dict(model.named_parameters())[name]
        expected = before[name] - 0.023 * mul * polar_express_reference(p.grad).float()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_model_creates_bf16_matrices_from_fp32_init():
    """GPT(matrix_dtype=bf16): the block matrices are the fp32 init rounded once; everything else
    as the fp32 model; attention weights carry num_heads for the head-pair cut."""
    from test_model_gpt import small_cfg

    from speedrun.model import GPT
    from speedrun.model.gpt import MATRIX_LABELS
    torch.manual_seed(0)
    ref = GPT(small_cfg(), torch.float32)
    torch.manual_seed(0)
    bf = GPT(small_cfg(), torch.float32, matrix_dtype=torch.bfloat16)
    for (n, p), (_, q) in zip(ref.named_parameters(), bf.named_parameters()):
        if p.label in MATRIX_LABELS:
            assert q.dtype == torch.bfloat16 and torch.equal(q, p.bfloat16()), n
        else:
            assert q.dtype == p.dtype and torch.equal(q, p), n
    assert all(b.attn.qkvo.num_heads == small_cfg().num_heads for b in bf.blocks if b.attn is not None)
    opt = build_optimizers(bf, r89_config())
    for b in opt.muon.buckets:   # fp32 gates of an fp32-activation model need no mantissa
        assert (b.mantissa is not None) == (b.params[0].dtype == torch.bfloat16)
        assert b.momentum.dtype == torch.float32
    assert sum(b.mantissa is not None for b in opt.muon.buckets) >= 1


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_shard_layout_with_record89_switches(world_size):
    """The record's 10 attention + 22 MLP matrices with head pairs: attention and MLP now have
    different statistic sizes (separate buckets); every slot owned by exactly one rank; state
    buffers sized to the owned slots."""
    shapes = [((48, 192), "attn")] * 10 + [((48, 192), "mlp_fc")] * 11 + [((48, 192), "mlp_proj")] * 11
    params = []
    for s, lbl in shapes:
        p = labelled(s, lbl, torch.bfloat16)
        p.num_heads = 6
        params.append(p)
    owned = {}
    for rank in range(world_size):
        opt = NorMuon(params, world=World(rank=rank, world_size=world_size), kernel="torch",
                      axis="matrix", qk_head_pairs=True, bf16_weights=True)
        assert [(len(b.params), b.second_moment.shape[1]) for b in opt.buckets] == [(10, 6 * 48 + 2 * 48), (22, 192)]
        for b in opt.buckets:
            assert b.chunk == -(-len(b.params) // world_size)
            assert b.momentum.shape[0] == b.mantissa.shape[0] == b.second_moment.shape[0] == b.real
            for i in range(b.start, b.start + b.real):
                owned.setdefault(id(b.params[i]), []).append(rank)
    assert sorted(len(v) for v in owned.values()) == [1] * 32


def test_shape_factor_is_one_for_our_layouts():
    """Our block matrices are stored wide, so the sqrt(max(1, rows/cols)) factor is 1 for them and
    record 89's MLP shape factor lives in c_fc_lr_mul / c_proj_lr_mul; the reference checks it
    from the public layout (to_public_layout): 2 for both MLP matrices, x2 more for c_proj."""
    fc, proj = labelled((8, 32), "mlp_fc"), labelled((8, 32), "mlp_proj")
    assert [f for _, f in to_public_layout(fc)] == [2.0] and [f for _, f in to_public_layout(proj)] == [4.0]
    assert math.sqrt(max(1.0, 8 / 32)) == 1.0


# ---- through the trainer ------------------------------------------------------------------------

@pytest.mark.slow
def test_trainer_with_record89_switches_resumes_exactly(tmp_path):
    """The trainer builds bf16 block matrices when bf16_weights is on, trains with every record-89
    NorMuon switch, and a resume from a checkpoint (mantissas in the optimizer state) continues
    with the same losses."""
    from safetensors.torch import load_file
    from test_train import micro_config, run_trainer, train_losses, write_synthetic_shards

    from speedrun.eval.loading import load_model
    shards = write_synthetic_shards(str(tmp_path / "shards"), num_tokens=20000)

    def cfg(run_dir):
        c = micro_config(*shards, run_dir, steps=6)
        c.model.num_heads, c.model.head_dim = 4, 16
        c.optim = r89_config()
        c.train.save_every, c.train.val_every = 3, 0
        return c.validate()
    full = tmp_path / "full"
    run_trainer(cfg(full))
    last = full / "checkpoints" / "step_000006"
    weights = load_file(str(last / "model.safetensors"))
    assert weights["blocks.0.attn.qkvo"].dtype == torch.bfloat16 and weights["blocks.0.mlp.c_fc"].dtype == torch.bfloat16
    loaded = load_model(str(last), device="cpu", dtype="float32").model   # eval: fp32 matrices, same values
    assert torch.equal(loaded.blocks[0].attn.qkvo, weights["blocks.0.attn.qkvo"].float())
    resumed = tmp_path / "resumed"
    run_trainer(cfg(resumed), resume=str(full / "checkpoints" / "step_000003"))
    a, _ = train_losses(full)
    b, _ = train_losses(resumed)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]   # the original's records up to the checkpoint, then its own
    for step in b:
        assert b[step] == a[step], step
