"""Tests for speedrun.kernels.relu2_mlp: the twins against float64 maths, the Triton kernels and the
fused MLP op (`speedrun::relu2_mlp`, eager and under torch.compile) against the twins, and the model's
`fused_mlp` switch.

The Triton kernels run on CPU through Triton's interpreter in subprocesses (TRITON_INTERPRET=1 there
only), so this pytest process never switches Triton into interpreter mode and GPU tests stay real.

GPU tests (record sizes; kernels, op eager and compiled, the model with fused_mlp on vs off):
    python -m pytest tests/test_kernels_relu2_mlp.py -m gpu -q
"""
from __future__ import annotations

import os
import textwrap

import pytest
import torch
from kernel_helpers import HAS_TRITON, run_interpreted  # noqa: E402

from speedrun.config import ModelConfig
from speedrun.kernels.relu2_mlp import (
    linear_relu_square,
    linear_relu_square_reference,
    relu2_mlp,
    relu2_mlp_reference,
)
from speedrun.model.gpt import GPT, MLP


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
    from speedrun.kernels.relu2_mlp import linear_relu_square

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
def interpreter_results(tmp_path_factory):
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("interpreter_results"))


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


# ================================================================================================
# The whole MLP: relu2_mlp (custom op speedrun::relu2_mlp) and its twin
# ================================================================================================
def direct_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor, g: torch.Tensor):
    """Float64 out = relu(x W_fc)^2 W_proj^T and its gradients (x, W_fc, W_proj) written out by hand."""
    x, w_fc, w_proj, g = x.double(), w_fc.double(), w_proj.double(), g.double()
    pre = x @ w_fc
    h = pre.clamp_min(0) ** 2
    grad_h = g @ w_proj
    grad_pre = grad_h * 2 * pre.clamp_min(0)
    return h @ w_proj.t(), grad_pre @ w_fc.t(), x.t() @ grad_pre, g.t() @ h


def mlp_weights(d: int, hidden: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w_fc = torch.randn(d, hidden, generator=gen) * d**-0.5
    w_proj = torch.randn(d, hidden, generator=gen) * hidden**-0.5
    return w_fc, w_proj


def test_mlp_twin_matches_direct_float64_and_the_model_code():
    torch.manual_seed(3)
    x = torch.randn(2, 9, 24, requires_grad=True)
    w_fc, w_proj = (w.requires_grad_() for w in mlp_weights(24, 40, 0))
    out = relu2_mlp_reference(x, w_fc, w_proj)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, w_fc, w_proj), g)
    want = direct_mlp(x.detach().reshape(-1, 24), w_fc.detach(), w_proj.detach(), g.reshape(-1, 24))
    assert rel(out.reshape(-1, 24), want[0]) < 1e-5
    assert rel(grads[0].reshape(-1, 24), want[1]) < 1e-5
    assert rel(grads[1], want[2]) < 1e-5 and rel(grads[2], want[3]) < 1e-5
    # The twin is exactly what the model's plain MLP computes (bf16 activations, fp32 weights).
    mlp = MLP(24, 40, relu_squared=True, fused_mlp=False)
    with torch.no_grad():
        mlp.c_fc.copy_(w_fc)
        mlp.c_proj.copy_(w_proj)
    xb = x.detach().bfloat16()
    assert torch.equal(mlp(xb), relu2_mlp_reference(xb, w_fc, w_proj))


def test_mlp_dispatch_and_errors_on_cpu():
    x = torch.randn(2, 5, 8)
    w_fc, w_proj = mlp_weights(8, 12, 1)
    out = relu2_mlp(x, w_fc, w_proj)  # auto on CPU: the twin
    assert out.shape == (2, 5, 8)
    assert torch.equal(out, relu2_mlp_reference(x, w_fc, w_proj))
    assert torch.equal(relu2_mlp(x, w_fc, w_proj, kernel="torch"), out)
    with pytest.raises(ValueError, match="kernel must be one of"):
        relu2_mlp(x, w_fc, w_proj, kernel="cuda")
    with pytest.raises(ValueError, match="expected x"):
        relu2_mlp(x, w_fc.t(), w_proj)
    with pytest.raises(ValueError, match="expected x"):
        relu2_mlp(x, w_fc, w_proj[:, :6])
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        # One line that says what is wrong and what to do instead.
        msg = "triton package" if not HAS_TRITON else "needs CUDA tensors"
        with pytest.raises(RuntimeError, match=msg) as err:
            relu2_mlp(x.bfloat16(), w_fc, w_proj, kernel="triton")
        assert "\n" not in str(err.value) and "relu2_mlp: kernel='triton'" in str(err.value)


