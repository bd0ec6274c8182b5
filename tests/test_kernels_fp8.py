"""FP8 lm_head op: the twin's autograd (gradcheck), the custom op's registration (schema, fake,
autograd) and its hand-written backward vs the emulated formulas and vs the twin, the dispatch
choosing the twin on CPU. GPU tests: real FP8 kernels vs the bf16 twin."""
import math

import pytest
import torch
import torch.nn.functional as F

from speedrun.kernels import fp8 as F8

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def head_inputs(T=256, K=768, M=1024, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = F.rms_norm(torch.randn(T, K, generator=g, device=device), (K,)).to(dtype)
    w = (torch.randn(M, K, generator=g, device=device) * 0.05).to(dtype)
    # a realistic logit gradient (softmax - one-hot) of a summed cross-entropy
    probs = torch.softmax(torch.randn(T, M, generator=g, device=device) * 3, -1)
    onehot = F.one_hot(torch.randint(0, M, (T,), generator=g, device=device), M)
    return x.requires_grad_(), w.requires_grad_(), (probs - onehot).to(dtype)


def test_scales_record():
    x_s, w_s, g_s = F8.head_scales(768)
    assert x_s == pytest.approx(math.sqrt(768) / 448) and x_s == pytest.approx(0.06186, abs=1e-5)
    assert w_s == 2 ** -9 and g_s == 1 / 448


def test_twin_gradcheck():
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(F8.linear_head, (x, w))


def test_op_registration():
    x, w, _ = head_inputs(T=16, K=32, M=24)
    torch.library.opcheck(torch.ops.speedrun.fp8_mm.default, (x, w, 0.02, 2 ** -9, 1 / 448),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_op_forward_backward_match_formulas():
    """The op (CPU emulation of the scaled matmuls) against the quantize/dequantize formulas."""
    x, w, g = head_inputs(T=64, K=96, M=80)
    x_s, w_s, g_s = F8.head_scales(96)
    y = F8.fp8_linear(x, w)
    y.backward(g)
    xq = (x.detach() / x_s).to(E4M3).float() * x_s
    wq = (w.detach() / w_s).to(E4M3).float() * w_s
    gq = (g / g_s).to(E5M2).float() * g_s
    torch.testing.assert_close(y, xq @ wq.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, gq.T @ xq, rtol=1e-5, atol=1e-5)


def test_op_close_to_twin():
    x, w, g = head_inputs()
    y = F8.fp8_linear(x, w)
    y.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    y_ref = F8.linear_head(x, w)
    y_ref.backward(g)
    assert rel(y, y_ref) < 0.06 and rel(gx, x.grad) < 0.06 and rel(gw, w.grad) < 0.06


def test_op_backward_traces_under_compile():
    """The registered backward is plain traceable torch code (aot_eager: AOTAutograd, no inductor)."""
    x, w, g = head_inputs(T=32, K=64, M=48)
    fn = torch.compile(lambda a, b: F8.fp8_linear(a, b).float().mul(g).sum(), backend="aot_eager",
                       fullgraph=True)
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    F8.fp8_linear(x, w).backward(g)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)


def test_dispatch_chooses_twin_on_cpu(monkeypatch):
    assert F8.fp8_active(True, torch.device("cpu")) is False
    assert F8.fp8_active(False, torch.device("cuda")) is False

    def boom(*a, **k):
        raise AssertionError("fp8 op used on CPU")

    monkeypatch.setattr(F8, "fp8_linear", boom)
    x, w, _ = head_inputs(T=8, K=16, M=8)
    use = F8.fp8_active(True, x.device)
    torch.testing.assert_close(F8.head_matmul(x, w, use), F.linear(x, w), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_fp8_vs_bf16():
    if not F8.fp8_supported("cuda", 0):
        pytest.skip("GPU without FP8 tensor cores")
    x, w, g = head_inputs(T=4096, K=768, M=8192, device="cuda", dtype=torch.bfloat16)
    y = F8.fp8_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (4096, 8192)
    y.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    assert gx.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    x.grad = w.grad = None
    F8.linear_head(x, w).backward(g)
    y_ref = F8.linear_head(x, w)
    assert rel(y, y_ref) < 0.06
    assert rel(gx, x.grad) < 0.06
    assert rel(gw, w.grad) < 0.06


@pytest.mark.gpu
def test_gpu_fp8_compiled_matches_eager():
    if not F8.fp8_supported("cuda", 0):
        pytest.skip("GPU without FP8 tensor cores")
    x, w, g = head_inputs(T=2048, K=768, M=4096, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda a, b: (F8.fp8_linear(a, b) * g).float().sum(), fullgraph=True)
    fn(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (F8.fp8_linear(x, w) * g).float().sum().backward()
    assert rel(gx, x.grad) < 1e-2 and rel(gw, w.grad) < 1e-2
