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
