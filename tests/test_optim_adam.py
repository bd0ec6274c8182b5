"""DistAdam, one process: bias correction, bf16 state, lr multipliers, (cautious) weight decay."""
import pytest
import torch
from optim_helpers import labelled, reference_adam

from speedrun.optim.adam import DistAdam


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)   # every test sees the same random inputs


def _run(dtype=torch.bfloat16, state_dtype=torch.bfloat16, steps=4, wd=0.0, cautious=False,
         lr_mult=0.5, lr_mul=3.0, shape=(16, 8)):
    gen = torch.Generator().manual_seed(0)
    p = labelled(shape, "embed", dtype, scale=1.0, gen=gen)
    ref, state = p.detach().clone(), {}
    opt = DistAdam([{"params": [p], "lr_mul": lr_mul}], lr=0.01, weight_decay=wd,
                   cautious_weight_decay=cautious, state_dtype=state_dtype)
    for _ in range(steps):
        g = torch.randn(shape, generator=gen).to(dtype)
        p.grad = g
        opt.step(lr_mult=lr_mult)
        ref = reference_adam(ref, g, state, lr=0.01 * lr_mult * lr_mul, wd=wd, cautious=cautious,
                             state_dtype=state_dtype)
    return p.detach(), ref, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference_bf16_state(dtype):
    ours, ref, opt = _run(dtype)
    assert opt.state[opt.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16
    tol = 1e-6 if dtype == torch.float32 else 0.0   # bf16 params: identical after rounding
    torch.testing.assert_close(ours.float(), ref.float(), atol=tol + 1e-7, rtol=0)


def test_bf16_state_differs_from_fp32_state():
    a, ref32, _ = _run(torch.float32, state_dtype=torch.float32)
    torch.testing.assert_close(a, ref32, atol=1e-6, rtol=0)
    b, _, _ = _run(torch.float32, state_dtype=torch.bfloat16)
    assert (a - b).abs().max() > 1e-6


def test_bias_correction_first_step_is_lr_times_sign():
    """t=1: m=(1-b1)g, v=(1-b2)g^2, so the corrected step is lr*g/|g| (up to eps and bf16)."""
    p = labelled((8, 4), "scalars", scale=1.0)
    p0 = p.detach().clone()
    g = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    p.grad = g + 0.5 * g.sign()          # |g| >= 0.5, so eps (1e-8) is invisible at rtol 1e-5
    DistAdam([p], lr=0.01, state_dtype=torch.float32).step()
    torch.testing.assert_close(p0 - p.detach(), 0.01 * p.grad.sign(), atol=1e-7, rtol=1e-5)


def test_matches_torch_adam_with_fp32_state():
    """Same as torch.optim.Adam up to eps placement (ours: eps outside the bias correction)."""
    p = labelled((16, 8), "lm_head")
    q = torch.nn.Parameter(p.detach().clone())
    ours = DistAdam([{"params": [p], "lr_mul": 2.0}], lr=0.004, state_dtype=torch.float32)
    theirs = torch.optim.Adam([q], lr=0.008, betas=(0.65, 0.95), eps=1e-8)
    for step in range(5):
        g = torch.randn(16, 8)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("cautious", [False, True])
def test_weight_decay(cautious):
    ours, ref, _ = _run(torch.float32, wd=0.3, cautious=cautious)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    plain, _, _ = _run(torch.float32)
    assert (plain - ours).abs().max() > 1e-5


def test_step_count_and_state_roundtrip():
    _, _, opt = _run(torch.float32, steps=3)
    p = opt.param_groups[0]["params"][0]
    assert opt.state[p]["step"] == 3
    sd = opt.state_dict()
    opt2 = DistAdam([p])
    opt2.load_state_dict(sd)
    assert opt2.state[p]["step"] == 3
    torch.testing.assert_close(opt2.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    with pytest.raises(ValueError, match="world size"):
        opt2.load_state_dict(dict(sd, world_size=8))


def test_skips_params_without_grad():
    p = labelled((4, 4), "scalars")
    before = p.detach().clone()
    DistAdam([p]).step()
    assert torch.equal(p.detach(), before)


# ------------------------------------------------------------------------------------------------
# record 89's weight decay (optim.adam.decay_form "lr_squared", r89-training.md 5.3)
# ------------------------------------------------------------------------------------------------
def record89_adam(p, grads, lr, wd, wd_mul, betas=(0.5, 0.95), eps=1e-10):
    """r89-training.md 5.3 in float64, step by step: upd = m / (sqrt(v) + eps) * lr sqrt(1-b2^t)/(1-b1^t);
    upd += p [upd p > 0] lr^2 wd wd_mul; p -= upd."""
    b1, b2 = betas
    p = p.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        upd = m / (v.sqrt() + eps) * lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
        upd = upd + p * (upd * p > 0) * (lr ** 2 * wd * wd_mul)
        p = p - upd
    return p


def test_record89_decay_matches_the_notes_formula():
    """DistAdam with decay_form lr_squared, fp32 state and record 89's lm_head group (betas (0.5,
    0.95), wd_mul 150) against the formula; the decay is visibly there (lr_mult 1.52: eff_lr² ∝
    schedule²), and it is not record 45's form (decay ∝ eff_lr)."""
    gen = torch.Generator().manual_seed(1)
    p = labelled((64, 16), "lm_head", scale=1.0, gen=gen)
    p0 = p.detach().clone()
    grads = [torch.randn(64, 16, generator=gen) for _ in range(5)]
    lr, lr_mult, wd = 0.008, 1.52, 0.005
    opt = DistAdam([{"params": [p], "lr_mul": 1.0, "wd_mul": 150.0, "betas": (0.5, 0.95), "eps": 1e-10}],
                   lr=lr, weight_decay=wd, cautious_weight_decay=True, state_dtype=torch.float32,
                   decay_form="lr_squared")
    for g in grads:
        p.grad = g.clone()
        opt.step(lr_mult=lr_mult)
    want = record89_adam(p0, grads, lr * lr_mult, wd, 150.0)
    torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=2e-6)
    no_decay = record89_adam(p0, grads, lr * lr_mult, 0.0, 150.0)
    assert (want - no_decay).abs().max() > 1e-4          # the decay changes p
    r45 = DistAdam([{"params": [q := labelled((64, 16), "lm_head", scale=1.0)], "wd_mul": 150.0,
                     "betas": (0.5, 0.95), "eps": 1e-10}], lr=lr, weight_decay=wd, cautious_weight_decay=True,
                   state_dtype=torch.float32)
    with torch.no_grad():
        q.copy_(p0)
    for g in grads:
        q.grad = g.clone()
        r45.step(lr_mult=lr_mult)
    assert (q.detach().double() - want).abs().max() > 1e-3


def test_record89_mask_is_strict():
    """Where the update is exactly zero the strict mask (upd p > 0) does not decay; record 45's
    (u p >= 0) does."""
    p = labelled((4,), "embed", scale=1.0)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, -1.0, 2.0, -2.0]))
    for form, want in (("lr_squared", [1.0, -1.0]), ("lr", [1.0 - 0.5 * 0.1, -1.0 + 0.5 * 0.1])):
        q = labelled((4,), "embed", scale=1.0)
        with torch.no_grad():
            q.copy_(p)
        q.grad = torch.tensor([0.0, 0.0, 1.0, 1.0])          # zero gradient -> zero update on 0, 1
        DistAdam([q], lr=0.5, weight_decay=0.1, cautious_weight_decay=True, state_dtype=torch.float32,
                 decay_form=form).step()
        torch.testing.assert_close(q.detach()[:2], torch.tensor(want))
    with pytest.raises(ValueError, match="decay_form"):
        DistAdam([p], decay_form="squared")
