"""Attention: document ids, FlexAttention block sparsity vs the token mask, backends' agreement
(flex eager vs sdpa on CPU), the layer's pieces vs a direct computation, backend selection."""
import pytest
import torch
import torch.nn.functional as F

from speedrun.model import attention as A
from speedrun.model.rotary import Rotary, apply_rotary

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def random_cu_seqlens(T, num_docs, pad_to, gen):
    starts = torch.randperm(T - 1, generator=gen)[:num_docs - 1].sort().values + 1
    cu = torch.cat([torch.zeros(1, dtype=torch.long), starts, torch.tensor([T])])
    return F.pad(cu, (0, pad_to - cu.numel()), value=T).to(torch.int32)


def test_doc_ids_from_cu_seqlens():
    cu = torch.tensor([0, 3, 7, 10, 10, 10], dtype=torch.int32)
    doc = A.build_doc_info(cu, 10, torch.device("cpu"), "sdpa")
    assert doc.doc_ids.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    assert doc.doc_ids.dtype == torch.int32
    # a segment starting mid-document: leading tokens are their own document
    doc = A.build_doc_info(torch.tensor([4, 10, 10], dtype=torch.int32), 10, torch.device("cpu"), "flash")
    assert doc.doc_ids.tolist() == [-1] * 4 + [0] * 6
    assert doc.cu_seqlens.tolist() == [0, 4, 10, 10]
    one = A.build_doc_info(None, 6, torch.device("cpu"), "flash")
    assert one.doc_ids.tolist() == [0] * 6 and one.cu_seqlens.tolist() == [0, 6]


def test_dense_mask_semantics():
    doc_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1], dtype=torch.int32)
    m = A.dense_mask(doc_ids, 2)
    for i in range(7):
        for j in range(7):
            assert m[i, j] == (doc_ids[i] == doc_ids[j] and j <= i and i - j <= 2)
    assert m[3, 1] and not m[3, 0]          # window 2: keys i-2..i


@pytest.mark.parametrize("T,block,window", [(256, 16, 48), (256, 16, 20), (200, 16, 33),
                                            (512, 32, 100), (128, 16, 1 << 30), (96, 16, 0)])
def test_flex_block_tensors_match_token_mask(T, block, window):
    gen = torch.Generator().manual_seed(T + block + window % 1000)
    cu = random_cu_seqlens(T, 6, 10, gen)
    doc = A.build_doc_info(cu, T, torch.device("cpu"), "flex")
    kv_num, kv_idx, full_num, full_idx = A.flex_block_tensors(doc.doc_ids, torch.tensor(window), block)
    n = -(-T // block)
    token = F.pad(A.dense_mask(doc.doc_ids, window), (0, n * block - T, 0, n * block - T))
    blocks = token.view(n, block, n, block).permute(0, 2, 1, 3)
    valid = F.pad(torch.ones(T, T, dtype=torch.bool), (0, n * block - T, 0, n * block - T))
    vblocks = valid.view(n, block, n, block).permute(0, 2, 1, 3)
    any_ok = blocks.any(-1).any(-1)
    all_ok = (blocks | ~vblocks).all(-1).all(-1) & any_ok
    partial_listed = torch.zeros(n, n, dtype=torch.bool)
    full_listed = torch.zeros(n, n, dtype=torch.bool)
    for a in range(n):
        partial_listed[a, kv_idx[0, 0, a, :kv_num[0, 0, a]].long()] = True
        full_listed[a, full_idx[0, 0, a, :full_num[0, 0, a]].long()] = True
    assert not (partial_listed & full_listed).any()
    # every block holding an allowed pair is visited; a block marked full is entirely allowed
    assert torch.equal(partial_listed | full_listed, any_ok)
    assert not (full_listed & ~all_ok).any()
    # listed indices are ascending block order (stable), no duplicates
    for a in range(n):
        idx = kv_idx[0, 0, a, :kv_num[0, 0, a]].tolist()
        assert idx == sorted(set(idx))


def reference_attention(q, k, v, doc_ids, window, scale):
    """Per query, per head: softmax over the allowed keys, in float64 loops (the oracle)."""
    T, H, D = q.shape
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for i in range(T):
        keys = [j for j in range(i + 1) if doc_ids[j] == doc_ids[i] and i - j <= window]
        for h in range(H):
            s = torch.stack([q[i, h].double() @ k[j, h].double() for j in keys]) * scale
            p = torch.softmax(s, 0)
            out[i, h] = (p[:, None] * v[keys, h].double()).sum(0)
    return out


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_attend_matches_loop_oracle(backend):
    gen = torch.Generator().manual_seed(1)
    T, H, D = 48, 2, 16
    q, k, v = (torch.randn(T, H, D, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 10, 29, 48, 48], dtype=torch.int32)
    doc = A.build_doc_info(cu, T, torch.device("cpu"), backend)
    win = A.build_window(doc, torch.tensor(7, dtype=torch.int32), 7, block_size=16)
    out = A.attend(q, k, v, doc, win, torch.tensor(0.3), backend)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, doc.doc_ids, 7, 0.3),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [256, 208])
