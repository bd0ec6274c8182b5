"""Tests for speedrun.kernels.fp8_mlp (model.fp8_mlp): the twin against float64 formulas written out
here (with their own round-to-nearest-even of e4m3 and bf16), the custom op's CPU path against the
twin, the delayed-scale bookkeeping over steps (bootstrap, delayed, saturation, micro-step slots),
state round trips (warm-up snapshot, checkpoint/resume, bit-exact), the model/trainer wiring; the
Triton kernels in the interpreter (subprocess) against the twin; on a GPU (marked gpu) the real op at
the record's sizes against the twin and the bf16 MLP, per-layer _scaled_mm scales (the CUDA 13
alignment regression), compiled blocks without recompiles, CUDA-graph replay.

GPU tests:  python -m pytest tests/test_kernels_fp8_mlp.py -m gpu -q
"""
from __future__ import annotations

import copy
import os
import textwrap

import numpy as np
import pytest
import torch
from kernel_helpers import run_interpreted, small_gpu_model
from test_train import micro_config, run_trainer, train_losses, write_synthetic_shards

from speedrun.config import Config, ConfigError, ModelConfig
from speedrun.kernels import fp8_mlp as M
from speedrun.kernels.relu2_mlp import relu2_mlp_reference
from speedrun.model.gpt import GPT

E4M3 = torch.float8_e4m3fn


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ------------------------------------------------------------------------------------------------
# Float64 oracle: binary float rounding written out from frexp (independent of torch's casts)
# ------------------------------------------------------------------------------------------------
def round_float(v, mantissa_bits: int, min_exponent: int, max_value: float) -> np.ndarray:
    """v rounded to the nearest value with `mantissa_bits` explicit mantissa bits, normal exponents down
    to min_exponent (subnormals below keep that exponent's spacing), ties to even, saturating at
    +-max_value."""
    v = np.asarray(v, dtype=np.float64)
    mag = np.abs(v)
    _, p = np.frexp(mag)                              # mag = f 2^p, f in [0.5, 1)
    exponent = np.maximum(p - 1, min_exponent)
    quantum = np.ldexp(1.0, exponent - mantissa_bits)
    r = np.minimum(np.round(mag / quantum) * quantum, max_value)   # np.round: half to even
    return np.sign(v) * r


def e4m3(v):
    return round_float(v, 3, -6, 448.0)


def bf16(v):
    return round_float(v, 7, -126, 3.0e38)


def oracle(x, w_fc, w_proj, act_scale, bf16_activations: bool):
    """The record's formulas in float64 (numpy): (out, post, amax(post))."""
    x, w_fc, w_proj = (t.double().numpy() for t in (x, w_fc, w_proj))
    a_x = max(np.abs(x).max(), 1e-12)
    x8 = e4m3(x * 448 / a_x)
    s_fc = max(np.abs(w_fc).max(), 1e-12) / 448
    w8 = e4m3(w_fc / s_fc)
    pre = (x8 @ w8) * (a_x / 448) * s_fc
    if bf16_activations:
        pre = bf16(pre)
    post = np.maximum(pre, 0) ** 2
    if bf16_activations:
        post = bf16(post)
    p8 = e4m3(np.minimum(post / act_scale, 448))
    s_proj = max(np.abs(w_proj).max(), 1e-12) / 448
    out = (p8 @ e4m3(w_proj / s_proj).T) * act_scale * s_proj
    return out, post, post.max()


def weights(d: int, H: int, seed: int, proj_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, H, generator=g) * d**-0.5, torch.randn(d, H, generator=g) * H**-0.5 * proj_scale


def fresh_state(w_fc, w_proj, micro_steps=1, **kw) -> M.FP8MLPState:
    state = M.FP8MLPState(w_fc.shape[0], w_fc.shape[1], micro_steps, **kw)
    state.reset(w_fc, w_proj)
    return state


def test_oracle_rounding_matches_the_formats():
    # the oracle's rounding against the formats' own value tables and a few hand-checked cases
    table = torch.arange(256, dtype=torch.uint8).view(E4M3).float().numpy()
    finite = np.unique(table[np.isfinite(table)])
    assert np.array_equal(e4m3(finite), finite)
    assert e4m3([1.0625, 1.1875, 2**-10, 3 * 2**-10, 125.43, 460.0, -1e6, 0.0]).tolist() == \
        [1.0, 1.25, 0.0, 2**-8, 128.0, 448.0, -448.0, 0.0]
    assert bf16([1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-7]).tolist() == [1.0, 1 + 2**-6, 1 + 2**-7]


def test_quantize_e4m3_rounds_to_nearest_even_and_saturates():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1 << 14, generator=g) * torch.exp(torch.randn(1 << 14, generator=g) * 3)
    v[:6] = torch.tensor([1.0625, 1.1875, 2**-10, 600.0, -1e9, 447.9])   # ties, tiny, out of range
    q = M.quantize_e4m3(v).float()
    assert not torch.isnan(q).any() and q.abs().max() == 448
    assert np.array_equal(q.numpy(), e4m3(v.numpy()))


