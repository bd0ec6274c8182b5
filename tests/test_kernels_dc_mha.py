"""Tests for speedrun.kernels.dc_mha (lightweight DC-MHA): the twin against a float64 loop over
queries and hand-written backward formulas (r89-attention.md 5.2-5.3), the Triton kernels against
the twin in Triton's interpreter (a subprocess, small shapes), and on the GPU at record 89's shape.

GPU: python -m pytest tests/test_kernels_dc_mha.py -m gpu -q
"""
from __future__ import annotations

import os
import textwrap
import time

import pytest
import torch
from kernel_helpers import run_interpreted  # noqa: E402

from speedrun.kernels.dc_mha import dc_mha, dc_mha_reference


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def loop_reference(y, q, k, v, w1, w2, doc, window):
    """Float64, one query at a time: each head's softmax over the window's keys, their w1-mix,
    each head's values read through it, scaled by w2."""
    T, H, D = q.shape
    out = y.double().clone()
    for t in range(T):
        keys = [j for j in range(max(0, t - window + 1), t + 1) if doc[j] == doc[t]]
        mix = torch.zeros(len(keys), dtype=torch.float64)
        for h in range(H):
            p = torch.softmax(torch.stack([q[t, h].double() @ k[j, h].double() for j in keys]), 0)
            mix += w1[t, h].double() * p
        for h in range(H):
            out[t, h] += w2[t, h].double() * (mix[:, None] * v[keys, h].double()).sum(0)
    return out


def formula_grads(q, k, v, w1, w2, doc, window, g):
    """(dq, dk, dv, dw1, dw2) from the backward formulas, written out in float64 (no autograd)."""
    q, k, v, w1, w2, g = (t.double() for t in (q, k, v, w1, w2, g))
    T = q.shape[0]
    pos = torch.arange(T)
    delta = pos[:, None] - pos[None, :]
    valid = (delta >= 0) & (delta < window) & (doc[:, None] == doc[None, :])
    P = torch.einsum("thd,jhd->htj", q, k).masked_fill(~valid, float("-inf")).softmax(-1)
    A = torch.einsum("th,htj->tj", w1, P)
    dM = torch.einsum("thd,jhd->htj", g, v) * valid
    dw2 = torch.einsum("htj,tj->th", dM, A)
    dA = torch.einsum("th,htj->tj", w2, dM)
    dv = torch.einsum("th,tj,thd->jhd", w2, A, g)
    dw1 = torch.einsum("tj,htj->th", dA, P)
    dS = P * (w1.T[:, :, None] * dA[None] - (w1 * dw1).T[:, :, None])
    return torch.einsum("htj,jhd->thd", dS, k), torch.einsum("htj,thd->jhd", dS, q), dv, dw1, dw2


