"""Tests for speedrun.kernels.softcap_ce: the twin against float64 maths, the Triton kernels against the twin.

The Triton kernels run on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 there
only), so this pytest process never switches Triton into interpreter mode and GPU tests stay real.
"""
from __future__ import annotations

import math
import os
import textwrap

import pytest
import torch
from kernel_helpers import run_interpreted  # noqa: E402

from speedrun.kernels.softcap_ce import (
    softcap,
    softcapped_cross_entropy,
    softcapped_cross_entropy_reference,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def direct_loss_and_grad(z: torch.Tensor, t: torch.Tensor, cap: float, g: torch.Tensor, tau=None, offset=0.0):
    """Float64 loss per row and d(sum g*loss)/dz written out by hand (no autograd), for the softcap
    s = cap sigmoid((z + offset) / tau) (tau None = cap/4)."""
    z = z.double()
    tau = cap / 4.0 if tau is None else tau
    sig = torch.sigmoid((z + offset) / tau)
    s = cap * sig
    lse = torch.logsumexp(s, dim=1)
    loss = lse - s.gather(1, t[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(t, z.shape[1]).double()
    dlds = torch.softmax(s, dim=1) - onehot
    dsdz = (cap / tau) * sig * (1 - sig)  # = 4 sig (1 - sig)
    return loss, g.double()[:, None] * dlds * dsdz


# ------------------------------------------------------------------------------------------------
# The twin (CPU, no Triton)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [30.0, 15.0])
def test_twin_matches_direct_float64(cap):
    torch.manual_seed(0)
    z = torch.randn(23, 301) * 6
    t = torch.randint(0, 301, (23,))
    g = torch.randn(23)
    want_loss, want_grad = direct_loss_and_grad(z, t, cap, g)
    zz = z.clone().requires_grad_()
    loss = softcapped_cross_entropy_reference(zz, t, cap, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == (23,)
    assert rel(loss, want_loss) < 1e-6
    (grad,) = torch.autograd.grad(loss, zz, g)
    assert rel(grad, want_grad) < 1e-5
    total = softcapped_cross_entropy_reference(z, t, cap, reduction="sum")
    assert total.shape == () and abs(total.item() - want_loss.sum().item()) < 1e-5 * want_loss.sum().item()


def test_twin_asymmetric_rescale_matches_direct_float64():
    """Record 89's 23 sigmoid((z + 5) / 7.5), loss and gradient, against the hand-written maths."""
    torch.manual_seed(3)
    z = torch.randn(21, 199) * 6
    t = torch.randint(0, 199, (21,))
    g = torch.randn(21)
    want_loss, want_grad = direct_loss_and_grad(z, t, 23.0, g, tau=7.5, offset=5.0)
    zz = z.clone().requires_grad_()
    loss = softcapped_cross_entropy(zz, t, 23.0, "none", temperature=7.5, offset=5.0)
    assert rel(loss, want_loss) < 1e-6
    (grad,) = torch.autograd.grad(loss, zz, g)
    assert rel(grad, want_grad) < 1e-5
    # asymmetric: the rescaled value at 0 is 23 sigmoid(5/7.5) ~ 15.05, range (0, 23)
    assert softcap(torch.zeros(1), 23.0, 7.5, 5.0).item() == pytest.approx(23 / (1 + math.exp(-5 / 7.5)))
    with pytest.raises(ValueError, match="temperature"):
        softcapped_cross_entropy(z, t, 23.0, temperature=-1.0)


def test_twin_gradcheck_float64():
    # Finite differences on the twin in float64: checks the softcap chain rule end to end.
    torch.manual_seed(1)
    z = (torch.randn(5, 17, dtype=torch.float64) * 4).requires_grad_()
    t = torch.randint(0, 17, (5,))
    assert torch.autograd.gradcheck(lambda zz: softcapped_cross_entropy_reference(zz, t, 30.0, "sum"), (z,))


def test_softcap_derivative_is_four_sig_one_minus_sig():
    # The kernel's ds/dz: cap/tau * sig * (1 - sig) with tau = cap/4, i.e. 4 sig (1 - sig) for any cap.
    z = torch.linspace(-40, 40, 101, dtype=torch.float64, requires_grad=True)
    for cap in (30.0, 7.0):
        (ds,) = torch.autograd.grad(softcap(z, cap).sum(), z)
        sig = torch.sigmoid(z.detach() / (cap / 4))
        torch.testing.assert_close(ds, 4 * sig * (1 - sig))
    assert torch.allclose(softcap(z.detach(), 30.0), 15 * (torch.tanh(z.detach() / 15) + 1))


def test_twin_bf16_logits_compute_in_fp32():
    torch.manual_seed(2)
    z = (torch.randn(19, 250) * 5).bfloat16()
    t = torch.randint(0, 250, (19,))
    loss = softcapped_cross_entropy_reference(z, t, reduction="none")
    want, _ = direct_loss_and_grad(z, t, 30.0, torch.ones(19))
    assert loss.dtype == torch.float32 and rel(loss, want) < 1e-6


def test_ignore_index_rows_count_zero():
    z = torch.randn(6, 40)
    t = torch.randint(0, 40, (6,))
    t[2] = -100
    per = softcapped_cross_entropy_reference(z, t, reduction="none")
    assert per[2].item() == 0.0
    assert torch.allclose(softcapped_cross_entropy_reference(z, t), per.sum())


def test_dispatch_and_errors_on_cpu():
    z = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    assert torch.equal(softcapped_cross_entropy(z, t), softcapped_cross_entropy_reference(z, t))
    with pytest.raises(ValueError, match="reduction"):
        softcapped_cross_entropy(z, t, reduction="mean")
    with pytest.raises(ValueError, match="kernel"):
        softcapped_cross_entropy(z, t, kernel="cuda")
    with pytest.raises(ValueError, match="targets"):
        softcapped_cross_entropy(z, t[:3])
    with pytest.raises(ValueError, match="2-D"):
        softcapped_cross_entropy(z[None], t)
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kernel='triton'"):
            softcapped_cross_entropy(z, t, kernel="triton")


# ------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (subprocess, tiny sizes)
# ------------------------------------------------------------------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    from speedrun.kernels.softcap_ce import softcapped_cross_entropy

    out = {}
    torch.manual_seed(0)
    T, V = 37, 300  # neither a multiple of anything: V = 2 blocks of 128 + a 44-wide masked tail
    for dtype in ("float32", "bfloat16"):
        for cap in (30.0, 100.0, 23.0):  # 100 > 80 takes the online-max branch; 23: record 89's rescale
            rescale = {"temperature": 7.5, "offset": 5.0} if cap == 23.0 else {}
            for reduction in ("sum", "none"):
                z = (torch.randn(T, V) * 8).to(getattr(torch, dtype))
                t = torch.randint(0, V, (T,))
                t[5] = -100
                g = torch.randn(T) if reduction == "none" else torch.tensor(1.7)
                results = []
                for kernel in ("triton", "torch"):
                    zz = z.clone().requires_grad_()
                    loss = softcapped_cross_entropy(zz, t, cap, reduction, kernel=kernel, **rescale)
                    (grad,) = torch.autograd.grad(loss, zz, g)
                    results.append((loss, grad))
                (lk, gk), (lt, gt) = results
                key = f"{dtype}-{cap}-{reduction}"
                out[key] = dict(loss=rel(lk, lt), grad=rel(gk.float(), gt.float()),
                                loss_dtype=str(lk.dtype), grad_dtype=str(gk.dtype), shape=list(lk.shape),
                                ignored_loss=(lk[5].item() if reduction == "none" else 0.0),
                                ignored_grad=gk[5].abs().max().item())

    # In-place backward: the gradient lands in the logits buffer and equals the out-of-place one.
    z = (torch.randn(T, V) * 8).bfloat16()
    t = torch.randint(0, V, (T,))
    leaf = z.clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf, like the head's output
    loss = softcapped_cross_entropy(logits, t, kernel="triton", inplace_backward=True)
    captured = {}
    logits.register_hook(lambda gr: captured.setdefault("g", gr))
    loss.backward(retain_graph=True)
    zz = z.clone().requires_grad_()
    (want,) = torch.autograd.grad(softcapped_cross_entropy(zz, t, kernel="torch"), zz)
    out["inplace"] = dict(grad=rel(leaf.grad.float(), want.float()),
                          aliased=captured["g"].data_ptr() == logits.data_ptr())
    try:
        loss.backward()
        out["inplace"]["second_backward_raised"] = False
    except RuntimeError as err:
        out["inplace"]["second_backward_raised"] = "backward ran twice" in str(err)

    # An out-of-range target is reported as a NaN loss, not silently read out of bounds.
    t_bad = t.clone()
    t_bad[0] = V + 3
    per = softcapped_cross_entropy(z.float(), t_bad, reduction="none", kernel="triton")
    out["bad_target"] = dict(nan_first=bool(torch.isnan(per[0])), finite_rest=bool(torch.isfinite(per[1:]).all()))
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("interpreter_results"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cap", [30.0, 100.0, 23.0])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_triton_interpreter_matches_twin(interpreter_results, dtype, cap, reduction):
    r = interpreter_results[f"{dtype}-{cap}-{reduction}"]
    # The loss is fp32 maths on identical inputs in both: only summation order differs.
    assert r["loss"] < 1e-5, r
    # fp32 gradients agree to rounding. bf16 gradients may differ by one bf16 ulp (2^-8 relative):
    # the interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest.
    assert r["grad"] < (1e-5 if dtype == "float32" else 1e-2), r
    assert r["loss_dtype"] == "torch.float32"
    assert r["grad_dtype"] == f"torch.{dtype}"
    assert r["shape"] == ([] if reduction == "sum" else [37])
    assert r["ignored_loss"] == 0.0 and r["ignored_grad"] == 0.0


def test_triton_interpreter_inplace_backward(interpreter_results):
    r = interpreter_results["inplace"]
    assert r["grad"] < 1e-2, r
    assert r["aliased"], "the gradient should be written into the logits buffer"
    assert r["second_backward_raised"], "a second backward through overwritten logits must raise"


def test_triton_interpreter_flags_bad_targets(interpreter_results):
    assert interpreter_results["bad_target"] == dict(nan_first=True, finite_rest=True)


# ------------------------------------------------------------------------------------------------
# GPU (real sizes, skipped without CUDA)
# ------------------------------------------------------------------------------------------------
def _gpu_inputs(T: int, V: int = 50304):
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(T, V, device="cuda", generator=gen) * 4).bfloat16()
    t = torch.randint(0, V, (T,), device="cuda", generator=gen)
    return z, t


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_gpu_matches_twin_record_size(reduction):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    z, t = _gpu_inputs(8192)
    g = torch.randn(8192, device="cuda") if reduction == "none" else torch.tensor(0.125, device="cuda")
    outs = []
    for kernel in ("triton", "torch"):
        zz = z.clone().requires_grad_()
        loss = softcapped_cross_entropy(zz, t, reduction=reduction, kernel=kernel)
        (grad,) = torch.autograd.grad(loss, zz, g)
        outs.append((loss, grad))
    (lk, gk), (lt, gt) = outs
    assert gk.dtype == torch.bfloat16
    assert rel(lk, lt) < 1e-5
    assert rel(gk.float(), gt.float()) < 1e-2


@pytest.mark.gpu
def test_gpu_inplace_backward_full_batch():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    z, t = _gpu_inputs(32768)
    leaf = z.requires_grad_()
    logits = leaf * 1.0
    loss = softcapped_cross_entropy(logits, t, inplace_backward=True)
    loss.backward()
    zz = z.detach()[:4096].clone().requires_grad_()
    (want,) = torch.autograd.grad(softcapped_cross_entropy(zz, t[:4096], kernel="torch"), zz)
    assert rel(leaf.grad[:4096].float(), want.float()) < 1e-2
    want_loss = softcapped_cross_entropy(z.detach(), t, kernel="torch")
    assert abs(loss.item() - want_loss.item()) < 1e-5 * want_loss.item()


@pytest.mark.gpu
def test_gpu_under_torch_compile_fullgraph():
    # The model is compiled with fullgraph=True, so the kernel must trace without graph breaks.
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    z, t = _gpu_inputs(2048)

    def loss_fn(logits, targets):
        return softcapped_cross_entropy(logits, targets, kernel="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    zz = z.clone().requires_grad_()
    loss = compiled(zz, t)
    loss.backward()
    zr = z.clone().requires_grad_()
    want = softcapped_cross_entropy(zr, t, kernel="torch")
    want.backward()
    assert rel(loss, want) < 1e-5
    assert rel(zz.grad.float(), zr.grad.float()) < 1e-2