# ------------------------------------------------------------------------------------------------
# The twin against the float64 formulas
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_twin_matches_float64_formulas(dtype):
    torch.manual_seed(0)
    T, d, H = 64, 48, 96
    w_fc, w_proj = weights(d, H, 1)
    x = torch.randn(T, d).to(dtype)
    state = fresh_state(w_fc, w_proj)
    state.act_scales.fill_(0.004)   # the delayed scale: some post values above 448 a saturate
    xx = x.clone().requires_grad_()
    ff, pp = w_fc.clone().requires_grad_(), w_proj.clone().requires_grad_()
    out = M.fp8_relu2_mlp(xx, ff, pp, state, kernel="torch")
    # the fp8 weight copies are quantised from the fp32 master weights (not from their bf16 casts)
    want, post, amax = oracle(x, w_fc, w_proj, 0.004, dtype == torch.bfloat16)
    assert out.dtype == dtype
    assert (post / 0.004 > 448).mean() > 0.01   # saturation is exercised
    # fp32 accumulation / fp32 scaling vs float64: an occasional e4m3 or bf16 neighbour, no more
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    assert rel(out, torch.from_numpy(want)) < tol
    # the recorded delayed scale: max(post) * 1.80 / 448 in this (the only) slot
    assert state.act_scales.item() == pytest.approx(amax * 1.80 / 448, rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
    # backward: the bf16 MLP's formulas from post
    g = torch.randn(T, d).to(dtype)
    gx, gf, gp = torch.autograd.grad(out, (xx, ff, pp), g)
    assert gx.dtype == dtype and gf.dtype == gp.dtype == torch.float32
    g64, x64 = g.double().numpy(), x.double().numpy()
    w_fc64, w_proj64 = w_fc.to(dtype).double().numpy(), w_proj.to(dtype).double().numpy()
    dpre = 2 * (g64 @ w_proj64) * np.sqrt(post)
    want_grads = (dpre @ w_fc64.T, x64.T @ dpre, g64.T @ post)
    for got, w in zip((gx, gf, gp), want_grads):
        assert rel(got, torch.from_numpy(w)) < tol


def test_twin_weight_copies_and_activation_quantisation_match_the_formulas():
    w_fc, w_proj = weights(40, 72, 2)
    state = fresh_state(w_fc, w_proj)
    s_fc = np.abs(w_fc.double().numpy()).max() / 448
    s_proj = np.abs(w_proj.double().numpy()).max() / 448
    assert state.w_fc_f8.shape == (72, 40) and state.w_proj_f8.shape == (40, 72)   # W_fc's copy is K-major
    assert state.w_fc_scale.item() == pytest.approx(s_fc, rel=1e-7)
    assert state.w_proj_scale.item() == pytest.approx(s_proj, rel=1e-7)
    assert state.w_proj_next_scale.item() == pytest.approx(s_proj * 1.12, rel=1e-6)
    assert np.array_equal(state.w_fc_f8.float().numpy(), e4m3(w_fc.double().numpy() / state.w_fc_scale.item()).T)
    assert np.array_equal(state.w_proj_f8.float().numpy(), e4m3(w_proj.double().numpy() / state.w_proj_scale.item()))
    x = torch.randn(33, 40).bfloat16()
    x8, s_x = M.quantize_activation(x)
    a_x = x.abs().max().item()
    assert s_x.item() == pytest.approx(a_x / 448, rel=1e-7)
    match = x8.float().numpy() == e4m3(x.double().numpy() * 448 / a_x)
    assert match.mean() > 0.999 and x8.float().abs().max() == 448


def test_twin_is_close_to_the_bf16_mlp():
    """The FP8 error at a realistic size: what the GPU test's thresholds against the bf16 MLP rest on."""
    torch.manual_seed(3)
    T, d, H = 512, 256, 1024
    w_fc = (torch.rand(d, H) * 2 - 1) * 3**0.5 * 0.5 * d**-0.5       # the record's c_fc init
    w_proj = (torch.rand(d, H) * 2 - 1) * 3**0.5 * 0.5 * H**-0.5
    x = torch.nn.functional.rms_norm(torch.randn(T, d), (d,)).bfloat16()
    state = fresh_state(w_fc, w_proj)
    M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="torch")        # a first forward sets the delayed scale
    results = []
    for fn in (lambda *a: M.fp8_relu2_mlp(*a, state, kernel="torch"), relu2_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        out = fn(*leaves)
        g = torch.Generator().manual_seed(5)
        results.append((out, *torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g).bfloat16())))
    errors = [rel(a, b) for a, b in zip(*results)]
    # measured 0.057 (out: e4m3 rounding of x, W_fc, post, W_proj; post = pre² doubles pre's error),
    # 0.037 (d x, d W_fc), 0.043 (d W_proj); the same at 1024 x 768 x 3072
    assert errors[0] < 0.07 and max(errors[1:]) < 0.05, errors


# ------------------------------------------------------------------------------------------------
# The custom op (CPU path: emulated matmuls) against the twin; registration; compile
# ------------------------------------------------------------------------------------------------
def op_forward(x, w_fc, w_proj, state):
    """The dispatcher's op path, with the op running on the CPU (emulated scaled matmuls)."""
    x_f8, x_scale = M.quantize_activation(x.detach())
    out, _, amax = torch.ops.speedrun.fp8_relu2_mlp(
        x, w_fc, w_proj, x_f8, x_scale, state.w_fc_f8, state.w_fc_scale, state.w_proj_f8, state.w_proj_scale,
        state.act_scales, state.slot)
    state.record_post_amax(amax)
    return out


def test_op_cpu_path_matches_twin():
    w_fc, w_proj = weights(48, 80, 3)
    results, states = [], []
    for path in ("op", "twin"):
        state = fresh_state(w_fc, w_proj, micro_steps=2)
        torch.manual_seed(4)
        per_call = []
        for i in range(3):   # three forwards: slots 0, 1, 0 again (with the scale recorded by the first)
            x = torch.randn(37, 48).bfloat16().requires_grad_()
            ff, pp = w_fc.bfloat16().requires_grad_(), w_proj.bfloat16().requires_grad_()
            out = op_forward(x, ff, pp, state) if path == "op" else M.fp8_relu2_mlp(x, ff, pp, state, kernel="torch")
            per_call.append((out, *torch.autograd.grad(out.float().square().sum(), (x, ff, pp))))
        results.append(per_call)
        states.append(state)
    for got, want in zip(*results):
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert torch.equal(states[0].act_scales, states[1].act_scales) and torch.equal(states[0].slot, states[1].slot)


def test_op_registration():
    w_fc, w_proj = weights(32, 64, 4)
    state = fresh_state(w_fc, w_proj)
    x = torch.randn(21, 32).bfloat16().requires_grad_()
    x_f8, x_scale = M.quantize_activation(x.detach())
    args = (x, w_fc.bfloat16().requires_grad_(), w_proj.bfloat16().requires_grad_(), x_f8, x_scale,
            state.w_fc_f8, state.w_fc_scale, state.w_proj_f8, state.w_proj_scale, state.act_scales, state.slot)
    # (opcheck's test_schema compares values with ops that have no fp8 kernel: checked by hand below)
    torch.library.opcheck(torch.ops.speedrun.fp8_relu2_mlp.default, args,
                          test_utils=("test_autograd_registration", "test_faketensor"))
    before = [a.detach().view(torch.uint8).clone() if a.dtype == E4M3 else a.detach().clone() for a in args]
    torch.ops.speedrun.fp8_relu2_mlp(*args)
    after = [a.detach().view(torch.uint8) if a.dtype == E4M3 else a.detach() for a in args]
    assert all(torch.equal(x, y) for x, y in zip(before, after))   # declared functional: mutates nothing


