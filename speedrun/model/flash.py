"""FlashAttention behind the ``flash`` attention backend: which package is importable, and the varlen
call the model makes (documents from cu_seqlens, causal, a left window).

Owns:
- ``flash_attn_impl()``: "fa3" (module ``flash_attn_interface``, FlashAttention-3 for Hopper, built
  from the flash-attention repo) or "fa4" (pip package ``flash-attn-4``, module ``flash_attn.cute``,
  CuTe DSL kernels), or None;
- ``flash_varlen(q, k, v, cu_seqlens, max_seqlen, window, impl)``: softmax(q k^T + mask) v, scale 1.

FA4 runs as two torch custom ops (``speedrun::fa4_varlen_fwd`` / ``fa4_varlen_bwd``, autograd
registered), so compiled blocks trace straight through attention: no graph break, and inductor fuses
what comes before and after it (the package's own autograd.Function cannot be traced). The window
arrives as a 0-d *CPU* tensor: the kernels take it as a host int, and a tensor keeps dynamo from
specializing on its value (an int argument would recompile every block at every window stage);
reading a CPU tensor costs no GPU sync. A CUDA graph recorded around the op bakes the value in
(the trainer re-records when windows change: train/cuda_graph.py).

FA3 has no such entry points here (it is not installable on our machines, so its internals are
untested): its public function runs eagerly behind ``torch.compiler.disable``, one graph break.

Window semantics: query i sees keys i - w .. i of its document (``window_size=(w, 0)``). A window
longer than max_seqlen (or none at all) is passed as max_seqlen, never as "unbounded" (FA3's -1,
FA4's None): the result is the same, and FA4 JIT-compiles a separate causal-only kernel for
"unbounded", which a late window stage would otherwise compile in the middle of training.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor


@functools.cache
def flash_attn_impl() -> str | None:
    """'fa3' or 'fa4', whichever is importable first, or None."""
    try:
        import flash_attn_interface  # noqa: F401  FlashAttention-3 (Hopper)
        return "fa3"
    except ImportError:
        pass
    # FA4 JIT-compiles its kernels (~8 s for forward + backward on an H100); its on-disk cache
    # (off by default, read at import) makes later starts load them instead
    os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
    try:
        import flash_attn.cute  # noqa: F401  FlashAttention-4 (CuTe DSL)
        return "fa4"
    except ImportError:
        return None


def _left(window: Tensor, max_seqlen: int) -> int:
    if window.device.type != "cpu":   # int() of a device tensor would sync the GPU every call
        raise ValueError(f"flash window must be a CPU tensor, got one on {window.device}")
    return min(int(window), max_seqlen)


# ---- FlashAttention-4: custom ops ----------------------------------------------------------------
@torch.library.custom_op("speedrun::fa4_varlen_fwd", mutates_args=())
def fa4_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                   window: Tensor) -> tuple[Tensor, Tensor]:
    """(out (T, H, D), lse (H, T) fp32) of documents-causal-window attention, scale 1."""
    from flash_attn.cute.interface import _flash_attn_fwd
    out, lse = _flash_attn_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=1.0, causal=True, softcap=0.0,
        window_size_left=_left(window, max_seqlen), window_size_right=0, return_lse=True)[:2]
    return out, lse


@fa4_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window):
    T, H, _ = q.shape
    return q.new_empty(T, H, v.shape[-1]), q.new_empty(H, T, dtype=torch.float32)


@torch.library.custom_op("speedrun::fa4_varlen_bwd", mutates_args=())
def fa4_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   cu_seqlens: Tensor, max_seqlen: int, window: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of fa4_varlen_fwd."""
    from flash_attn.cute.interface import _flash_attn_bwd
    dq, dk, dv = _flash_attn_bwd(
        q.contiguous(), k.contiguous(), v.contiguous(), out, dout.contiguous(), lse, 1.0, True, 0.0,
        window_size_left=_left(window, max_seqlen), window_size_right=0,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen)
    return dq, dk, dv


@fa4_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, window):
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _fa4_setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, window)
    ctx.max_seqlen = max_seqlen
    ctx.set_materialize_grads(False)   # lse's gradient stays None, not a zero-filled (H, T) tensor


def _fa4_backward(ctx, dout, dlse):
    # lse is an internal output (never used downstream): its gradient is ignored
    q, k, v, out, lse, cu_seqlens, window = ctx.saved_tensors
    dq, dk, dv = fa4_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen, window)
    return dq, dk, dv, None, None, None


fa4_varlen_fwd.register_autograd(_fa4_backward, setup_context=_fa4_setup)


# ---- FlashAttention-3: its public function, eagerly --------------------------------------------
@torch.compiler.disable
def _fa3_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                window: Tensor) -> Tensor:
    from flash_attn_interface import flash_attn_varlen_func
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                 max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, softmax_scale=1.0,
                                 causal=True, window_size=(_left(window, max_seqlen), 0))
    return out[0] if isinstance(out, tuple) else out


def flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: Tensor,
                 impl: str) -> Tensor:
    """Attention of (T, H, D) q, k, v over the documents of cu_seqlens (int32, starting at 0, ending
    at T, repeats allowed; none longer than max_seqlen), causal, left window ``window`` (0-d CPU
    tensor, tokens), scale 1, with implementation ``impl`` ("fa3" | "fa4")."""
    if impl == "fa4":
        return fa4_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, window)[0]
    if impl == "fa3":
        return _fa3_varlen(q, k, v, cu_seqlens, max_seqlen, window)
    raise ValueError(f"FlashAttention implementation {impl!r}: expected 'fa3' or 'fa4'")