def test_model_mlp_switch_keeps_parameters_and_cpu_math():
    # fused_mlp reaches every block's MLP; parameters (names, shapes, labels) are the same either way,
    # so checkpoints load across the switch; off CUDA the switch changes nothing.
    kw = dict(num_layers=2, no_attention_layers=[], long_window_layers=[1], value_embed_layers=[0, -1],
              skip_from_layer=0, skip_to_layer=1, backout_layer=1, model_dim=64, num_heads=1, head_dim=64,
              vocab_size=128, attention_backend="sdpa")
    assert ModelConfig().fused_mlp is True
    torch.manual_seed(0)
    on, off = GPT(ModelConfig(**kw, fused_mlp=True)), GPT(ModelConfig(**kw, fused_mlp=False))
    assert all(b.mlp.fused_mlp for b in on.blocks) and not any(b.mlp.fused_mlp for b in off.blocks)
    shapes = {n: (tuple(p.shape), p.label) for n, p in on.named_parameters()}
    assert shapes == {n: (tuple(p.shape), p.label) for n, p in off.named_parameters()}
    off.load_state_dict(on.state_dict())
    mlp_on, mlp_off = on.blocks[0].mlp, off.blocks[0].mlp
    with torch.no_grad():
        for p in (mlp_on.c_fc, mlp_on.c_proj):
            p.normal_(0, 0.1)
        mlp_off.load_state_dict(mlp_on.state_dict())
    x = torch.randn(7, 64).bfloat16()
    assert torch.equal(mlp_on(x), mlp_off(x))