def test_traces_under_torch_compile_fullgraph_with_state_updates():
    """The op and the twin (autograd.Function) both trace without graph breaks; the state updates
    (activation scale of the slot, next slot) happen inside the compiled graph as in eager."""
    w_fc, w_proj = weights(32, 64, 5)
    x = torch.randn(3, 7, 32).bfloat16()

    def twin(xx, ff, pp, st):
        return M.fp8_relu2_mlp(xx * 1.5, ff, pp, st, kernel="torch").float().square().sum()

    def op(xx, ff, pp, st):
        return op_forward((xx * 1.5).reshape(-1, 32), ff.bfloat16(), pp.bfloat16(), st).float().square().sum()

    for fn in (twin, op):
        torch._dynamo.reset()
        runs = []
        for compiled in (False, True):
            state = fresh_state(w_fc, w_proj, micro_steps=2)
            f = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn
            leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
            losses = [f(*leaves, state) for _ in range(3)]
            grads = torch.autograd.grad(sum(losses), leaves)
            runs.append((losses, grads, state.act_scales.clone(), state.slot.clone()))
        (l0, g0, a0, s0), (l1, g1, a1, s1) = runs
        assert all(torch.equal(a, b) for a, b in zip(l0, l1)) and all(torch.equal(a, b) for a, b in zip(g0, g1))
        assert torch.equal(a0, a1) and s0.item() == s1.item() == 1
    torch._dynamo.reset()


def test_dispatch_and_errors_on_cpu():
    w_fc, w_proj = weights(16, 32, 6)
    state = fresh_state(w_fc, w_proj)
    x = torch.randn(2, 5, 16)
    out = M.fp8_relu2_mlp(x, w_fc, w_proj, state)      # auto on the CPU: the twin
    assert out.shape == (2, 5, 16)
    with pytest.raises(ValueError, match="kernel must be one of"):
        M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="cuda")
    with pytest.raises(ValueError, match="expected x"):
        M.fp8_relu2_mlp(x, w_fc[:, :16], w_proj[:, :16], state)
    with pytest.raises(ValueError, match="mode must be one of"):
        state.refresh(w_fc, w_proj, "bootstrap")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kernel='triton' needs") as err:
            M.fp8_relu2_mlp(x.bfloat16(), w_fc, w_proj, state, kernel="triton")
        assert "\n" not in str(err.value)
    state.bfloat16()   # a module-wide dtype cast converts the fp8 buffers: refused with the reason
    with pytest.raises(ValueError, match="changed dtype"):
        M.fp8_relu2_mlp(x, w_fc, w_proj, state)


# ------------------------------------------------------------------------------------------------
# Delayed-scale bookkeeping
# ------------------------------------------------------------------------------------------------
def test_weight_scales_exact_for_the_first_steps_then_delayed():
    """after_optimizer_step(step): exact W_proj scales while step < exact_steps, then the previous
    refresh's amax x 1.12 / 448; W_fc always its current amax / 448."""
    w_fc, w_proj = weights(32, 64, 7)
    w_proj = w_proj * 0   # the record's zero init: scale 1e-12 / 448
    state = fresh_state(w_fc, w_proj, exact_steps=3)
    assert state.w_proj_scale.item() == pytest.approx(1e-12 / 448)
    amaxes = [1e-12]
    g = torch.Generator().manual_seed(8)
    for step in range(7):
        w_proj = w_proj + torch.randn(w_proj.shape, generator=g) * 0.01 * (step + 1)   # c_proj grows
        w_fc = w_fc * 1.01
        state.after_optimizer_step(w_fc, w_proj, step)
        amax = w_proj.abs().max().item()
        want = amax / 448 if step < 3 else amaxes[-1] * 1.12 / 448
        assert state.w_proj_scale.item() == pytest.approx(want, rel=1e-6), step
        assert state.w_proj_next_scale.item() == pytest.approx(amax * 1.12 / 448, rel=1e-6)
        assert state.w_fc_scale.item() == pytest.approx(w_fc.abs().max().item() / 448, rel=1e-6)
        assert np.array_equal(state.w_proj_f8.float().numpy(),
                              e4m3(w_proj.double().numpy() / state.w_proj_scale.item()))
        if step >= 3 and amax > 1.12 * amaxes[-1]:   # grew past the headroom: the largest weights saturate
            assert state.w_proj_f8.float().abs().max() == 448
        amaxes.append(amax)
    assert any(b > 1.12 * a for a, b in zip(amaxes[3:], amaxes[4:])), "saturation was not exercised"


def test_activation_scales_per_micro_step_slot():
    """Slot j's scale is set by the forward in slot j and used by the next step's forward in slot j;
    the refresh after the optimizer step starts the slots again; a forward whose post exceeds the
    delayed scale saturates at 448."""
    w_fc, w_proj = weights(32, 64, 9)
    state = fresh_state(w_fc, w_proj, micro_steps=2)
    g = torch.Generator().manual_seed(10)
    xs = [torch.randn(16, 32, generator=g) for _ in range(2)]
    xs[1] = xs[1] * 0.2                     # slot 1 sees much smaller activations than slot 0
    recorded = []
    for x in xs:                            # step 0: both slots start at 1.0
        assert state.act_scales[state.slot].item() == 1.0
        _, post, amax = oracle(x, w_fc, w_proj, 1.0, False)
        M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="torch")
        recorded.append(amax * 1.80 / 448)
    assert state.act_scales.tolist() == pytest.approx(recorded, rel=1e-5) and state.slot.item() == 0
    M.fp8_relu2_mlp(xs[0], w_fc, w_proj, state, kernel="torch")   # a third forward: slot 0 again
    assert state.slot.item() == 1
    state.act_scales[0] = recorded[0]
    state.after_optimizer_step(w_fc, w_proj, 0)                   # the next step starts at slot 0
    assert state.slot.item() == 0
    # step 1: slot 1 gets the larger activations of slot 0 -> above its delayed scale -> saturation
    for j, x in enumerate((xs[0], xs[0])):
        a = recorded[j]
        out = M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="torch")
        want, post, _ = oracle(x, w_fc, w_proj, a, False)
        assert rel(out, torch.from_numpy(want)) < 1e-3, j
        saturated = (post / a > 448).mean()
        assert (saturated > 0.01) == (j == 1), (j, saturated)


