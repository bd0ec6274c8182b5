"""speedrun.kernels.adam_update: the fused Adam update against its twin (DistAdam's torch math).

The Triton kernel runs on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 only
there); the GPU test compares it with the twin at the record's shard size.
"""
from __future__ import annotations

import textwrap

import pytest
import torch
from kernel_helpers import HAS_TRITON, run_interpreted  # noqa: E402

from speedrun.kernels.adam_update import adam_update_, adam_update_reference


def test_twin_is_adam_on_the_first_step():
    """Step 1 with bias correction: m = (1-b1) g, v = (1-b2) g^2, step = lr * sqrt(1-b2)/(1-b1),
    so p moves by lr * g / |g| = lr * sign(g) (fp32 state, eps negligible)."""
    torch.manual_seed(0)
    p, g = torch.randn(1000), torch.randn(1000)
    m, v = torch.zeros(1000), torch.zeros(1000)
    b1, b2, lr = 0.65, 0.95, 0.01
    before = p.clone()
    adam_update_reference(p, g, m, v, b1, b2, 1e-12, lr * (1 - b2) ** 0.5 / (1 - b1), 0.0, False)
    torch.testing.assert_close(p, before - lr * g.sign(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m, (1 - b1) * g)


def test_twin_cautious_decay_only_where_update_agrees():
    p = torch.tensor([1.0, 1.0, -1.0, -1.0])
    g = torch.tensor([1.0, -1.0, -1.0, 1.0])  # update has g's sign
    m, v = torch.zeros(4), torch.zeros(4)
    adam_update_reference(p, g, m, v, 0.0, 0.0, 0.0, 0.0, 0.5, True)  # step_size 0: decay only
    # decay where sign(update) == sign(p): entries 0 and 2
    assert p.tolist() == [0.5, 1.0, -0.5, -1.0]


def test_twin_record89_decay_is_one_subtraction_with_a_strict_mask():
    """decay_form lr_squared: p - (step_size u + lr_wd [u p > 0] p) (the caller's lr_wd is eff_lr²
    wd wd_mul); entries with u = 0 (zero gradient and moments) are not decayed."""
    p = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    g = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0])
    m, v = torch.zeros(5), torch.zeros(5)
    adam_update_reference(p, g, m, v, 0.0, 0.0, 1e-12, 0.1, 0.5, True, "lr_squared")
    # u = g / |g| = sign(g) (b1 = b2 = 0), u = 0 where g = 0
    torch.testing.assert_close(p, torch.tensor([1.0 - (0.1 + 0.5), 1.0 + 0.1, -1.0 - (-0.1 - 0.5), -1.0 - 0.1, 2.0]))


def test_dispatch_errors():
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="kernel must be one of"):
        adam_update_(t, t, t, t, b1=0.9, b2=0.9, eps=1e-8, step_size=0.1, kernel="cuda")
    with pytest.raises(ValueError, match="decay_form"):
        adam_update_(t, t, t, t, b1=0.9, b2=0.9, eps=1e-8, step_size=0.1, decay_form="lr2")
    with pytest.raises(ValueError, match="one shape"):
        adam_update_(t, torch.zeros(5), t, t, b1=0.9, b2=0.9, eps=1e-8, step_size=0.1)
    if HAS_TRITON and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            adam_update_(t, t, t, t, b1=0.9, b2=0.9, eps=1e-8, step_size=0.1, kernel="triton")


INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    from speedrun.kernels.adam_update import adam_update_

    out = {}
    torch.manual_seed(0)
    n = 1000  # 4 blocks of 256, the last one masked
    for pdt, sdt in (("float32", "float32"), ("bfloat16", "bfloat16")):
        for wd, cautious, form in ((0.0, False, "lr"), (0.3, True, "lr"), (0.3, False, "lr"),
                                   (0.3, True, "lr_squared"), (0.0, False, "lr_squared")):
            p = torch.randn(n).to(getattr(torch, pdt))
            g = torch.randn(n).to(getattr(torch, pdt))
            m = (torch.randn(n) * 0.1).to(getattr(torch, sdt))
            v = (torch.rand(n) * 0.1).to(getattr(torch, sdt))
            res = []
            for kernel in ("triton", "torch"):
                pp, mm, vv = p.clone(), m.clone(), v.clone()
                adam_update_(pp, g, mm, vv, b1=0.65, b2=0.95, eps=1e-8, step_size=0.02, lr_wd=wd,
                             cautious=cautious, kernel=kernel, decay_form=form)
                res.append((pp.float(), mm.float(), vv.float()))
            (pk, mk, vk), (pt, mt, vt) = res
            rel = lambda a, b: ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item()
            # p's error relative to its size plus the size of its move (p can land near zero)
            p_err = ((pk - pt).abs() / (pt.abs() + (pt - p.float()).abs()).clamp_min(1e-6)).max().item()
            out[f"{pdt}-{wd}-{cautious}-{form}"] = dict(p=p_err, m=rel(mk, mt), v=rel(vk, vt),
                                                  moved=(pt - p.float()).abs().max().item())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("interpreter_results"))


@pytest.mark.parametrize("wd,cautious,form", [(0.0, False, "lr"), (0.3, True, "lr"), (0.3, False, "lr"),
                                               (0.3, True, "lr_squared"), (0.0, False, "lr_squared")])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_interpreter_matches_twin(interpreter_results, dtype, wd, cautious, form):
    r = interpreter_results[f"{dtype}-{wd}-{cautious}-{form}"]
    assert r["moved"] > 1e-3  # the update did something
    if dtype == "float32":
        assert max(r["p"], r["m"], r["v"]) < 1e-5, r   # relative
    else:
        # the interpreter truncates fp32 -> bf16 where torch rounds: at most one bf16 step (2^-7 relative)
        assert max(r["p"], r["m"], r["v"]) <= 2 ** -7, r


@pytest.mark.gpu
@pytest.mark.parametrize("wd,cautious,form", [(0.0, False, "lr"), (0.3, True, "lr"), (0.3, True, "lr_squared")])
def test_gpu_kernel_matches_twin(wd, cautious, form):
    """The record's Adam shard (50304 x 768 bf16 param and state): kernel == twin up to the rounding
    of one fp32 operation (FMA contraction), i.e. almost everywhere bit-identical."""
    torch.manual_seed(0)
    shape = (50304, 768)
    p = torch.randn(shape, device="cuda").bfloat16()
    g = (torch.randn(shape, device="cuda") * 1e-2).bfloat16()
    m = (torch.randn(shape, device="cuda") * 1e-2).bfloat16()
    v = (torch.rand(shape, device="cuda") * 1e-4).bfloat16()
    res = []
    for kernel in ("triton", "torch"):
        pp, mm, vv = p.clone(), m.clone(), v.clone()
        adam_update_(pp, g, mm, vv, b1=0.65, b2=0.95, eps=1e-8, step_size=0.3, lr_wd=wd,
                     cautious=cautious, kernel=kernel, decay_form=form)
        res.append((pp, mm, vv))
    for a, b in zip(*res):
        differ = (a != b).float().mean().item()
        assert differ < 1e-3, differ
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)
