"""Stand-ins for the FlashAttention packages on the CPU (neither installs here): FA3's public
``flash_attn_interface.flash_attn_varlen_func`` and the FA4 internals our custom ops call
(``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd``). They compute the real math
(per document of cu_seqlens, causal, window (left, 0), left None = unbounded), check the packages'
contract that no document is longer than max_seqlen, and record the left windows they were given."""
import sys
import types

import torch
import torch.nn.functional as F


def reference_varlen(q, k, v, cu_seqlens, max_seqlen, left):
    """(out, lse (H, T)) of the varlen attention, scale 1."""
    bounds = cu_seqlens.tolist()
    out, lse = torch.zeros_like(q), q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)
    for s, e in zip(bounds[:-1], bounds[1:]):
        assert e - s <= max_seqlen, f"document of {e - s} tokens > max_seqlen {max_seqlen}"
        if e == s:
            continue
        pos = torch.arange(e - s)
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta <= (e - s if left is None else left))
        scores = torch.einsum("qhd,khd->hqk", q[s:e].double(), k[s:e].double()).masked_fill(~mask, float("-inf"))
        lse[:, s:e] = torch.logsumexp(scores, dim=-1)
        out[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e].double()).to(q.dtype)
    return out, lse


def reference_varlen_backward(q, k, v, dout, cu_seqlens, max_seqlen, left):
    """(dq, dk, dv) written out (a custom op's implementation runs below autograd): with P the
    masked softmax, dV = P^T dO, dS = P * (dO V^T - rowsum(dO * O)), dQ = dS K, dK = dS^T Q."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        pos = torch.arange(e - s)
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta <= (e - s if left is None else left))
        qs, ks, vs, do = (t[s:e].double() for t in (q, k, v, dout))
        p = torch.einsum("qhd,khd->hqk", qs, ks).masked_fill(~mask, float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", p, vs)
        dv[s:e] = torch.einsum("hqk,qhd->khd", p, do).to(v.dtype)
        dp = torch.einsum("qhd,khd->hqk", do, vs)
        ds = p * (dp - (do * o).sum(-1).transpose(0, 1)[..., None])
        dq[s:e] = torch.einsum("hqk,khd->qhd", ds, ks).to(q.dtype)
        dk[s:e] = torch.einsum("hqk,qhd->khd", ds, qs).to(k.dtype)
    return dq, dk, dv


def install_fa4(monkeypatch, calls: list) -> None:
    def fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
            softcap, window_size_left, window_size_right, return_lse):
        assert causal and window_size_right == 0 and softmax_scale == 1.0 and softcap == 0.0 and return_lse
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        calls.append(("fwd", window_size_left))
        return (*reference_varlen(q, k, v, cu_seqlens_q, max_seqlen_q, window_size_left), None, None, None)

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal, softcap, *, window_size_left, window_size_right,
            cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
        assert causal and window_size_right == 0 and softmax_scale == 1.0 and softcap == 0.0
        calls.append(("bwd", window_size_left))
        return reference_varlen_backward(q, k, v, dout, cu_seqlens_q, max_seqlen_q, window_size_left)

    interface = types.ModuleType("flash_attn.cute.interface")
    interface._flash_attn_fwd, interface._flash_attn_bwd = fwd, bwd
    cute = types.ModuleType("flash_attn.cute")
    cute.interface = interface
    package = types.ModuleType("flash_attn")
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "flash_attn_interface", None)   # importing FA3 raises
    monkeypatch.setitem(sys.modules, "flash_attn", package)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", interface)


def install_fa3(monkeypatch, calls: list) -> None:
    def varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
               window_size):
        assert causal and window_size[1] == 0 and softmax_scale == 1.0
        calls.append(("fwd", window_size[0]))
        left = None if window_size[0] == -1 else window_size[0]
        return reference_varlen_autograd(q, k, v, cu_seqlens_q, max_seqlen_q, left), None

    module = types.ModuleType("flash_attn_interface")
    module.flash_attn_varlen_func = varlen
    monkeypatch.setitem(sys.modules, "flash_attn_interface", module)


def reference_varlen_autograd(q, k, v, cu_seqlens, max_seqlen, left):
    """reference_varlen's output, differentiable (sdpa per document)."""
    outs = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        assert e - s <= max_seqlen
        if e == s:
            continue
        pos = torch.arange(e - s)
        delta = pos[:, None] - pos[None, :]
        mask = (delta >= 0) & (delta <= (e - s if left is None else left))
        o = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), attn_mask=mask, scale=1.0)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)