# ------------------------------------------------------------------------------------------------
# The kernels and the op under the interpreter (subprocess, tiny sizes, ragged edges)
# ------------------------------------------------------------------------------------------------
MLP_INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    import time
    from torch._dynamo.backends.common import aot_autograd
    from speedrun.kernels import relu2_mlp as R

    def direct_mlp(x, w_fc, w_proj, g):
        x, w_fc, w_proj, g = x.double(), w_fc.double(), w_proj.double(), g.double()
        pre = x @ w_fc
        h = pre.clamp_min(0) ** 2
        grad_pre = (g @ w_proj) * 2 * pre.clamp_min(0)
        return h @ w_proj.t(), grad_pre @ w_fc.t(), x.t() @ grad_pre, g.t() @ h

    def weights(d, H, seed):
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(d, H, generator=gen) * d**-0.5, torch.randn(d, H, generator=gen) * H**-0.5

    out = {}
    # --- the two kernels alone, against float64 maths. Interpreter tiles 16 x 32 x 16 (default) and an
    # explicit 32 x 16 x 32 config: T = 37, H = 70 and d = 48 (not a multiple of 32) all leave partial tiles.
    torch.manual_seed(0)
    x = torch.randn(37, 48).bfloat16()
    w_fc, w_proj = (w.bfloat16() for w in weights(48, 70, 1))
    g = torch.randn(37, 48).bfloat16()
    pre64 = x.double() @ w_fc.double()
    h = pre64.clamp_min(0).square().bfloat16()  # ~half of h is exactly 0
    want_grad_pre = (g.double() @ w_proj.double()) * 2 * h.double().sqrt()
    for name, cfg in (("default", None), ("32x16x32", R.TileConfig(32, 16, 32, 1, num_warps=4, num_stages=1))):
        got_h = R.matmul_relu2(x, w_fc, config=cfg)
        got_grad_pre = R.matmul_relu2_grad(g, w_proj, h, config=cfg)
        out["kernels-" + name] = dict(
            h=rel(got_h, pre64.clamp_min(0).square()), grad_pre=rel(got_grad_pre, want_grad_pre),
            zeros_kept=bool((got_grad_pre[h == 0] == 0).all()), frac_zero=(h == 0).double().mean().item(),
            dtypes=[str(got_h.dtype), str(got_grad_pre.dtype)], shapes=[list(got_h.shape), list(got_grad_pre.shape)],
        )

    # --- the op vs the twin through autograd (fp32 master weights, cast outside the op)
    def run(kernel, x, w_fc, w_proj, g, need_x=True):
        xx = x.clone().requires_grad_(need_x)
        ff, pp = w_fc.clone().requires_grad_(), w_proj.clone().requires_grad_()
        o = R.relu2_mlp(xx, ff, pp, kernel=kernel)
        leaves = (xx, ff, pp) if need_x else (ff, pp)
        grads = torch.autograd.grad(o, leaves, g) if g is not None else torch.autograd.grad(o.float().sum(), leaves)
        return (o,) + tuple(grads)

    cases = {  # (T, d, H) with 16 x 32 x 16 tiles: ragged T and H everywhere, d ragged in "ragged-d"
        "bf16": (torch.bfloat16, (33,), 48, 80, True),
        "fp16": (torch.float16, (33,), 48, 80, True),
        "bf16-ragged-d": (torch.bfloat16, (21,), 40, 50, True),
        "bf16-3d": (torch.bfloat16, (3, 11), 48, 80, True),
        "bf16-sum-loss": (torch.bfloat16, (19,), 32, 64, False),  # expanded (stride 0) grad_out
        "bf16-no-grad-x": (torch.bfloat16, (17,), 32, 64, True),
    }
    for i, (name, (dtype, lead, d, H, with_g)) in enumerate(cases.items()):
        gen = torch.Generator().manual_seed(10 + i)
        x = torch.randn(*lead, d, generator=gen).to(dtype)
        w_fc, w_proj = weights(d, H, 20 + i)
        g = torch.randn(*lead, d, generator=gen).to(dtype) if with_g else None
        need_x = name != "bf16-no-grad-x"
        fused = run("triton", x, w_fc, w_proj, g, need_x)
        twin = run("torch", x, w_fc, w_proj, g, need_x)
        gg = g.reshape(-1, d) if g is not None else torch.ones(x.reshape(-1, d).shape, dtype=dtype)
        want = direct_mlp(x.reshape(-1, d), w_fc.to(dtype), w_proj.to(dtype), gg)
        if not need_x:
            want = (want[0],) + want[2:]
        flat = lambda t: t.reshape(-1, t.shape[-1])
        out[name] = dict(
            vs_twin=[rel(a, b) for a, b in zip(fused, twin)],
            vs64=[rel(flat(a), w) for a, w in zip(fused, want)],
            twin_vs64=[rel(flat(b), w) for b, w in zip(twin, want)],
            dtypes=[str(t.dtype) for t in fused], twin_dtypes=[str(t.dtype) for t in twin],
            shapes=[list(t.shape) for t in fused], twin_shapes=[list(t.shape) for t in twin],
        )

    # --- torch.compile(fullgraph=True): the op is one opaque node forward, the grad kernel one node
    # backward beside exactly three matmuls (d h is never a tensor); then inductor end to end.
    x = torch.randn(3, 11, 48).bfloat16()
    w_fc, w_proj = weights(48, 80, 5)
    def mlp(x, w_fc, w_proj):
        return R.relu2_mlp(x * 1.5, w_fc, w_proj, kernel="triton")
    graphs = {}
    def capture(name):
        def compiler(gm, inputs):
            graphs[name] = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
            return gm
        return compiler
    backend = aot_autograd(fw_compiler=capture("fw"), bw_compiler=capture("bw"))
    twin = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
    want = R.relu2_mlp_reference(twin[0] * 1.5, twin[1], twin[2])
    want.float().square().sum().backward()
    for name, be in (("aot", backend), ("inductor", "inductor")):
        torch._dynamo.reset()
        start = time.time()
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        got = torch.compile(mlp, fullgraph=True, backend=be)(*leaves)
        got.float().square().sum().backward()
        out["compiled-" + name] = dict(
            vs_twin=[rel(got, want)] + [rel(a.grad, b.grad) for a, b in zip(leaves, twin)],
            dtypes=[str(a.grad.dtype) for a in leaves], seconds=time.time() - start,
        )
    out["graphs"] = graphs

    # torch.library's own consistency checks of both ops (schema, fake impls, autograd registration).
    x = torch.randn(21, 40).bfloat16().requires_grad_()
    w_fc, w_proj = (w.bfloat16().requires_grad_() for w in weights(40, 50, 6))
    out["opcheck"] = {
        "relu2_mlp": torch.library.opcheck(torch.ops.speedrun.relu2_mlp.default, (x, w_fc, w_proj)),
        "relu2_mlp_grad_pre": torch.library.opcheck(
            torch.ops.speedrun.relu2_mlp_grad_pre.default,
            (torch.randn(21, 40).bfloat16(), w_proj.detach(), torch.rand(21, 50).bfloat16())),
    }

    try:
        R.relu2_mlp(torch.randn(4, 8), *weights(8, 16, 0), kernel="triton")
        out["fp32_error"] = ""
    except RuntimeError as err:
        out["fp32_error"] = str(err)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mlp_interpreter_results(tmp_path_factory):
    return run_interpreted(MLP_INTERPRETER_SCRIPT, tmp_path_factory.mktemp("mlp_interpreter_results"), threads=2)


