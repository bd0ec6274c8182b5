"""GPU tests of the model (skipped without CUDA): the attention backends agree in bf16 (flex,
sdpa twin, flash when importable), forward and backward; the regionally compiled record model
agrees with the eager twin and does not recompile when windows change.

Run on the GPU machine: python -m pytest tests/test_model_gpu.py tests/test_model_fp8.py -m gpu -q
(-s prints the record-89 attention model's max differences compiled vs the eager twin)
"""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from kernel_helpers import small_gpu_model  # noqa: E402

from speedrun.config import ModelConfig, Window
from speedrun.model import GPT
from speedrun.model import attention as A

pytestmark = pytest.mark.gpu


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fused_and_plain(cfg, model, params, *args, **kwargs) -> dict:
    """{fused: (summed training loss, the gradients of params)} with model.fused_loss off, then on,
    for the same batch (``model(*args, **kwargs)``)."""
    results = {}
    for fused in (False, True):
        cfg.fused_loss = fused
        model.zero_grad(set_to_none=True)
        loss = model(*args, **kwargs)
        loss.backward()
        results[fused] = (loss.detach().float(), *(p.grad.float().clone() for p in params))
    return results


def packed_docs(T, mean_len, device, seed=0, pad_to=128):
    """cu_seqlens of random documents (lengths ~ exponential, mean mean_len), padded with T."""
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.empty(pad_to).exponential_(1 / mean_len, generator=g).long() + 1).clamp(max=2048)
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), lengths]), 0)
    starts = starts[starts < T][:pad_to - 1]
    cu = torch.cat([starts, torch.full((pad_to - starts.numel(),), T)])
    return cu.to(torch.int32).to(device)


def run_backend(backend, q, k, v, cu, window_tokens, scale):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    doc = A.build_doc_info(cu, q.shape[0], q.device, backend)
    win = A.build_window(doc, torch.tensor(window_tokens, dtype=torch.int32, device=q.device), window_tokens)
    out = A.attend(q, k, v, doc, win, scale, backend)
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device,
                    generator=torch.Generator(device=out.device).manual_seed(5))
    out.backward(g)
    return out, q.grad, k.grad, v.grad


@pytest.mark.parametrize("window_tokens", [128, 384, 896, 1408])
def test_backends_agree_bf16(window_tokens):
    dev = torch.device("cuda")
    T, H, D = 8192, 6, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (F.rms_norm(torch.randn(T, H, D, device=dev, generator=g), (D,)).bfloat16() for _ in range(3))
    cu = packed_docs(T, 700, dev)
    scale = torch.tensor(0.12, device=dev)
    backends = ["sdpa", "flex"] + (["flash"] if A.flash_attn_impl() is not None else [])
    results = {b: run_backend(b, q, k, v, cu, window_tokens, scale) for b in backends}
    ref = results["sdpa"]
    for b in backends[1:]:
        for got, want, name in zip(results[b], ref, ("out", "dq", "dk", "dv")):
            assert rel(got, want) < 2e-2, f"{b} {name} window {window_tokens}: rel {rel(got, want)}"


def test_flash_requested_but_missing_is_clear():
    if A.flash_attn_impl() is not None:
        pytest.skip("a FlashAttention package is installed")
    with pytest.raises(RuntimeError, match="flash_attn_interface"):
        A.resolve_backend("flash", torch.device("cuda"))