def test_one_rank_with_slots_follows_two_ranks():
    """One rank x 2 micro-steps (two slots) computes what two ranks x 1 micro-step compute, step after
    step, bit for bit; one scale per rank updated by every forward (the record's) does not."""
    w_fc, w_proj = weights(32, 64, 12)
    g = torch.Generator().manual_seed(13)
    one = fresh_state(w_fc, w_proj, micro_steps=2)
    ranks = [fresh_state(w_fc, w_proj) for _ in range(2)]
    per_forward = fresh_state(w_fc, w_proj)
    for step in range(3):
        # micro-batch 1 has 5x smaller activations than micro-batch 0 (25x smaller post)
        batches = [torch.randn(16, 32, generator=g) * s for s in (1.0, 0.2)]
        outs = {"one": [M.fp8_relu2_mlp(x, w_fc, w_proj, one, kernel="torch") for x in batches],
                "ranks": [M.fp8_relu2_mlp(x, w_fc, w_proj, r, kernel="torch") for x, r in zip(batches, ranks)],
                "per_forward": [M.fp8_relu2_mlp(x, w_fc, w_proj, per_forward, kernel="torch") for x in batches]}
        for state in (one, *ranks, per_forward):
            state.after_optimizer_step(w_fc, w_proj, step)
        assert all(torch.equal(a, b) for a, b in zip(outs["one"], outs["ranks"])), step
        if step > 0:   # micro-batch 0 quantised with micro-batch 1's scale: saturates
            assert rel(outs["per_forward"][0], outs["ranks"][0]) > 0.1, step
    assert one.act_scales.tolist() == [r.act_scales.item() for r in ranks]


def test_refresh_modes_keep_and_slot_reset():
    w_fc, w_proj = weights(32, 64, 11)
    state = fresh_state(w_fc, w_proj, micro_steps=3)
    state.slot.fill_(2)
    before = {k: v.clone() for k, v in state.state_dict().items()}
    state.refresh(w_fc * 2, w_proj * 2, "keep")    # re-quantise with the stored W_proj scale only
    after = state.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)   # slot and scales untouched
    assert state.w_fc_scale.item() == pytest.approx(2 * w_fc.abs().max().item() / 448, rel=1e-6)
    assert state.w_proj_f8.float().abs().max() == 448  # W_proj doubled past its kept scale: saturates
    state.refresh(w_fc, w_proj, "delayed")
    assert state.slot.item() == 0


# ------------------------------------------------------------------------------------------------
# The model: switch, state in state_dict, snapshots and checkpoints
# ------------------------------------------------------------------------------------------------
def small_kw(**extra):
    return dict(num_layers=2, no_attention_layers=[], long_window_layers=[1], value_embed_layers=[0, -1],
                skip_from_layer=0, skip_to_layer=1, backout_layer=1, model_dim=64, num_heads=1, head_dim=64,
                vocab_size=128, attention_backend="sdpa", **extra)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.label in ("mlp_proj", "lm_head", "attn_gate", "smear_gate"):
                p.normal_(0, 0.05)
    for block in model.blocks:
        block.mlp.reset_fp8()
    return model


def fp8_state(model) -> dict:
    """Every FP8 buffer of the model, the non-persistent weight copies included (as raw bytes)."""
    return {n: (b.view(torch.uint8) if b.dtype == E4M3 else b).clone()
            for n, b in model.named_buffers() if ".fp8." in n}


def test_switch_off_is_todays_model_and_eval_is_bf16():
    record = Config.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "record_124m.json"))
    assert ModelConfig().fp8_mlp is False and record.model.fp8_mlp is False
    torch.manual_seed(0)
    off, on = GPT(ModelConfig(**small_kw())), GPT(ModelConfig(**small_kw(fp8_mlp=True)), micro_steps=4)
    assert all(b.mlp.fp8 is None for b in off.blocks) and not fp8_state(off)
    assert all(b.mlp.fp8.micro_steps == 4 for b in on.blocks)
    params = {n: tuple(p.shape) for n, p in off.named_parameters()}
    assert params == {n: tuple(p.shape) for n, p in on.named_parameters()}   # same weights either way
    assert set(on.state_dict()) - set(off.state_dict()) == {
        f"blocks.{i}.mlp.fp8.{k}" for i in range(2) for k in ("w_proj_scale", "w_proj_next_scale", "act_scales", "slot")}
    randomize(off)
    on.load_state_dict(off.state_dict(), strict=False)
    for block in on.blocks:
        block.mlp.reset_fp8()
    x = torch.randn(9, 64).bfloat16()
    on.eval()
    off.eval()
    assert torch.equal(on.blocks[0].mlp(x), off.blocks[0].mlp(x))          # eval: the bf16 MLP, exactly
    on.train()
    assert not torch.equal(on.blocks[0].mlp(x), off.blocks[0].mlp(x))      # training: FP8
    ids = torch.randint(0, 128, (64,))
    assert torch.equal(on.eval()(ids, ids, reduction="mean"), off.eval()(ids, ids, reduction="mean"))


def test_config_checks():
    with pytest.raises(ConfigError, match="model.fp8_mlp.*relu_squared"):
        Config.from_dict({"model": {"fp8_mlp": True, "relu_squared": False}}).validate()
    with pytest.raises(ConfigError, match="model.fp8_mlp_act_headroom"):
        Config.from_dict({"model": {"fp8_mlp": True, "fp8_mlp_act_headroom": 0.5}}).validate()
    with pytest.raises(ConfigError, match="model.fp8_mlp_exact_steps"):
        Config.from_dict({"model": {"fp8_mlp": True, "fp8_mlp_exact_steps": -1}}).validate()


def test_model_snapshot_restores_the_state_bit_exactly():
    """What the trainer's warm-up does: snapshot state_dict, train (forwards + refreshes), load the
    snapshot: every FP8 buffer (the re-quantised weight copies too) is as before."""
    torch.manual_seed(1)
    model = randomize(GPT(ModelConfig(**small_kw(fp8_mlp=True)), micro_steps=2))
    before = fp8_state(model)
    snapshot = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 128, (64,))
    for step in range(3):
        for _ in range(2):
            model(ids, ids).backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step(step)
    changed = fp8_state(model)
    assert not all(torch.equal(before[k], changed[k]) for k in before)
    model.load_state_dict(snapshot)
    after = fp8_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(str(tmp_path_factory.mktemp("fp8_shards")))