@pytest.mark.parametrize("config", ["default", "32x16x32"])
def test_interpreter_fused_kernels_match_float64(mlp_interpreter_results, config):
    r = mlp_interpreter_results["kernels-" + config]
    assert r["dtypes"] == ["torch.bfloat16", "torch.bfloat16"] and r["shapes"] == [[37, 70], [37, 70]]
    # One bf16 rounding of each output (the interpreter truncates instead of rounding: up to 2^-8).
    assert r["h"] < 6e-3 and r["grad_pre"] < 6e-3, r
    # Where relu cut the pre-activation (h == 0), the gradient is exactly 0: sqrt(0) = 0.
    assert r["zeros_kept"] and 0.3 < r["frac_zero"] < 0.7, r


@pytest.mark.parametrize("case", ["bf16", "fp16", "bf16-ragged-d", "bf16-3d", "bf16-sum-loss", "bf16-no-grad-x"])
def test_interpreter_relu2_mlp_op_matches_twin(mlp_interpreter_results, case):
    r = mlp_interpreter_results[case]
    assert r["shapes"] == r["twin_shapes"] and r["dtypes"] == r["twin_dtypes"]
    dtype = "torch.float16" if case == "fp16" else "torch.bfloat16"
    want = [dtype] + ([dtype] if case != "bf16-no-grad-x" else []) + ["torch.float32", "torch.float32"]
    assert r["dtypes"] == want  # the weight gradients come back in the fp32 master weights' dtype
    # Op and twin round to 16 bits at different points (the op keeps d h in fp32): a few ulps apart.
    assert max(r["vs_twin"]) < 2e-2, r
    # Against float64 maths the op is no worse than the twin.
    for got, twin in zip(r["vs64"], r["twin_vs64"]):
        assert got < 2e-2 and got < 1.5 * twin + 1e-3, r


@pytest.mark.parametrize("backend", ["aot", "inductor"])
def test_interpreter_relu2_mlp_op_under_torch_compile_fullgraph(mlp_interpreter_results, backend):
    r = mlp_interpreter_results["compiled-" + backend]
    assert max(r["vs_twin"]) < 2e-2, r
    assert r["dtypes"] == ["torch.bfloat16", "torch.float32", "torch.float32"]


def test_interpreter_compiled_graphs_keep_the_op_opaque(mlp_interpreter_results):
    fw, bw = mlp_interpreter_results["graphs"]["fw"], mlp_interpreter_results["graphs"]["bw"]
    assert fw.count("speedrun.relu2_mlp.default") == 1 and "aten.mm.default" not in fw, fw
    # Backward: the fused d pre kernel and the three cuBLAS matmuls (d x, d W_fc, d W_proj), no fourth
    # matmul for d h = d out @ W_proj and no pointwise relu² backward.
    assert bw.count("speedrun.relu2_mlp_grad_pre.default") == 1 and bw.count("aten.mm.default") == 3, bw
    aten = [op for op in bw if op.startswith("aten.")]
    assert not any(name in op for op in aten for name in ("relu", "threshold", "sqrt", "pow")), bw


@pytest.mark.parametrize("op", ["relu2_mlp", "relu2_mlp_grad_pre"])
def test_interpreter_torch_library_opcheck(mlp_interpreter_results, op):
    result = mlp_interpreter_results["opcheck"][op]
    assert result and set(result.values()) == {"SUCCESS"}, result


def test_interpreter_relu2_mlp_rejects_fp32(mlp_interpreter_results):
    err = mlp_interpreter_results["fp32_error"]
    assert "relu2_mlp: kernel='triton' needs bf16 or fp16 activations" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------
# GPU: the fused MLP at record sizes, and the model with fused_mlp on vs off
# ------------------------------------------------------------------------------------------------
def autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind t."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            stack.extend(f for f, _ in fn.next_functions)
    return {fn.name() for fn in seen}


def _skip_if_interpreting():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")


def _gpu_mlp_inputs(T: int = 32768, d: int = 768, H: int = 3072):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
    # The record's c_fc init scale for both matrices (the record zero-initialises c_proj: no signal).
    bound = 3**0.5 * 0.5 * d**-0.5
    w_fc = (torch.rand(d, H, device="cuda", generator=gen) * 2 - 1) * bound
    w_proj = (torch.rand(d, H, device="cuda", generator=gen) * 2 - 1) * bound
    g = torch.randn(T, d, device="cuda", generator=gen).bfloat16()
    return x, w_fc, w_proj, g