def test_flex_eager_agrees_with_sdpa(T):
    """Several documents, a short and a long window, T a multiple of the flex block and not."""
    gen = torch.Generator().manual_seed(T)
    H, D = 2, 32
    q, k, v = (torch.randn(T, H, D, generator=gen) for _ in range(3))
    cu = random_cu_seqlens(T, 5, 8, gen)
    for window in (16, 48):
        outs = []
        for backend in ("sdpa", "flex"):
            doc = A.build_doc_info(cu, T, torch.device("cpu"), backend)
            win = A.build_window(doc, torch.tensor(window, dtype=torch.int32), window, block_size=16)
            with torch.no_grad():
                outs.append(A.attend(q, k, v, doc, win, torch.tensor(0.12), backend))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert A.resolve_backend("auto", cpu) == "sdpa"
    assert A.resolve_backend("flex", cpu) == "flex"
    with pytest.raises(ValueError, match="expected one of"):
        A.resolve_backend("xformers", cpu)
    with pytest.raises(RuntimeError, match="CUDA"):
        A.resolve_backend("flash", cpu)


@pytest.mark.parametrize("capability, impl, head_dim, dtype, chosen", [
    ((9, 0), "fa4", 128, torch.bfloat16, "flash"), ((9, 0), "fa4", 64, torch.float16, "flash"),
    ((9, 0), "fa3", 128, torch.bfloat16, "flex"), ((9, 0), None, 128, torch.bfloat16, "flex"),
    ((8, 0), "fa4", 128, torch.bfloat16, "flex"), ((10, 0), "fa4", 128, torch.bfloat16, "flex"),
    ((9, 0), "fa4", 12, torch.bfloat16, "flex"), ((9, 0), "fa4", 264, torch.bfloat16, "flex"),
    ((9, 0), "fa4", 128, torch.float32, "flex"), ((9, 0), "fa4", None, None, "flex")])