def fp8_micro_config(shards, run_dir, steps=8):
    cfg = micro_config(*shards, run_dir, steps=steps)
    cfg.model.fp8_mlp, cfg.model.fp8_mlp_exact_steps = True, 2    # delayed scales from step 3 on
    return cfg


@pytest.mark.slow
def test_trainer_resume_is_bit_exact(shards, tmp_path):
    """A CPU run (the twin) with checkpoints; resumed from step 3, the FP8 state at the end and every
    loss are those of the uninterrupted run; the buffers travel in buffers_rank0.pt."""
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    cfg = fp8_micro_config(shards, full_dir)
    cfg.train.save_every = 3
    run_trainer(cfg)
    ckpt = full_dir / "checkpoints" / "step_000003"
    saved = torch.load(ckpt / "buffers_rank0.pt", weights_only=True)
    assert saved["blocks.0.mlp.fp8.act_scales"].shape == (2,) and (saved["blocks.0.mlp.fp8.act_scales"] != 1).all()
    run_trainer(fp8_micro_config(shards, resumed_dir), resume=str(ckpt))
    full_train, full_val = train_losses(full_dir)
    resumed_train, resumed_val = train_losses(resumed_dir)
    # the resumed run's metrics carry the original's records up to the checkpoint, then its own
    assert sorted(resumed_train) == list(range(1, 9))
    assert all(resumed_train[s] == full_train[s] for s in resumed_train) and resumed_val[8] == full_val[8]
    a = torch.load(full_dir / "checkpoints" / "step_000008" / "buffers_rank0.pt", weights_only=True)
    b = torch.load(resumed_dir / "checkpoints" / "step_000008" / "buffers_rank0.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_warmup_restores_the_state_and_steps_never_recompile(shards, tmp_path, monkeypatch):
    """The trainer's warm-up (eager dynamo backend: tracing and guards, no codegen) leaves the FP8
    state as built; later steps (exact refreshes, then delayed ones) and validation compile nothing new."""
    from torch._dynamo.utils import counters

    from speedrun.distributed import init_world
    from speedrun.train.trainer import Trainer
    original = GPT.compile_regions
    monkeypatch.setattr(GPT, "compile_regions", lambda self, **kw: original(self, backend="eager", **kw))
    torch._dynamo.reset()
    cfg = fp8_micro_config(shards, tmp_path)
    cfg.train.compile = True
    trainer = Trainer(cfg, init_world("cpu"), str(tmp_path))
    built = fp8_state(trainer.model)
    trainer.warmup()
    restored = fp8_state(trainer.model)
    assert all(torch.equal(built[k], restored[k]) for k in built)
    graphs = counters["stats"]["unique_graphs"]
    for step in range(5):   # exact refreshes after steps 0, 1; delayed from step 2
        trainer.apply_window(step)
        trainer.train_step(step, trainer.loader.next_step())
    trainer.validate()
    trainer.loader.close()
    assert counters["stats"]["unique_graphs"] == graphs
    assert any(not torch.equal(built[k], v) for k, v in fp8_state(trainer.model).items())
    torch._dynamo.reset()


def test_scales_live_in_their_own_aligned_allocations():
    """cuBLASLt under CUDA 13 needs 16-byte-aligned scale pointers: every layer's scales are separate
    allocations (the record's (1,)-views into one 12-float buffer are not), and a misaligned view is
    copied before _scaled_mm."""
    model = GPT(ModelConfig(fp8_mlp=True, num_layers=11, model_dim=128, num_heads=1, head_dim=128, vocab_size=128))
    pointers = set()
    for block in model.blocks:
        for t in (block.mlp.fp8.w_proj_scale, block.mlp.fp8.w_fc_scale):
            assert t.data_ptr() % 16 == 0
            pointers.add(t.data_ptr())
    assert len(pointers) == 22
    buffer = torch.arange(12, dtype=torch.float32)
    view = buffer[1:2]
    assert view.data_ptr() % 16 == 4
    fixed = M._aligned(view)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, view)
    assert M._aligned(buffer[4:5]).data_ptr() == buffer[4:5].data_ptr()    # already aligned: no copy