def test_compiled_record_model_matches_eager_and_never_recompiles():
    """Record config in bf16, T=16384: compiled regions (flex) vs eager twin (sdpa), then window
    changes through every stage with no new graphs."""
    torch._dynamo.reset()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = GPT(cfg, torch.bfloat16).to(dev)
    with torch.no_grad():   # non-zero outputs so every path carries signal
        for p in model.parameters():
            if p.label in ("lm_head", "mlp_proj", "attn_gate", "smear_gate"):
                p.normal_(0, 0.02)
    T = 16384
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, 50256, (T,), device=dev, generator=g, dtype=torch.int32)
    targets = torch.randint(0, 50256, (T,), device=dev, generator=g)
    cu = packed_docs(T, 700, dev)
    model.set_window(Window(1, 3))
    model.set_window(Window(3, 7))

    cfg.attention_backend = "sdpa"
    with torch.no_grad():
        eager = model(ids, targets, cu, reduction="mean")
    cfg.attention_backend = "flex"
    model.compile_regions()
    with torch.no_grad():
        compiled = model(ids, targets, cu, reduction="mean")
    assert abs(compiled.item() - eager.item()) < 2e-2 * eager.item()

    from torch._dynamo.utils import counters
    model.train()
    model(ids, targets, cu).backward()
    graphs = counters["stats"]["unique_graphs"]
    for long in (11, 13):
        model.set_window(Window(long // 2, long))
        model(ids, targets, cu).backward()
    assert counters["stats"]["unique_graphs"] == graphs, "window change recompiled"
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_training_loss_matches_plain(compiled):
    """model.fused_loss (Triton softcapped CE on the bf16 logits) vs the plain softcap + F.cross_entropy:
    same summed loss and same gradients within bf16 noise, eager and under regional compilation."""
    torch._dynamo.reset()
    cfg, model, ids, targets = small_gpu_model(T=8192)
    cu = packed_docs(8192, 700, ids.device)
    if compiled:
        model.compile_regions()
    results = fused_and_plain(cfg, model, (model.lm_head.weight, model.embed.weight), ids, targets, cu)
    for got, want in zip(results[True], results[False]):
        assert rel(got, want) < 2e-2
    torch._dynamo.reset()


def test_compiled_flash_model_matches_flex():
    """The record model compiled with the flash backend (FA4: custom ops traced into the blocks;
    FA3: a graph break) gives flex's training loss and gradients, with documents capped at
    max_doc_len, at two window stages, and the second stage compiles nothing new."""
    if A.flash_attn_impl() is None:
        pytest.skip("no FlashAttention package importable")
    torch._dynamo.reset()
    cfg, model, ids, targets = small_gpu_model(T=8192)
    cu = packed_docs(8192, 700, ids.device)
    model.max_doc_len = 2048
    cfg.attention_backend = "flash"     # compile_regions allows FA3's graph break only for flash
    model.compile_regions()
    from torch._dynamo.utils import counters
    graphs = []
    for long, short in ((3, 1), (11, 5)):
        model.set_window(Window(short, long))
        results = {}
        for backend in ("flex", "flash"):
            cfg.attention_backend = backend
            model.zero_grad(set_to_none=True)
            loss = model(ids, targets, cu)
            loss.backward()
            results[backend] = [loss.detach().float()] + [p.grad.float().clone() for p in model.parameters()
                                                          if p.grad is not None]
        assert len(results["flash"]) == len(results["flex"])
        for got, want in zip(results["flash"], results["flex"]):
            if want.norm() == 0:
                assert got.norm() == 0
                continue
            assert rel(got, want) < 3e-2, f"window {long}/{short}: rel {rel(got, want)}"
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0], "a window change recompiled"
    torch._dynamo.reset()


@pytest.mark.parametrize("window", [384, 4096])
def test_fa4_custom_ops_pass_opcheck_on_gpu(window):
    """With the real FlashAttention-4: the custom ops' fake functions, schema and autograd
    registration agree with the kernels (torch.library.opcheck, forward and backward op), and the
    op matches the package's own autograd.Function, for a window inside the documents' bound and
    one past it (which we pass as the bound, FA4's own call as unbounded)."""
    if A.flash_attn_impl() != "fa4":
        pytest.skip("FlashAttention-4 not importable")
    from flash_attn.cute import flash_attn_varlen_func

    from speedrun.model import flash
    dev = torch.device("cuda")
    T, H, D = 4096, 6, 128
    g = torch.Generator(device=dev).manual_seed(3)
    q, k, v = (F.rms_norm(torch.randn(T, H, D, device=dev, generator=g), (D,)).bfloat16().requires_grad_()
               for _ in range(3))
    cu = F.pad(packed_docs(T, 700, dev), (1, 0))
    host_window = torch.tensor(window)
    torch.library.opcheck(flash.fa4_varlen_fwd, (q, k, v, cu, 2048, host_window))
    dout = torch.randn(T, H, D, device=dev, generator=g).bfloat16()
    with torch.no_grad():
        out, lse = flash.fa4_varlen_fwd(q, k, v, cu, 2048, host_window)
    torch.library.opcheck(flash.fa4_varlen_bwd, (dout, q.detach(), k.detach(), v.detach(), out, lse, cu, 2048,
                                                 host_window))
    ours = flash.flash_varlen(q, k, v, cu, 2048, host_window, "fa4")
    grads = torch.autograd.grad(ours, (q, k, v), dout)
    theirs = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=2048,
                                    max_seqlen_k=2048, softmax_scale=1.0, causal=True,
                                    window_size=(window if window < 2048 else None, 0))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    want = torch.autograd.grad(theirs, (q, k, v), dout)
    assert rel(ours, theirs) < 1e-3
    for a, b in zip(grads, want):
        assert rel(a, b) < 1e-2   # dq accumulates with atomics: not bit-stable


# ---- record 89's attention ------------------------------------------------------------------------
R89_ATTENTION = dict(paired_head_layers=[0, 2, 5, 9], key_offset=True, xsa_layers=[1, 3, 4, 7], dc_layers=[10],
                     attn_out_gate_layers=[3, 10], attn_lambdas=True)