def test_auto_backend_on_cuda(monkeypatch, capability, impl, head_dim, dtype, chosen):
    """auto takes FlashAttention-4 only where it was measured faster than flex (SM90) and its
    kernels take the model's head size and dtype."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(A, "flash_attn_impl", lambda: impl)
    A._fa4_on_hopper.cache_clear()
    cuda = torch.device("cuda", 0)
    try:
        assert A.resolve_backend("auto", cuda, head_dim, dtype) == chosen
        assert A.resolve_backend("flex", cuda, head_dim, dtype) == "flex"   # explicit stays
    finally:
        A._fa4_on_hopper.cache_clear()


@pytest.mark.parametrize("impl", ["fa3", "fa4"])
def test_flash_matches_sdpa_per_implementation(monkeypatch, impl):
    """Both FlashAttention implementations (faked: tests/flash_fakes.py) give the sdpa twin's output
    and gradients through ``attend``; a window reaching past max_seqlen is passed as max_seqlen (the
    same mask), never as "unbounded" (FA4 would JIT another kernel for it)."""
    import flash_fakes
    calls = []
    (flash_fakes.install_fa3 if impl == "fa3" else flash_fakes.install_fa4)(monkeypatch, calls)
    A.flash_attn_impl.cache_clear()
    try:
        gen = torch.Generator().manual_seed(4)
        T = 64
        q, k, v = (torch.randn(T, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
        cu = random_cu_seqlens(T, 4, 6, gen)
        for tokens in (T, 5):
            grads = []
            for backend in ("flash", "sdpa"):
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                doc = A.build_doc_info(cu, T, torch.device("cpu"), backend)
                assert doc.flash_impl == (impl if backend == "flash" else None)
                out = A.attend(*leaves, doc, A.build_window(doc, torch.tensor(tokens), tokens), 0.3, backend)
                out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
                grads.append([out.detach()] + [t.grad for t in leaves])
            for got, want in zip(*grads):
                torch.testing.assert_close(got, want)
        fwd = [w for kind, w in calls if kind == "fwd"]
        assert fwd == [T, 5]
    finally:
        A.flash_attn_impl.cache_clear()


def test_fa4_custom_ops_pass_opcheck(monkeypatch):
    """The FA4 custom ops' fake (meta) functions, schema and autograd registration agree with the
    real ones (torch.library.opcheck), on the faked package."""
    import flash_fakes

    from speedrun.model import flash
    flash_fakes.install_fa4(monkeypatch, [])
    gen = torch.Generator().manual_seed(5)
    T = 32
    q, k, v = (torch.randn(T, 2, 8, generator=gen, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 10, 25, 32], dtype=torch.int32)
    torch.library.opcheck(flash.fa4_varlen_fwd, (q, k, v, cu, 32, torch.tensor(7)))
    out, lse = flash.fa4_varlen_fwd(q.detach(), k.detach(), v.detach(), cu, 32, torch.tensor(7))
    torch.library.opcheck(flash.fa4_varlen_bwd, (torch.randn(T, 2, 8, generator=gen), q.detach(), k.detach(),
                                                 v.detach(), out, lse, cu, 32, torch.tensor(7)))


def test_flash_window_must_be_a_cpu_tensor():
    from speedrun.model import flash
    with pytest.raises(ValueError, match="CPU tensor"):
        flash._left(torch.tensor(5, device="meta"), 64)
    assert flash._left(torch.tensor(5), 64) == 5 and flash._left(torch.tensor(1 << 30), 64) == 64


def test_max_seqlen_bound_applies_only_to_cut_documents():
    """A batch without cu_seqlens is one document of T tokens, whatever max_seqlen says; with
    cu_seqlens the bound is the caller's (training batches cut documents there)."""
    assert A.build_doc_info(None, 100, torch.device("cpu"), "sdpa", max_seqlen=16).max_seqlen == 100
    cu = torch.tensor([0, 16, 32, 100], dtype=torch.int32)
    assert A.build_doc_info(cu, 100, torch.device("cpu"), "sdpa", max_seqlen=68).max_seqlen == 68
    assert A.build_doc_info(cu, 100, torch.device("cpu"), "sdpa", max_seqlen=500).max_seqlen == 100


def test_flash_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(A, "flash_attn_impl", lambda: None)
    with pytest.raises(RuntimeError, match="flash_attn_interface.*flash-attn-4"):
        A.resolve_backend("flash", torch.device("cuda"))


def make_layer(**kw):
    args = dict(qk_norm=True, rotary=True, attn_gate=True, gate_dim=12, dtype=torch.float64)
    args.update(kw)
    layer = A.CausalSelfAttention(64, 2, 32, **args).double()
    torch.nn.init.normal_(layer.qkvo, std=0.1)
    if layer.gate is not None:
        torch.nn.init.normal_(layer.gate.weight, std=0.5)
    return layer


@pytest.mark.parametrize("qk_norm,rotary,gate,with_ve", [(True, True, True, True),
                                                         (False, False, False, False),
                                                         (True, False, True, False)])
