"""Tests for speedrun.kernels.relu2_mlp: the twin against float64 maths, the Triton kernel against the twin.

The Triton kernel runs on CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET=1 there
only), so this pytest process never switches Triton into interpreter mode and GPU tests stay real.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from speedrun.kernels.relu2_mlp import linear_relu_square, linear_relu_square_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = importlib.util.find_spec("triton") is not None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def direct(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor):
    """Float64 h = relu(x W)^2 and its gradients written out by hand."""
    x, w, g = x.double(), w.double(), g.double()
    pre = x @ w
    h = pre.clamp_min(0) ** 2
    grad_pre = g * 2 * pre.clamp_min(0)
    return h, grad_pre @ w.t(), x.t() @ grad_pre


# ------------------------------------------------------------------------------------------------
# The twin (CPU, no Triton)
# ------------------------------------------------------------------------------------------------
def test_twin_matches_direct_float64_fp32():
    torch.manual_seed(0)
    x = torch.randn(33, 48, requires_grad=True)
    w = (torch.randn(48, 80) * 0.2).requires_grad_()
    h = linear_relu_square_reference(x, w)
    g = torch.randn_like(h)
    gx, gw = torch.autograd.grad(h, (x, w), g)
    want_h, want_gx, want_gw = direct(x.detach(), w.detach(), g)
    assert rel(h, want_h) < 1e-5 and rel(gx, want_gx) < 1e-5 and rel(gw, want_gw) < 1e-5


def test_twin_bf16_activations_fp32_weight():
    # The model's layout: bf16 activations, fp32 master weight cast at use; dW comes back fp32.
    torch.manual_seed(1)
    x = torch.randn(33, 48).bfloat16().requires_grad_()
    w = (torch.randn(48, 80) * 0.2).requires_grad_()
    h = linear_relu_square_reference(x, w)
    assert h.dtype == torch.bfloat16
    g = torch.randn_like(h)
    gx, gw = torch.autograd.grad(h, (x, w), g)
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.float32
    want_h, want_gx, want_gw = direct(x.detach(), w.detach().bfloat16(), g)
    assert rel(h, want_h) < 1e-2 and rel(gx, want_gx) < 2e-2 and rel(gw, want_gw) < 2e-2


def test_twin_gradcheck_float64():
    torch.manual_seed(2)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_relu_square_reference, (x, w))


def test_backward_identity_sqrt_of_post_activation():
    # The kernel's backward rebuilds relu(pre) from h alone: d h/d pre = 2 relu(pre) = 2 sqrt(h).
    pre = torch.linspace(-3, 3, 61, dtype=torch.float64, requires_grad=True)
    h = torch.relu(pre).square()
    (want,) = torch.autograd.grad(h.sum(), pre)
    torch.testing.assert_close(2 * h.detach().sqrt(), want)


def test_dispatch_and_errors_on_cpu():
    x = torch.randn(2, 5, 8)
    w = torch.randn(8, 12)
    h = linear_relu_square(x, w)
    assert h.shape == (2, 5, 12)
    assert torch.equal(h, linear_relu_square_reference(x, w))
    with pytest.raises(ValueError, match="kernel"):
        linear_relu_square(x, w, kernel="cuda")
    with pytest.raises(ValueError, match="expected x"):
        linear_relu_square(x, w.t())
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kernel='triton'"):
            linear_relu_square(x.bfloat16(), w, kernel="triton")


# ------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (subprocess, tiny sizes)
# ------------------------------------------------------------------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import json, os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    torch.set_num_threads(1)
    from speedrun.kernels.relu2_mlp import linear_relu_square

    def rel(a, b):
        a, b = a.double(), b.double()
        return ((a - b).norm() / b.norm()).item()

    def direct(x, w, g):
        x, w, g = x.double(), w.double(), g.double()
        pre = x @ w
        grad_pre = g * 2 * pre.clamp_min(0)
        return pre.clamp_min(0) ** 2, grad_pre @ w.t(), x.t() @ grad_pre

    out = {}
    torch.manual_seed(0)
    # 33 x 48 @ 48 x 80 with 16 x 32 x 16 interpreter tiles: ragged edges in M and N.
    cases = {
        "bf16": (torch.randn(33, 48).bfloat16(), torch.randn(48, 80) * 0.2),
        "fp16": (torch.randn(33, 48).half(), torch.randn(48, 80) * 0.2),
        "bf16-ragged-k": (torch.randn(21, 40).bfloat16(), torch.randn(40, 50) * 0.2),  # K not a multiple of 16
        "bf16-strided-x": (torch.randn(48, 33).bfloat16().t(), torch.randn(48, 80) * 0.2),  # non-contiguous x
        "bf16-3d": (torch.randn(3, 11, 48).bfloat16(), torch.randn(48, 80) * 0.2),
    }
    for name, (x, w) in cases.items():
        results = []
        g = None
        for kernel in ("triton", "torch"):
            xx = x.clone().requires_grad_() if name != "bf16-strided-x" else x.t().clone().t().requires_grad_()
            ww = w.clone().requires_grad_()
            h = linear_relu_square(xx, ww, kernel=kernel)
            if g is None:
                g = torch.randn_like(h)
            gx, gw = torch.autograd.grad(h, (xx, ww), g)
            results.append((h, gx, gw))
        (hk, gxk, gwk), (ht, gxt, gwt) = results
        d = x.shape[-1]
        wh, wgx, wgw = direct(x.reshape(-1, d), w.to(x.dtype), g.reshape(-1, g.shape[-1]))
        out[name] = dict(
            h=rel(hk, ht), gx=rel(gxk, gxt), gw=rel(gwk, gwt),
            h64=rel(hk.reshape(wh.shape), wh), gx64=rel(gxk.reshape(wgx.shape), wgx), gw64=rel(gwk, wgw),
            twin_h64=rel(ht.reshape(wh.shape), wh), twin_gx64=rel(gxt.reshape(wgx.shape), wgx), twin_gw64=rel(gwt, wgw),
            dtypes=[str(hk.dtype), str(gxk.dtype), str(gwk.dtype)], shape=list(hk.shape), want_shape=list(ht.shape),
        )
    try:
        linear_relu_square(torch.randn(4, 8), torch.randn(8, 4), kernel="triton")
        out["fp32_error"] = False
    except RuntimeError as err:
        out["fp32_error"] = "bf16 or fp16" in str(err)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreter_results():
    if not HAS_TRITON:
        pytest.skip("triton is not importable")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("case", ["bf16", "fp16", "bf16-ragged-k", "bf16-strided-x", "bf16-3d"])
def test_triton_interpreter_matches_twin(interpreter_results, case):
    r = interpreter_results[case]
    assert r["shape"] == r["want_shape"]
    dtype = "torch.float16" if case == "fp16" else "torch.bfloat16"
    assert r["dtypes"] == [dtype, dtype, "torch.float32"]  # dW is cast back to the fp32 weight
    # Kernel and twin both round to 16 bits (at different points), and the interpreter truncates
    # fp32 -> bf16 where the GPU rounds to nearest: a few 2^-8 ulps apart at most.
    assert r["h"] < 1.5e-2 and r["gx"] < 1.5e-2 and r["gw"] < 1.5e-2, r
    # Against float64 maths the kernel is no worse than the twin (it rounds once, after the square).
    for key in ("h64", "gx64", "gw64"):
        assert r[key] < 1e-2 and r[key] < 1.5 * r["twin_" + key] + 1e-3, (key, r)


def test_triton_interpreter_rejects_fp32(interpreter_results):
    assert interpreter_results["fp32_error"]


# ------------------------------------------------------------------------------------------------
# GPU (real sizes, skipped without CUDA)
# ------------------------------------------------------------------------------------------------
def _gpu_inputs(T: int = 32768, d: int = 768, H: int = 3072):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
    bound = 3**0.5 * 0.5 * d**-0.5  # the record's c_fc init
    w = (torch.rand(d, H, device="cuda", generator=gen) * 2 - 1) * bound
    return x, w


@pytest.mark.gpu
def test_gpu_matches_twin_record_size():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    x, w = _gpu_inputs()
    outs = []
    g = None
    for kernel in ("triton", "torch"):
        xx = x.clone().requires_grad_()
        ww = w.clone().requires_grad_()
        h = linear_relu_square(xx, ww, kernel=kernel)
        if g is None:
            g = torch.randn_like(h)
        outs.append((h, *torch.autograd.grad(h, (xx, ww), g)))
    (hk, gxk, gwk), (ht, gxt, gwt) = outs
    assert hk.dtype == torch.bfloat16 and gxk.dtype == torch.bfloat16 and gwk.dtype == torch.float32
    assert rel(hk, ht) < 1e-2
    assert rel(gxk, gxt) < 2e-2
    assert rel(gwk, gwt) < 2e-2


@pytest.mark.gpu
def test_gpu_under_torch_compile_fullgraph():
    # The model is compiled with fullgraph=True, so the kernel must trace without graph breaks.
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    x, w = _gpu_inputs(T=4096)

    def mlp_up(xx, ww):
        return linear_relu_square(xx, ww, kernel="triton")

    compiled = torch.compile(mlp_up, fullgraph=True)
    xx = x.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    h = compiled(xx, ww)
    h.float().sum().backward()
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    hr = linear_relu_square_reference(xr, wr)
    hr.float().sum().backward()
    assert rel(h, hr) < 1e-2
    assert rel(xx.grad, xr.grad) < 2e-2 and rel(ww.grad, wr.grad) < 2e-2