@pytest.mark.slow
def test_two_processes_follow_the_one_process_trajectory_with_fp8(shards, tmp_path):
    """The FP8 MLP under 2 gloo processes (one micro-step each, each rank its own slot) against 1 process
    with 2 micro-steps (two slots): the losses agree as without FP8. (On this small model the
    activation scales barely move the losses: test_one_rank_with_slots_follows_two_ranks is the sharp
    check of the slot rule.)"""
    import subprocess
    import sys

    from test_train import _cli_env
    runs = {}
    for name, extra in (("one", []), ("two", ["--num-gpus", "2"])):
        cfg = fp8_micro_config(shards, tmp_path / name)
        config_file = str(tmp_path / f"{name}.json")
        cfg.save(config_file)
        proc = subprocess.run([sys.executable, "-m", "speedrun", "train", "--config", config_file, "--cpu", *extra],
                              env=_cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = train_losses(tmp_path / name)
    (one_train, one_val), (two_train, two_val) = runs["one"], runs["two"]
    assert sorted(two_train) == sorted(one_train)
    for step in one_train:
        assert two_train[step] == pytest.approx(one_train[step], rel=2e-4, abs=2e-4), step
    assert two_val[8] == pytest.approx(one_val[8], rel=2e-4)


# ------------------------------------------------------------------------------------------------
# The Triton kernels in the interpreter (subprocess, small shapes with ragged edges)
# ------------------------------------------------------------------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    from speedrun.kernels import fp8_mlp as M

    def raw(t):
        return t.view(torch.uint8) if t.dtype == M.E4M3 else t

    def weights(d, H, seed, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(d, H, generator=g) * d**-0.5).to(dtype), (torch.randn(d, H, generator=g) * H**-0.5).to(dtype)

    out = {}
    # --- the refresh kernels vs the twin, bit for bit: three modes in sequence, ragged 16 x 16 tiles
    for name, (d, H, dtype) in {"fp32": (40, 50, torch.float32), "bf16": (48, 80, torch.bfloat16)}.items():
        states = {k: M.FP8MLPState(d, H, 2) for k in ("triton", "torch")}
        w_fc, w_proj = weights(d, H, 1, dtype)
        equal = []
        for i, mode in enumerate(("exact", "exact", "delayed", "delayed", "keep")):
            w_fc, w_proj = w_fc * 1.05, w_proj * (1.0 + 0.1 * i)   # grows past the 1.12 headroom at i = 3
            for k, s in states.items():
                s.slot.fill_(1)
                s.refresh(w_fc, w_proj, mode, kernel=k)
            a, b = (dict(s.named_buffers()) for s in states.values())
            equal.append(all(torch.equal(raw(a[n]), raw(b[n])) for n in a))
        out["refresh-" + name] = dict(equal=equal, saturated=states["triton"].w_proj_f8.float().abs().max().item())

    # --- the up-projection kernel vs the twin's maths, bit for bit
    cases = {  # (T, d, H, act scale): interpreter tiles 16 x 32 x 32, 3 persistent programs; T = 37 and
        # d = 48 leave partial row and K tiles, H = 80 a partial column tile; H = 48 gives 32-column tiles
        "ragged": (37, 48, 80, 0.05),
        "narrow": (21, 48, 48, 0.05),
        "saturating": (37, 48, 80, 0.0005),
    }
    for i, (name, (T, d, H, a)) in enumerate(cases.items()):
        g = torch.Generator().manual_seed(10 + i)
        w_fc, w_proj = weights(d, H, 20 + i)
        state = M.FP8MLPState(d, H, 3)
        state.reset(w_fc, w_proj)
        state.act_scales.copy_(torch.tensor([9.0, a, 7.0]))
        state.slot.fill_(1)
        x = torch.randn(T, d, generator=g).bfloat16()
        x_f8, x_scale = M.quantize_activation(x)
        post, post_f8, amax, act = M.fp8_up_projection(x_f8, x_scale, state.w_fc_f8, state.w_fc_scale,
                                                       state.act_scales, state.slot)
        want_post, want_f8 = M.up_projection_reference(x_f8, x_scale, state.w_fc_f8, state.w_fc_scale,
                                                       torch.tensor([a]), torch.bfloat16)
        out["up-" + name] = dict(
            post=torch.equal(post, want_post), post_f8=torch.equal(raw(post_f8), raw(want_f8)),
            amax=amax.item() == want_post.float().max().item(), act=torch.equal(act, torch.tensor([a])),
            saturated=(want_f8.float() == 448).float().mean().item(), zeros=(post == 0).float().mean().item())

    # --- the op through the dispatcher (Triton up kernel; emulated _scaled_mm) vs the twin
    d, H = 48, 80
    w_fc, w_proj = weights(d, H, 30)
    states = {k: M.FP8MLPState(d, H, 2) for k in ("triton", "torch")}
    results = {}
    for k, s in states.items():
        s.reset(w_fc, w_proj)
        g = torch.Generator().manual_seed(31)
        calls = []
        for _ in range(3):
            x = torch.randn(3, 13, d, generator=g).bfloat16().requires_grad_()
            ff, pp = w_fc.clone().requires_grad_(), w_proj.clone().requires_grad_()
            o = M.fp8_relu2_mlp(x, ff, pp, s, kernel=k)
            gg = torch.randn(o.shape, generator=g).bfloat16()
            calls.append((o, *torch.autograd.grad(o, (x, ff, pp), gg)))
        results[k] = calls
    out["op"] = dict(
        out_equal=[torch.equal(a[0], b[0]) for a, b in zip(results["triton"], results["torch"])],
        grad_rel=[[rel(x, y) for x, y in zip(a[1:], b[1:])] for a, b in zip(results["triton"], results["torch"])],
        dw_proj_equal=[torch.equal(a[3], b[3]) for a, b in zip(results["triton"], results["torch"])],
        dtypes=[str(t.dtype) for t in results["triton"][0]],
        state_equal=all(torch.equal(raw(a), raw(b)) for a, b in zip(states["triton"].buffers(), states["torch"].buffers())),
    )

    # --- compiled (aot_eager): the op is one opaque node forward; backward = the fused d pre op + 3 matmuls
    from torch._dynamo.backends.common import aot_autograd
    graphs = {}
    def capture(name):
        def compiler(gm, inputs):
            graphs[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return gm
        return compiler
    state = M.FP8MLPState(d, H, 1)
    state.reset(w_fc, w_proj)
    f = torch.compile(lambda x, ff, pp: M.fp8_relu2_mlp(x, ff, pp, state, kernel="triton"), fullgraph=True,
                      backend=aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw")))
    x = torch.randn(21, d).bfloat16().requires_grad_()
    f(x, w_fc.clone().requires_grad_(), w_proj.clone().requires_grad_()).float().sum().backward()
    out["graphs"] = graphs

    x = torch.randn(21, d).bfloat16().requires_grad_()
    x_f8, x_scale = M.quantize_activation(x.detach())
    args = (x, w_fc.bfloat16().requires_grad_(), w_proj.bfloat16().requires_grad_(), x_f8, x_scale, state.w_fc_f8,
            state.w_fc_scale, state.w_proj_f8, state.w_proj_scale, state.act_scales, state.slot)
    out["opcheck"] = torch.library.opcheck(torch.ops.speedrun.fp8_relu2_mlp.default, args,
        test_utils=("test_autograd_registration", "test_faketensor"))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def fp8_interpreter_results(tmp_path_factory):
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("fp8_interpreter_results"), threads=2)


@pytest.mark.parametrize("case", ["fp32", "bf16"])
def test_interpreter_refresh_kernels_equal_the_twin(fp8_interpreter_results, case):
    r = fp8_interpreter_results["refresh-" + case]
    assert r["equal"] == [True] * 5, r
    assert r["saturated"] == 448.0    # W_proj outgrew its delayed scale


@pytest.mark.parametrize("case", ["ragged", "narrow", "saturating"])
def test_interpreter_up_kernel_equals_the_twin(fp8_interpreter_results, case):
    r = fp8_interpreter_results["up-" + case]
    assert r["post"] and r["post_f8"] and r["amax"] and r["act"], r
    assert 0.3 < r["zeros"] < 0.7                       # relu cut about half
    assert (r["saturated"] > 0.05) == (case == "saturating"), r


def test_interpreter_op_matches_the_twin(fp8_interpreter_results):
    r = fp8_interpreter_results["op"]
    assert r["out_equal"] == [True] * 3 and r["dw_proj_equal"] == [True] * 3 and r["state_equal"], r
    # d x and d W_fc go through relu2_mlp's fused d pre kernel (the interpreter truncates to bf16)
    assert max(max(g) for g in r["grad_rel"]) < 2e-2, r
    assert r["dtypes"] == ["torch.bfloat16", "torch.bfloat16", "torch.float32", "torch.float32"]


def test_interpreter_compiled_graph_keeps_the_op_opaque(fp8_interpreter_results):
    fw, bw = fp8_interpreter_results["graphs"]["fw"], fp8_interpreter_results["graphs"]["bw"]
    assert fw.count("speedrun.fp8_relu2_mlp.default") == 1 and "aten.mm.default" not in fw, fw
    assert bw.count("speedrun.relu2_mlp_grad_pre.default") == 1 and bw.count("aten.mm.default") == 3, bw


def test_interpreter_opcheck(fp8_interpreter_results):
    result = fp8_interpreter_results["opcheck"]
    assert result and set(result.values()) == {"SUCCESS"}, result


# ------------------------------------------------------------------------------------------------
# Hopper code generation without a GPU: Triton compiles for sm_90a here (its bundled ptxas)
# ------------------------------------------------------------------------------------------------
def _compile_for_hopper(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int = 3):
    import shutil
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.isfile(ptxas):
        ptxas = shutil.which("ptxas")
    ptx = kernel.asm["ptx"]
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fp8_mlp_{fn.__name__}_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    os.remove(path)
    return kernel.metadata.shared, ptx, info


@pytest.mark.slow
def test_kernels_compile_for_hopper_without_spills():
    """The pinned up-projection config and the refresh kernels, compiled for the H100/H200 as the GPU
    machine would: TMA and wgmma are used, shared memory fits in 227 KB, and no register spills."""
    pytest.importorskip("triton")
    if M._interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    cfg = M.FORWARD_CONFIG
    f8, half = "fp8e4nv", cfg.block_n // 2
    signature = {"x_desc": f"tensordesc<{f8}[{cfg.block_m}, {cfg.block_k}]>",
                 "w_desc": f"tensordesc<{f8}[{cfg.block_n}, {cfg.block_k}]>",
                 "post_desc": f"tensordesc<bf16[{cfg.block_m}, {half}]>",
                 "post_f8_desc": f"tensordesc<{f8}[{cfg.block_m}, {half}]>",
                 **{name: "*fp32" for name in ("amax_ptr", "x_scale_ptr", "w_scale_ptr", "act_scales_ptr")},
                 "slot_ptr": "*i64", "act_out_ptr": "*fp32",
                 **{name: "i32" for name in ("M", "N", "num_programs", "tiles_per_program")},
                 **{name: "constexpr" for name in ("K", "BLOCK_M", "BLOCK_N", "BLOCK_K", "EXACT_ROUNDING")}}
    shared, ptx, info = _compile_for_hopper(
        M._fp8_up_kernel, signature, dict(K=768, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                          EXACT_ROUNDING=False), cfg.num_warps, cfg.num_stages)
    assert "wgmma" in ptx and "cp.async.bulk.tensor" in ptx, "no Hopper MMA / TMA in the up projection"
    assert shared <= 227 * 1024, shared
    assert "0 bytes spill stores" in info, info
    refresh = {name: "*fp32" for name in ("fc_ptr", "proj_ptr", "partial_ptr", "used_ptr", "next_ptr")}
    refresh.update({name: "i32" for name in ("D", "H", "stride_fc", "stride_proj")})
    _, _, info = _compile_for_hopper(M._weight_amax_kernel, {**refresh, "BLOCK": "constexpr", "DELAYED": "constexpr"},
                                     dict(BLOCK=M.REFRESH_BLOCK, DELAYED=True), 4)
    assert "0 bytes spill stores" in info, info
    quantize = {**refresh, "fc_f8_ptr": f"*{f8}", "proj_f8_ptr": f"*{f8}", "fc_scale_ptr": "*fp32", "slot_ptr": "*i64",
                "num_tiles": "i32", "next_factor": "fp32"}
    order = ["fc_ptr", "proj_ptr", "fc_f8_ptr", "proj_f8_ptr", "partial_ptr", "fc_scale_ptr", "used_ptr", "next_ptr",
             "slot_ptr", "D", "H", "stride_fc", "stride_proj", "num_tiles", "next_factor"]
    quantize = {name: quantize[name] for name in order}
    quantize.update({name: "constexpr" for name in ("PARTIALS", "BLOCK", "MODE", "EXACT_ROUNDING")})
    for mode in (0, 1, 2):
        _, _, info = _compile_for_hopper(M._weight_quantize_kernel, quantize,
                                         dict(PARTIALS=1024, BLOCK=M.REFRESH_BLOCK, MODE=mode, EXACT_ROUNDING=False), 4)
        assert "0 bytes spill stores" in info, (mode, info)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
def _need_fp8_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    if not M.fp8_supported("cuda", 0):
        pytest.skip("GPU without FP8 tensor cores")


def _record_inputs(T: int, d: int = 768, H: int = 3072, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.nn.functional.rms_norm(torch.randn(T, d, device="cuda", generator=gen), (d,)).bfloat16()
    bound = 3**0.5 * 0.5 * d**-0.5
    w_fc = (torch.rand(d, H, device="cuda", generator=gen) * 2 - 1) * bound
    w_proj = (torch.rand(d, H, device="cuda", generator=gen) * 2 - 1) * bound
    g = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
    return x, w_fc, w_proj, g


@pytest.mark.gpu
def test_gpu_refresh_kernels_equal_the_twin():
    _need_fp8_gpu()
    _, w_fc, w_proj, _ = _record_inputs(16)
    states = {k: M.FP8MLPState(768, 3072, 8).cuda() for k in ("triton", "torch")}
    for i, mode in enumerate(("exact", "delayed", "delayed", "keep")):
        w_proj = w_proj * (1 + 0.1 * i)
        for k, s in states.items():
            s.refresh(w_fc, w_proj, mode, kernel=k)
        a, b = (dict(s.named_buffers()) for s in states.values())
        for n in a:
            x, y = a[n], b[n]
            if x.dtype == E4M3:
                x, y = x.view(torch.uint8), y.view(torch.uint8)
            assert torch.equal(x, y), (mode, n, int((x != y).sum()), x[x != y][:4].tolist(), y[x != y][:4].tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("T", [16384, 32768, 49152])
def test_gpu_op_matches_twin_and_bf16_at_record_sizes(T):
    """The op (Triton up kernel + _scaled_mm) vs the twin: same quantised inputs, differences only from
    accumulation order (fp8 MMA vs fp32 matmul) and the rounding it flips; vs the bf16 MLP within
    FP8's error (test_twin_is_close_to_the_bf16_mlp measures the same on the CPU)."""
    _need_fp8_gpu()
    x, w_fc, w_proj, g = _record_inputs(T)
    results = {}
    for k in ("triton", "torch"):
        state = M.FP8MLPState(768, 3072, 1).cuda()
        state.reset(w_fc, w_proj)
        M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel=k)            # sets the delayed scale
        assert 0 < state.act_scales.item() < 1
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        out = M.fp8_relu2_mlp(*leaves, state, kernel=k)
        results[k] = (out, *torch.autograd.grad(out, leaves, g), state.act_scales.clone())
    leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
    out = relu2_mlp_reference(*leaves)
    bf16_mlp = (out, *torch.autograd.grad(out, leaves, g))
    op, twin = results["triton"], results["torch"]
    assert [t.dtype for t in op[:4]] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert op[4].item() == pytest.approx(twin[4].item(), rel=1e-2)
    for a, b in zip(op[:4], twin[:4]):
        assert rel(a, b) < 2e-2
    errors = [rel(a, b) for a, b in zip(op[:4], bf16_mlp)]
    assert errors[0] < 0.075 and max(errors[1:]) < 0.06, errors


@pytest.mark.gpu
def test_gpu_down_projection_with_every_layers_scales():
    """The alignment regression (r89-training.md 6.4): the down projection's _scaled_mm with the scales
    of each of 11 layers (each its own allocation), and with the record's (1,)-views at 4-byte offsets
    into one 12-float buffer (copied by _aligned): no CUBLAS_STATUS_NOT_SUPPORTED, the twin's values."""
    _need_fp8_gpu()
    torch.manual_seed(0)
    model = GPT(ModelConfig(fp8_mlp=True), torch.bfloat16).cuda().train()
    x = torch.nn.functional.rms_norm(torch.randn(256, 768, device="cuda"), (768,)).bfloat16()
    shared = torch.rand(12, device="cuda") * 0.01 + 0.001
    for layer, block in enumerate(model.blocks):
        mlp = block.mlp
        with torch.no_grad():
            mlp.c_proj.uniform_(-0.02, 0.02)
        mlp.reset_fp8()
        twin_state = copy.deepcopy(mlp.fp8)
        out = M.fp8_relu2_mlp(x, mlp.c_fc, mlp.c_proj, mlp.fp8, kernel="triton")
        want = M.fp8_relu2_mlp(x, mlp.c_fc, mlp.c_proj, twin_state, kernel="torch")
        assert rel(out, want) < 1e-2, layer
        post8 = M.quantize_e4m3(torch.rand(256, 3072, device="cuda") * 400)
        view = shared[layer:layer + 1]
        got = M.down_projection(post8, mlp.fp8.w_proj_f8, view, mlp.fp8.w_proj_scale, torch.bfloat16)
        ref = M.down_projection_reference(post8, mlp.fp8.w_proj_f8, view, mlp.fp8.w_proj_scale, torch.bfloat16)
        assert rel(got, ref) < 1e-2, layer


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_model_fp8_close_to_bf16_and_no_recompiles(compiled):
    """A 4-layer bf16 model: fp8_mlp on vs off within FP8 error (loss and MLP gradients); compiled,
    several steps (exact then delayed refreshes) trace nothing new after the first."""
    _need_fp8_gpu()
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    cfg, plain, ids, targets = small_gpu_model()
    fp8_cfg = ModelConfig(**{**cfg.__dict__, "fp8_mlp": True, "fp8_mlp_exact_steps": 1})
    model = GPT(fp8_cfg, torch.bfloat16).cuda()
    with torch.no_grad():
        for p in plain.parameters():
            if p.label in ("mlp_proj", "attn_gate", "smear_gate"):
                p.normal_(0, 0.02)
    model.load_state_dict(plain.state_dict(), strict=False)   # weights; the hook re-quantises them
    for m in (plain, model):
        if compiled:
            m.compile_regions()
    for block in model.blocks:
        block.mlp.reset_fp8()
    results = {}
    for name, m in (("bf16", plain), ("fp8", model)):
        m(ids, targets)       # the FP8 model's first forward sets the delayed activation scales
        m.zero_grad(set_to_none=True)
        loss = m(ids, targets)
        loss.backward()
        results[name] = [loss.detach().float()] + [m.blocks[i].mlp.c_fc.grad.clone() for i in (0, 3)] + \
                        [m.blocks[i].mlp.c_proj.grad.clone() for i in (0, 3)]
    errors = [rel(a, b) for a, b in zip(results["fp8"], results["bf16"])]
    # the twin on the CPU, same model at T = 2048: loss 1e-4, MLP gradients 0.044-0.053
    assert errors[0] < 0.01 and max(errors[1:]) < 0.1, errors
    graphs = counters["stats"]["unique_graphs"]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for step in range(4):
        model(ids, targets).backward()
        opt.step()
        opt.zero_grad()
        model.after_optimizer_step(step)
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_graphed_fp8_training_matches_eager(tmp_path):
    """CUDA-graph replay of the micro-steps (slot reads/writes on the device, refresh in place) gives
    the eager run's losses, parameters and FP8 state exactly."""
    _need_fp8_gpu()
    from speedrun.distributed import init_world
    from speedrun.train.trainer import Trainer
    shards = write_synthetic_shards(tmp_path)
    runs = {}
    for mode in ("off", "on"):
        run_dir = tmp_path / mode
        cfg = fp8_micro_config(shards, run_dir, steps=6)
        cfg.train.device, cfg.train.compile, cfg.train.cuda_graphs = "cuda", True, mode
        cfg.train.parallel_warmup = False
        trainer = Trainer(cfg, init_world("cuda"), str(run_dir))
        trainer.run()
        assert (trainer.micro_graph is not None) == (mode == "on")
        runs[mode] = (train_losses(run_dir), [p.detach().clone() for p in trainer.model.parameters()],
                      fp8_state(trainer.model))
    (l_off, p_off, s_off), (l_on, p_on, s_on) = runs["off"], runs["on"]
    assert l_on == l_off
    assert all(torch.equal(a, b) for a, b in zip(p_off, p_on))
    assert all(torch.equal(s_off[k], s_on[k]) for k in s_off)