def test_attention_layer_vs_direct(qk_norm, rotary, gate, with_ve):
    torch.manual_seed(2)
    T, H, D, dim = 40, 2, 32, 64
    layer = make_layer(qk_norm=qk_norm, rotary=rotary, attn_gate=gate)
    x = F.rms_norm(torch.randn(T, dim, dtype=torch.float64), (dim,))
    ve = torch.randn(T, dim, dtype=torch.float64) if with_ve else None
    lam = (torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64))
    rot = Rotary(D, 1024.0, 0.1, 16)
    cos, sin = rot.cos_sin(T, torch.float64)
    cu = torch.tensor([0, 15, 40], dtype=torch.int32)
    doc = A.build_doc_info(cu, T, torch.device("cpu"), "sdpa")
    win = A.build_window(doc, torch.tensor(9, dtype=torch.int32), 9)
    y = layer(x, A.LayerInputs(x0=x, ve=ve, value_lambdas=lam, rope=(cos, sin),
                               attn_scale=torch.tensor(0.1, dtype=torch.float64), doc=doc, window=win))

    Wq, Wk, Wv, Wo = layer.qkvo.view(4, dim, dim)
    q, k, v = ((x @ W.T).view(T, H, D) for W in (Wq, Wk, Wv))
    if qk_norm:
        q = q / q.pow(2).mean(-1, keepdim=True).add(torch.finfo(q.dtype).eps).sqrt()
        k = k / k.pow(2).mean(-1, keepdim=True).add(torch.finfo(k.dtype).eps).sqrt()
    if rotary:
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    v = 0.7 * v + (0.4 * ve.view(T, H, D) if with_ve else 0)
    o = reference_attention(q, k, v, doc.doc_ids, 9, 0.1)
    if gate:
        o = o * torch.sigmoid(x[:, :12] @ layer.gate.weight.T)[:, :, None]
    torch.testing.assert_close(y, o.reshape(T, dim) @ Wo.T, rtol=1e-9, atol=1e-9)


def test_attention_layer_parameters():
    layer = A.CausalSelfAttention(64, 2, 32, qk_norm=True, rotary=True, attn_gate=True, gate_dim=12,
                                  dtype=torch.bfloat16)
    assert layer.qkvo.shape == (64, 256) and layer.qkvo.dtype == torch.float32
    assert layer.qkvo.label == "attn"
    assert layer.gate.weight.shape == (2, 12) and layer.gate.weight.dtype == torch.bfloat16
    assert layer.gate.weight.label == "attn_gate"
    assert A.CausalSelfAttention(64, 2, 32, qk_norm=True, rotary=True, attn_gate=False, gate_dim=12,
                                 dtype=torch.float32).gate is None


@pytest.mark.slow
def test_compiled_flex_cpu_uses_block_sparsity_correctly():
    """Compiled FlexAttention (inductor's CPU template) skips blocks per our kv tensors and
    applies mask_mod on partial ones only: a wrong block classification changes its output (the
    eager path ignores block sparsity). Also: new windows and documents reuse the graph."""
    torch._dynamo.reset()
    T, H, D = 512, 2, 32
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, H, D, generator=gen) for _ in range(3))
    fn = torch.compile(A._flex_attend, dynamic=False, fullgraph=True)
    from torch._dynamo.utils import counters
    graphs = None
    for window, docs in ((40, 6), (200, 3), (1 << 30, 1), (300, 9)):
        cu = random_cu_seqlens(T, docs, 12, gen) if docs > 1 else torch.tensor([0, T], dtype=torch.int32)
        flex_doc = A.build_doc_info(cu, T, torch.device("cpu"), "flex")
        win = A.build_window(flex_doc, torch.tensor(window, dtype=torch.int32), window)
        out = fn(q * 0.1, k, v, flex_doc.doc_ids, win)
        ref_doc = A.build_doc_info(cu, T, torch.device("cpu"), "sdpa")
        ref = A.attend(q, k, v, ref_doc, A.build_window(ref_doc, torch.tensor(window), window), 0.1, "sdpa")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
