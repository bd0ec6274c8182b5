"""Record 89's attention techniques, each against a float64 computation written independently
here (r89-attention.md): paired heads by the explicit index formula (2.6) on every backend, the
partial key offset (3), XSA (4), DC-MHA (5) and the output gate (6) inside the layer, attention
lambdas (8), and the off states (neutral coefficients = the plain layer, exactly)."""
import pytest
import torch
import torch.nn.functional as F

from speedrun.model import attention as A
from speedrun.model.rotary import Rotary

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

H, D, DIM = 6, 16, 96          # record 89's six heads (pairs (0,3), (1,4), (2,5)), small dims
F64 = torch.float64


def rotate(x, positions, freqs):
    """x (T, H, D) with pair (d, d + D/2) rotated by -positions[t, h] * freqs[d] (complex form);
    the angles' cos and sin in fp32, as the model's tables are made."""
    theta = positions.float()[..., None] * freqs.float()
    turn = torch.complex(theta.cos().double(), -theta.sin().double())
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def paired_loop(q, k, v, doc, window, scale):
    """The explicit index formula: query (t, h) sees (t', h') iff h' = h mod 3 (mod H/2), same
    document, 0 <= s(t,h) - s(t',h') <= window with s(t, h) = 2t + h // (H/2)."""
    T, half = q.shape[0], H // 2
    out = torch.zeros(T, H, D, dtype=F64)
    for t in range(T):
        for h in range(H):
            s = 2 * t + h // half
            keys = [(t2, h2) for t2 in range(T) for h2 in (h % half, h % half + half)
                    if doc[t2] == doc[t] and 0 <= s - (2 * t2 + h2 // half) <= window]
            p = torch.softmax(torch.stack([scale * q[t, h] @ k[t2, h2] for t2, h2 in keys]), 0)
            out[t, h] = sum(pi * v[t2, h2] for pi, (t2, h2) in zip(p, keys))
    return out


def plain_loop(q, k, v, doc, window, scale):
    T = q.shape[0]
    out = torch.zeros(T, H, D, dtype=F64)
    for t in range(T):
        keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j <= window]
        for h in range(H):
            p = torch.softmax(torch.stack([scale * q[t, h] @ k[j, h] for j in keys]), 0)
            out[t, h] = (p[:, None] * v[keys, h]).sum(0)
    return out


def dc_loop(q, k, v, w1, w2, doc, window, scale):
    """The DC correction per query: each head's softmax over the window, mixed by the RMS-normed w1."""
    T = q.shape[0]
    w1 = w1 / w1.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    corr = torch.zeros(T, H, D, dtype=F64)
    for t in range(T):
        keys = [j for j in range(max(0, t - window + 1), t + 1) if doc[j] == doc[t]]
        mix = sum(w1[t, h] * torch.softmax(torch.stack([scale * q[t, h] @ k[j, h] for j in keys]), 0)
                  for h in range(H))
        for h in range(H):
            corr[t, h] = w2[t, h] * (mix[:, None] * v[keys, h]).sum(0)
    return corr


def make_layer(**kw):
    torch.manual_seed(3)
    layer = A.CausalSelfAttention(DIM, H, D, qk_norm=True, rotary=True, attn_gate=False, gate_dim=12,
                                  dtype=F64, **kw).double()
    torch.nn.init.normal_(layer.qkvo, std=0.15)
    return layer


def projections(layer, x, lam=1.0):
    Wq, Wk, Wv, Wo = layer.qkvo.view(4, DIM, DIM)
    q, k, v = ((x @ (lam * W).T).view(-1, H, D) for W in (Wq, Wk, Wv))
    norm = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(F64).eps).sqrt()  # noqa: E731
    return norm(q), norm(k), v, Wo


CU = torch.tensor([0, 7, 9, 23, 23], dtype=torch.int32)     # documents 0..6 | 7..8 | 9..22, T = 23


def batch(backend, T=23, window=9, block=16, paired=False):
    doc = A.build_doc_info(CU, T, torch.device("cpu"), backend)
    if paired:
        doc = A.stream_doc_info(doc)
    return doc, A.build_window(doc, torch.tensor(window, dtype=torch.int32), window, block_size=block)


# ---- paired heads ----------------------------------------------------------------------------------