@pytest.mark.parametrize("window_tokens", [128, 1408])
def test_paired_stream_backends_agree_bf16(window_tokens):
    """A paired layer's 2T-row stream (documents doubled, window in stream rows): flex's block
    sparsity for 2T and flash's doubled cu_seqlens / max_seqlen give the sdpa twin's attention."""
    dev = torch.device("cuda")
    T, H, D = 8192, 6, 128
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (A.to_stream(F.rms_norm(torch.randn(T, H, D, device=dev, generator=g), (D,)).bfloat16())
               for _ in range(3))
    cu = packed_docs(T, 700, dev)
    backends = ["sdpa", "flex"] + (["flash"] if A.flash_attn_impl() is not None else [])
    results = {}
    for b in backends:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        doc = A.stream_doc_info(A.build_doc_info(cu, T, dev, b, 2048))
        win = A.build_window(doc, torch.tensor(window_tokens, dtype=torch.int32, device=dev), window_tokens)
        out = A.attend(*leaves, doc, win, torch.tensor(0.12, device=dev), b)
        grad = torch.randn(out.shape, dtype=out.dtype, device=dev, generator=torch.Generator(device=dev).manual_seed(5))
        results[b] = [out] + list(torch.autograd.grad(out, leaves, grad))
    for b in backends[1:]:
        for got, want, name in zip(results[b], results["sdpa"], ("out", "dq", "dk", "dv")):
            assert rel(got, want) < 2e-2, f"{b} {name}: rel {rel(got, want)}"


def r89_record_model(dev):
    """The record config with every record-89 attention switch on, bf16 (FP8 head off: its noise
    would hide attention's), the zero-initialized parts and the attention coefficients moved off
    their initial values so XSA, DC and the gates all act."""
    torch.manual_seed(0)
    cfg = ModelConfig(fp8_head=False, **R89_ATTENTION)
    model = GPT(cfg, torch.bfloat16).to(dev)
    with torch.no_grad():
        for p in model.parameters():
            if p.label in ("lm_head", "mlp_proj", "attn_gate", "smear_gate"):
                p.normal_(0, 0.02)
        for block in model.blocks:
            if block.attn is not None:
                block.attn.qkvo.view(4, 768, 768)[3].normal_(0, 0.02)   # a non-zero Wo
        g = torch.Generator(device=dev).manual_seed(4)
        c = model.gate_constants.values
        c.add_(torch.randn(c.shape, device=dev, generator=g) * 0.3)
        lay = model.layout
        lam = model.scalars[lay.attn:lay.attn + 2 * cfg.num_layers]
        lam.add_(torch.randn(lam.shape, device=dev, generator=g) * 0.1)
    return cfg, model


def loss_and_grads(model, ids, targets, cu):
    model.zero_grad(set_to_none=True)
    loss = model(ids, targets, cu)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                   if p.grad is not None}


@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_compiled_r89_attention_model_matches_eager_twin_and_never_recompiles(backend):
    """Every record-89 attention switch on, T=8192: the regionally compiled model (flex or FA4
    custom ops, DC through its Triton custom ops) against the eager plain twin (sdpa, DC twin):
    training loss and every gradient (max differences printed: run with -s), then the later
    window stages and an eval forward compile nothing new after the warm-up (a training step and
    an eval forward at the first stage)."""
    if backend == "flash" and A.flash_attn_impl() != "fa4":
        pytest.skip("FlashAttention-4 not importable")
    torch._dynamo.reset()
    dev = torch.device("cuda")
    cfg, eager = r89_record_model(dev)
    T = 8192
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, 50256, (T,), device=dev, generator=g, dtype=torch.int32)
    targets = torch.randint(0, 50256, (T,), device=dev, generator=g)
    cu = packed_docs(T, 700, dev)
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        m.max_doc_len = 2048
        m.set_window(Window(1, 3))
        m.set_window(Window(3, 7))
    eager.cfg = dataclasses.replace(cfg, attention_backend="sdpa", fused_dc=False)
    for block in eager.blocks:
        if block.attn is not None:
            block.attn.dc_kernel = "torch"
    compiled.cfg = dataclasses.replace(cfg, attention_backend=backend)
    compiled.compile_regions()
    want_loss, want = loss_and_grads(eager, ids, targets, cu)
    got_loss, got = loss_and_grads(compiled, ids, targets, cu)
    print(f"\n[r89 attention, {backend} compiled vs sdpa + DC twin eager, T={T}] loss {got_loss.item():.6f} vs "
          f"{want_loss.item():.6f} (abs diff {abs(got_loss - want_loss).item():.2e})")
    assert got.keys() == want.keys()
    worst = 0.0
    for name in want:
        r, a = rel(got[name], want[name]), (got[name] - want[name]).abs().max().item()
        print(f"  {name:32s} max abs diff {a:.3e}  rel (norm) diff {r:.3e}")
        if want[name].norm() > 0:
            worst = max(worst, r)
    assert abs(got_loss - want_loss) < 1e-2 * want_loss
    assert worst < 5e-2, worst
    # warm-up done with an eval forward of the first stage; later stages compile nothing
    from torch._dynamo.utils import counters
    compiled.eval()
    with torch.no_grad():
        compiled(ids, targets, cu, reduction="mean")
    compiled.train()
    graphs = counters["stats"]["unique_graphs"]
    for short, long in ((5, 11), (6, 13)):
        compiled.set_window(Window(short, long))
        loss_and_grads(compiled, ids, targets, cu)
        compiled.eval()
        with torch.no_grad():
            compiled(ids, targets, cu, reduction="mean")
        compiled.train()
    print(f"  graphs after warm-up: {graphs}, after two more window stages: {counters['stats']['unique_graphs']}")
    assert counters["stats"]["unique_graphs"] == graphs, "a window change recompiled"
    torch._dynamo.reset()