def inputs(T, H, D, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, y, g = (torch.randn(T, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(5))
    w1, w2 = (torch.randn(T, H, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    return y, q, k, v, w1, w2, g


# documents crossing the window: 0..5 | 6..8 | 9..22, and T = 23 is no multiple of any tile
DOC = torch.tensor([0] * 6 + [1] * 3 + [2] * 14, dtype=torch.int32)


@pytest.mark.parametrize("window", [1, 4, 112])
def test_twin_matches_loop_and_backward_formulas(window):
    y, q, k, v, w1, w2, g = inputs(23, 3, 8)
    leaves = [t.clone().requires_grad_() for t in (y, q, k, v, w1, w2)]
    out = dc_mha_reference(*leaves, DOC, window)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, loop_reference(y, q, k, v, w1, w2, DOC, window), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out, leaves, g)
    torch.testing.assert_close(grads[0], g)                  # the base passes straight through
    for got, want in zip(grads[1:], formula_grads(q, k, v, w1, w2, DOC, window, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_window_one_reads_only_the_own_value():
    """W = 1: each softmax is the query's own key, so A = sum(w1) and out = y + w2 sum(w1) v."""
    y, q, k, v, w1, w2, _ = inputs(10, 2, 4)
    out = dc_mha_reference(y, q, k, v, w1, w2, None, 1)
    torch.testing.assert_close(out, y + (w2 * w1.sum(1, keepdim=True))[..., None] * v)


def test_zero_w2_is_the_identity_but_still_has_a_gradient():
    """Record 89 starts with w2 = 0: the output is y exactly, yet d out / d w2 is not zero."""
    y, q, k, v, w1, w2, g = inputs(16, 2, 4)
    w2 = torch.zeros_like(w2, requires_grad=True)
    out = dc_mha_reference(y, q, k, v, w1, w2, DOC[:16], 5)
    assert torch.equal(out, y)
    (dw2,) = torch.autograd.grad(out, w2, g)
    assert dw2.abs().min() > 0


def test_decoding_form_equals_the_last_rows():
    """Queries given as the last Tq of Tk key positions (the KV-cache decoder) = those rows of the
    full computation; per-layer (1, H) weights broadcast over the tokens."""
    y, q, k, v, w1, w2, _ = inputs(23, 3, 8)
    w1, w2 = w1[:1], w2[:1]
    full = dc_mha_reference(y, q, k, v, w1, w2, DOC, 6)
    part = dc_mha_reference(y[17:], q[17:], k[9:], v[9:], w1, w2, DOC[9:], 6)
    torch.testing.assert_close(part, full[17:], rtol=1e-12, atol=1e-12)


def test_dispatch_on_cpu_and_errors():
    y, q, k, v, w1, w2, _ = (t.float() for t in inputs(20, 2, 16))
    want = dc_mha_reference(y, q, k, v, w1, w2, DOC[:20], 5)
    assert torch.equal(dc_mha(y, q, k, v, w1, w2, DOC[:20], 5), want)
    with pytest.raises(ValueError, match="kernel must be one of"):
        dc_mha(y, q, k, v, w1, w2, DOC[:20], 5, kernel="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="kernel='triton' needs CUDA tensors"):
            dc_mha(y, q, k, v, w1, w2, DOC[:20], 5, kernel="triton")


# ------------------------------------------------------------------------------------------------
# the Triton kernels in the interpreter (subprocess, small shapes)
# ------------------------------------------------------------------------------------------------
INTERPRETER_SCRIPT = textwrap.dedent(
    r"""
    from speedrun.kernels.dc_mha import dc_mha, dc_mha_fwd

    def err(a, b):   # relative, or absolute where the reference is 0 (W = 1: dq = dk = 0)
        return rel(a, b) if b.double().norm() > 0 else a.double().norm().item()

    out = {}
    gen = torch.Generator().manual_seed(0)
    T = 37                                  # 3 query tiles, the last one ragged
    doc = torch.tensor([-1] * 3 + [0] * 10 + [1] * 2 + [2] * 22, dtype=torch.int32)
    for dtype, H, D, W in (("float32", 2, 16, 5), ("float32", 3, 32, 20), ("float32", 2, 16, 1),
                           ("bfloat16", 2, 16, 17)):
        dt = getattr(torch, dtype)
        y, q, k, v, g = (torch.randn(T, H, D, generator=gen).to(dt) for _ in range(5))
        w1, w2 = (torch.randn(T, H, generator=gen).to(dt) for _ in range(2))
        results = []
        for kernel in ("triton", "torch"):
            leaves = [t.clone().requires_grad_() for t in (y, q, k, v, w1, w2)]
            o = dc_mha(*leaves, doc, W, kernel=kernel)
            results.append([o] + list(torch.autograd.grad(o, leaves, g)))
        key = f"{dtype}-H{H}-D{D}-W{W}"
        out[key] = {name: err(a, b) for name, a, b in zip(("out", "dy", "dq", "dk", "dv", "dw1", "dw2"),
                                                          *results)}
        out[key]["dtypes"] = [str(t.dtype) for t in results[0]]

    # per-layer (1, H) weights: expanded inside, their gradients summed over the tokens
    y, q, k, v = (torch.randn(T, 2, 16, generator=gen) for _ in range(4))
    w1, w2 = (torch.randn(1, 2, generator=gen).requires_grad_() for _ in range(2))
    grads = [torch.autograd.grad(dc_mha(y, q, k, v, w1, w2, doc, 7, kernel=kern).sum(), (w1, w2))
             for kern in ("triton", "torch")]
    out["broadcast"] = dict(shape=list(grads[0][0].shape), dw1=rel(grads[0][0], grads[1][0]),
                            dw2=rel(grads[0][1], grads[1][1]))

    # the custom op's fake function, schema and autograd registration (torch.library.opcheck)
    args = [t.requires_grad_() for t in (y, q, k, v, torch.randn(T, 2, generator=gen),
                                          torch.randn(T, 2, generator=gen))]
    torch.library.opcheck(dc_mha_fwd, (*args, doc, 7))
    out["opcheck"] = True
    # the warm-up helper's call: runs both kernels (here: interpreted) where they can run
    from speedrun.kernels.dc_mha import warm_kernels
    out["warm"] = [warm_kernels(2, 16, 5, torch.float32, "cpu"), warm_kernels(2, 24, 5, torch.float32, "cpu")]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("dc_mha"))


@pytest.mark.parametrize("key", ["float32-H2-D16-W5", "float32-H3-D32-W20", "float32-H2-D16-W1",
                                 "bfloat16-H2-D16-W17"])
def test_triton_interpreter_matches_twin(interpreted, key):
    r = interpreted[key]
    dtype = key.split("-")[0]
    assert r["dtypes"] == [f"torch.{dtype}"] * 7
    assert r["dy"] == 0.0
    # fp32: the same maths up to summation order; bf16: w2 A and dS are rounded to bf16 before
    # their matmuls in the kernel (the twin keeps fp32), a few bf16 ulps
    tol = 1e-5 if dtype == "float32" else 2e-2
    for name in ("out", "dq", "dk", "dv", "dw1", "dw2"):
        assert r[name] < tol, (name, r)


def test_triton_interpreter_broadcast_weights_and_opcheck(interpreted):
    b = interpreted["broadcast"]
    assert b["shape"] == [1, 2] and b["dw1"] < 1e-5 and b["dw2"] < 1e-5
    assert interpreted["opcheck"]


def test_warm_kernels_runs_them_only_where_they_can_run(interpreted):
    """warm_kernels (the warm-up helper's JIT compile): runs both kernels in the interpreter (its
    CUDA effect, a Triton cache hit in the next process, is in docs/benchmarks.md); a head width
    the kernels do not take, or a CPU without the interpreter, runs nothing."""
    from speedrun.kernels.dc_mha import warm_kernels
    assert interpreted["warm"] == [True, False]
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        assert warm_kernels(2, 16, 5, torch.float32, "cpu") is False


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels at record 89's shape (6 heads of 128, window 112, bf16)
# ------------------------------------------------------------------------------------------------
def gpu_case(T, seed=0, dtype=torch.bfloat16):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    rms = torch.nn.functional.rms_norm
    q, k = (rms(torch.randn(T, 6, 128, device=dev, generator=gen), (128,)) for _ in range(2))
    q = q * 0.12                                                 # the softmax scale, folded in
    v, y, g = (torch.randn(T, 6, 128, device=dev, generator=gen) for _ in range(3))
    w1 = rms(torch.randn(T, 6, device=dev, generator=gen), (6,))
    w2 = torch.randn(T, 6, device=dev, generator=gen) * 0.5
    lengths = torch.randint(50, 900, (T // 50,), device=dev, generator=gen)
    starts = torch.cumsum(lengths, 0)
    doc = torch.zeros(T, dtype=torch.int32, device=dev)
    doc[starts[starts < T]] = 1
    doc = torch.cumsum(doc, 0).to(torch.int32)
    return [t.to(dtype) for t in (y, q, k, v, w1, w2, g)] + [doc]


def run_both(fns, tensors, doc):
    *args, g = tensors
    results = []
    for fn in fns:
        leaves = [t.detach().clone().requires_grad_() for t in args]
        out = fn(*leaves, doc)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, g)))
    return results


@pytest.mark.gpu
@pytest.mark.parametrize("T", [4096, 8192 + 48])
def test_gpu_kernel_matches_twin(T):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    *tensors, doc = gpu_case(T)
    triton_out, twin_out = run_both([lambda *a: dc_mha(*a, 112, kernel=kern) for kern in ("triton", "torch")],
                                    tensors, doc)
    for name, a, b in zip(("out", "dy", "dq", "dk", "dv", "dw1", "dw2"), triton_out, twin_out):
        assert a.dtype == b.dtype == torch.bfloat16
        assert rel(a, b) < 2e-2, (name, rel(a, b))


@pytest.mark.gpu
def test_gpu_kernel_in_fp32_compiles_fast_and_matches_float64():
    """fp32 inputs at the record's shape (6 heads of 128, window 112): the kernels (TF32x3 products)
    compile in about a minute (65 s on an H200: the six heads are unrolled, each dot three passes),
    not the > 6 minutes of fp32 "ieee" dots that never finished, and agree with the float64 twin."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    *tensors, doc = gpu_case(4096, dtype=torch.float32)
    t0 = time.perf_counter()
    got = run_both([lambda *a: dc_mha(*a, 112, kernel="triton")], tensors, doc)[0]
    seconds = time.perf_counter() - t0
    want = run_both([lambda *a: dc_mha(*a, 112, kernel="torch")], [t.double() for t in tensors], doc)[0]
    diffs = {name: rel(a.double(), b) for name, a, b in zip(("out", "dy", "dq", "dk", "dv", "dw1", "dw2"), got, want)}
    print(f"\nfp32 DC-MHA kernels: first call (compile) {seconds:.1f} s; rel. diff vs float64 {diffs}")
    assert seconds < 150, seconds
    assert all(a.dtype == torch.float32 for a in got)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.gpu
def test_gpu_opcheck_and_compiled_fullgraph():
    """The custom ops pass opcheck with the real kernels, and a compiled function (fullgraph) with
    DC inside matches the eager twin: the op traces without a graph break."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET is set in this process")
    from speedrun.kernels.dc_mha import dc_mha_bwd, dc_mha_fwd
    *tensors, doc = gpu_case(2048, seed=1)
    y, q, k, v, w1, w2, g = tensors
    torch.library.opcheck(dc_mha_fwd, (y, q.requires_grad_(), k, v, w1, w2, doc, 112))
    with torch.no_grad():
        _, lse = dc_mha_fwd(y, q, k, v, w1, w2, doc, 112)
    torch.library.opcheck(dc_mha_bwd, (g, q.detach(), k, v, w1, w2, doc, lse, 112))

    def layer(y, q, k, v, w1, w2, doc, kernel="auto"):   # the model's use: scale in q, w1 normed
        w1 = torch.nn.functional.rms_norm(w1.float(), (6,), eps=1e-6).bfloat16()
        return dc_mha(y * 1.0, q * 1.5, k, v, w1, w2, doc, 112, kernel=kernel) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    got, want = run_both([compiled, lambda *a: layer(*a, kernel="torch")], tensors, doc)
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-2
    torch._dynamo.reset()