def test_stream_layout_pairs_h_with_h_plus_half():
    x = torch.arange(5 * H * D, dtype=F64).view(5, H, D)
    s = A.to_stream(x)
    assert s.shape == (10, H // 2, D)
    for t in range(5):
        for h in range(H):
            assert torch.equal(s[2 * t + h // 3, h % 3], x[t, h])
    doc = A.stream_doc_info(A.build_doc_info(torch.tensor([0, 2, 5, 5], dtype=torch.int32), 5,
                                             torch.device("cpu"), "flash", max_seqlen=3))
    assert doc.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert doc.cu_seqlens.tolist() == [0, 0, 4, 10, 10] and doc.max_seqlen == 6


@pytest.mark.parametrize("window", [0, 1, 16, 80])       # stream rows: 0, 1, one block, many blocks
def test_paired_layer_matches_index_formula(window):
    """The layer's paired path (per-head rotary at 2t + (h mod 2), stream, backend) = the formula,
    with documents crossing and windows of 0, 1 and many 16-row blocks."""
    T = 23
    layer = make_layer(paired=True)
    gen = torch.Generator().manual_seed(window)
    x = F.rms_norm(torch.randn(T, DIM, generator=gen, dtype=F64), (DIM,))
    rot = Rotary(D, 1024.0, 0.1, 16)
    rot.yarn_update(1, 4)
    doc, win = batch("sdpa", window=window, paired=True)
    scale = torch.tensor(0.3, dtype=F64)
    rope = rot.paired_cos_sin(T, H, F64)
    y = layer(x, A.LayerInputs(x0=x, rope=rope, attn_scale=scale, doc=doc, window=win))

    q, k, v, Wo = projections(layer, x)
    pos = 2 * torch.arange(T)[:, None] + torch.arange(H)[None, :] % 2
    q, k = rotate(q, pos, rot.freqs), rotate(k, pos, rot.freqs)
    o = paired_loop(q, k, v, A.build_doc_info(CU, T, torch.device("cpu"), "sdpa").doc_ids, window, 0.3)
    torch.testing.assert_close(y, o.reshape(T, DIM) @ Wo.T, rtol=1e-9, atol=1e-9)


def test_paired_backends_agree(monkeypatch):
    """sdpa (dense twin), flex (eager; block sparsity built for the 2T stream) and FlashAttention-3
    and -4 (CPU fakes: cu_seqlens and max_seqlen doubled) give the same stream attention, values
    and gradients (flex: values; it has no CPU backward), at windows 0, one block and many."""
    import flash_fakes
    T = 23
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2 * T, H // 2, D, generator=gen, dtype=F64) for _ in range(3))
    g = torch.randn(2 * T, H // 2, D, generator=gen, dtype=F64)

    def run(backend):
        results = []
        for window in (0, 16, 80):
            grad = backend != "flex"
            leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
            out = A.attend(*leaves, *batch(backend, window=window, paired=True), 0.4, backend)
            results += [out] + (list(torch.autograd.grad(out, leaves, g)) if grad else [])
        return results

    want = run("sdpa")
    outs = {"flex": run("flex")}
    for impl in ("fa3", "fa4"):
        calls = []
        with monkeypatch.context() as m:
            (flash_fakes.install_fa3 if impl == "fa3" else flash_fakes.install_fa4)(m, calls)
            A.flash_attn_impl.cache_clear()
            try:
                outs[impl] = run("flash")
            finally:
                A.flash_attn_impl.cache_clear()
        assert [w for kind, w in calls if kind == "fwd"] == [0, 16, 46]   # 80 > the bound 2T = 46
    want_values = want[::4]
    for a, b in zip(outs.pop("flex"), want_values):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg="flex")
    for name, got in outs.items():
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


# ---- key offset, XSA, DC, gates, lambdas -----------------------------------------------------------

def test_offset_keys_shifts_the_stationary_dims():
    k = torch.randn(6, 2, 16, dtype=F64)
    out = A.offset_keys(k)
    stationary = [d for d in range(16) if 4 <= d < 8 or d >= 12]      # [D/4, D/2) and [3D/4, D)
    moving = [d for d in range(16) if d not in stationary]
    torch.testing.assert_close(out[..., moving], k[..., moving], rtol=0, atol=0)
    torch.testing.assert_close(out[1:, :, stationary], k[:-1, :, stationary], rtol=0, atol=0)
    torch.testing.assert_close(out[0], k[0], rtol=0, atol=0)           # position 0 keeps its own
    prev = torch.randn(2, 16, dtype=F64)                                # decoding: the key before
    torch.testing.assert_close(A.offset_keys(k, prev)[0, :, stationary], prev[:, stationary])
    # the stationary dims are exactly the zero-frequency rotary dims
    freqs = Rotary(16, 1024.0, 0.1, 16).freqs
    assert [d for d in range(8) if freqs[d] == 0] == [4, 5, 6, 7]


def test_xsa_removes_the_fraction_along_v():
    gen = torch.Generator().manual_seed(1)
    y, v = (torch.randn(5, 3, 8, generator=gen, dtype=F64) for _ in range(2))
    alpha = torch.randn(5, 3, generator=gen, dtype=F64)
    out = A.xsa(y, v, alpha)
    for t in range(5):
        for h in range(3):
            proj = (y[t, h] @ v[t, h]) / (v[t, h] @ v[t, h]) * v[t, h]
            torch.testing.assert_close(out[t, h], y[t, h] - torch.tanh(alpha[t, h]) * proj)
    big = A.xsa(y, v, torch.full((1, 3), 40.0, dtype=F64))           # tanh = 1: nothing left along v
    assert (big * v).sum(-1).abs().max() < 1e-12
    assert torch.equal(A.xsa(y, v, torch.zeros(1, 3, dtype=F64)), y)   # alpha 0 (init): off, exactly
    assert torch.isfinite(A.xsa(y, torch.zeros_like(v), alpha)).all()  # |v|^2 clamped


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_long_layer_with_every_technique_matches_reference(backend):
    """A record-89 long-window layer (layer 10's kind): lambdas, key offset, the whole value
    injection, attention + DC (112 -> 5 keys here), XSA, the linear output gate, all per token."""
    T, window = 23, 9
    layer = make_layer(key_offset=True, dc_window=5)
    gen = torch.Generator().manual_seed(2)
    x = F.rms_norm(torch.randn(T, DIM, generator=gen, dtype=F64), (DIM,))
    ve = torch.randn(T, DIM, generator=gen, dtype=F64)
    alpha, gate, w1, w2 = (torch.randn(T, H, generator=gen, dtype=F64) for _ in range(4))
    lam = (torch.tensor(0.7, dtype=F64), torch.tensor(1.3, dtype=F64))
    rot = Rotary(D, 1024.0, 0.1, 16)
    doc, win = batch(backend, window=window)
    inp = A.LayerInputs(x0=x, ve=ve, rope=rot.cos_sin(T, F64), attn_scale=torch.tensor(0.3, dtype=F64),
                        doc=doc, window=win, attn_lambdas=lam, xsa_alpha=alpha, out_gate=gate,
                        dc_weights=(w1, w2))
    with torch.set_grad_enabled(backend != "flex"):       # flex has no CPU backward
        y = layer(x, inp)

    q, k, v, Wo = projections(layer, x, lam=0.7)
    pos = torch.arange(T)[:, None].expand(T, H)
    q, k = rotate(q, pos, rot.freqs), rotate(k, pos, rot.freqs)
    k = k.clone()
    st = [d for d in range(D) if (d // (D // 4)) % 2 == 1]
    k[1:, :, st] = k[:-1, :, st].clone()                       # key t takes key t-1's stationary dims
    v = v + ve.view(T, H, D)
    doc_ids = doc.doc_ids
    o = plain_loop(q, k, v, doc_ids, window, 0.3) + dc_loop(q, k, v, w1, w2, doc_ids, 5, 0.3)
    dot = (o * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True)
    o = (o - torch.tanh(alpha)[..., None] * dot * v) * gate[..., None]
    torch.testing.assert_close(y, o.reshape(T, DIM) @ (1.3 * Wo).T, rtol=1e-9, atol=1e-9)


def test_neutral_coefficients_equal_the_plain_layer():
    """XSA alpha 0, DC w2 0, output gate 1 and lambdas (1, 1) leave the output exactly the plain
    layer's (record 89 starts XSA and DC at zero), while their gradients are not zero."""
    T = 23
    plain, full = make_layer(), make_layer(dc_window=5)
    gen = torch.Generator().manual_seed(5)
    x = F.rms_norm(torch.randn(T, DIM, generator=gen, dtype=F64), (DIM,))
    rope = Rotary(D, 1024.0, 0.1, 16).cos_sin(T, F64)
    doc, win = batch("sdpa")
    base = dict(x0=x, rope=rope, attn_scale=torch.tensor(0.3, dtype=F64), doc=doc, window=win)
    alpha, w2 = (torch.zeros(1, H, dtype=F64, requires_grad=True) for _ in range(2))
    one = torch.tensor(1.0, dtype=F64)
    y = full(x, A.LayerInputs(**base, xsa_alpha=alpha, out_gate=torch.ones(1, H, dtype=F64),
                              dc_weights=(torch.ones(1, H, dtype=F64), w2), attn_lambdas=(one, one)))
    torch.testing.assert_close(y, plain(x, A.LayerInputs(**base)), rtol=1e-13, atol=1e-13)
    ga, gw2 = torch.autograd.grad(y.square().sum(), (alpha, w2))
    assert ga.abs().min() > 0 and gw2.abs().min() > 0