@pytest.mark.gpu
def test_gpu_fused_kernels_record_size():
    _skip_if_interpreting()
    from speedrun.kernels.relu2_mlp import matmul_relu2, matmul_relu2_grad

    x, w_fc, w_proj, g = _gpu_mlp_inputs()
    w_fc, w_proj = w_fc.bfloat16(), w_proj.bfloat16()
    pre = x.float() @ w_fc.float()
    h = matmul_relu2(x, w_fc)
    assert h.dtype == torch.bfloat16 and h.shape == (32768, 3072)
    assert rel(h, pre.clamp_min(0).square()) < 5e-3
    want = (g.float() @ w_proj.float()) * 2 * h.float().sqrt()
    grad_pre = matmul_relu2_grad(g, w_proj, h)
    assert grad_pre.dtype == torch.bfloat16 and rel(grad_pre, want) < 5e-3
    assert bool((grad_pre[h == 0] == 0).all())


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_relu2_mlp_matches_twin_record_size(compiled):
    _skip_if_interpreting()
    torch._dynamo.reset()
    x, w_fc, w_proj, g = _gpu_mlp_inputs()

    def fused(xx, ff, pp):
        return relu2_mlp(xx, ff, pp, kernel="triton")

    fn = torch.compile(fused, fullgraph=True) if compiled else fused
    results = []
    for f in (fn, relu2_mlp_reference):
        leaves = [t.clone().requires_grad_() for t in (x, w_fc, w_proj)]
        out = f(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, g)))
    (out, gx, gf, gp), (want, wgx, wgf, wgp) = results
    assert [t.dtype for t in (out, gx, gf, gp)] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    assert rel(out, want) < 1e-2
    assert rel(gx, wgx) < 2e-2 and rel(gf, wgf) < 2e-2 and rel(gp, wgp) < 2e-2
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_model_fused_mlp_matches_plain(compiled):
    """model.fused_mlp (the custom op in every block) vs the plain MLP: same summed loss and gradients
    within bf16 noise, eager and under regional compilation (mirrors the fused-loss test in
    test_model_gpu.py)."""
    _skip_if_interpreting()
    torch._dynamo.reset()
    dev = torch.device("cuda")
    kw = dict(num_layers=4, no_attention_layers=[], long_window_layers=[3],
              value_embed_layers=[0, -1, -1, 0], skip_from_layer=1, skip_to_layer=2, backout_layer=2)
    torch.manual_seed(0)
    models = {fused: GPT(ModelConfig(**kw, fused_mlp=fused), torch.bfloat16).to(dev) for fused in (False, True)}
    with torch.no_grad():   # non-zero outputs so every path carries signal
        for p in models[False].parameters():
            if p.label in ("lm_head", "mlp_proj", "attn_gate", "smear_gate"):
                p.normal_(0, 0.02)
    models[True].load_state_dict(models[False].state_dict())
    T = 8192
    g = torch.Generator(device=dev).manual_seed(2)
    ids = torch.randint(0, 50256, (T,), device=dev, generator=g, dtype=torch.int32)
    targets = torch.randint(0, 50256, (T,), device=dev, generator=g)
    starts = torch.arange(0, T, 700, dtype=torch.int32, device=dev)  # documents of 700 tokens
    cu = torch.cat([starts, torch.full((128 - starts.numel(),), T, dtype=torch.int32, device=dev)])
    results = {}
    for fused, model in models.items():
        if compiled:
            model.compile_regions()
        loss = model(ids, targets, cu)
        if not compiled:  # the op's autograd node is in the graph (compiled: one node per region)
            assert ("GeneratedBackwardFor_speedrun_relu2_mlp_defaultBackward" in autograd_nodes(loss)) == fused
        loss.backward()
        grads = [model.blocks[i].mlp.c_fc.grad for i in (0, 3)] + [model.blocks[i].mlp.c_proj.grad for i in (0, 3)]
        assert all(gr.dtype == torch.float32 for gr in grads)
        results[fused] = [loss.detach().float()] + [gr.float().clone() for gr in grads] + \
                         [model.embed.weight.grad.float().clone()]
    for got, want in zip(results[True], results[False]):
        assert rel(got, want) < 2e-2
    torch._dynamo.reset()
