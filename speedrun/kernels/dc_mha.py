"""Lightweight DC-MHA (record 85, kept in record 89): a correction added to one attention layer's
output that re-reads each head's values through a mix of *every* head's attention over a short
window ("post-only, no DD" dynamically composable attention, arXiv 2405.08553), with a Triton
forward/backward and its plain-PyTorch twin.

For queries t and the keys j with doc(j) = doc(t) and 0 <= t - j < W (W = ``window``, the query
included; r89-attention.md 5.2):

    P_h[t, j] = softmax_j(q_h[t] . k_h[j])          each head's own softmax over the W-key window
    A[t, j]   = sum_h' w1[t, h'] P_h'[t, j]           one mixed map per token, shared by the heads
    out_h[t]  = y_h[t] + w2[t, h] sum_j A[t, j] v_h[j]

q arrives with the softmax scale already multiplied in (the caller folds the YaRN attn_scale into
q for attention anyway), so nothing here depends on a changing Python number. The backward
(r89-attention.md 5.3, with G = d loss / d out): dy = G; dM_h = G_h v_h^T; dw2_h = sum_j dM_h A;
dA = sum_h w2_h dM_h; dv_h = (w2_h A)^T G_h; dw1_h = sum_j dA P_h; dS_h = P_h (w1_h dA - w1_h dw1_h);
dq_h = dS_h k_h; dk_h = dS_h^T q_h.

Owns:
- ``dc_mha_reference``: the twin, the formula above on a dense (Tq, Tk) mask in fp32 (float64
  stays float64); it also serves the KV-cache decoder (queries = the last Tq of Tk key positions);
- the Triton kernels: a forward over tiles of BLOCK_M queries, each reading the BLOCK_K >= W +
  BLOCK_M - 1 keys its queries can see, all heads in one program (A needs every head's P); it
  saves each row's log-sum-exp. The backward recomputes P from it in one kernel per query tile:
  pass 1 rebuilds A, pass 2 goes through the values (dw2, dA, dv by atomic adds), pass 3 through
  the softmaxes (dw1, dq stored, dk by atomic adds). Head count and head dim are constexprs;
- the custom ops ``speedrun::dc_mha_fwd`` / ``dc_mha_bwd`` (autograd registered), so compiled
  blocks trace through DC without a graph break (the Triton launches stay opaque to inductor);
- ``dc_mha(..., kernel="auto")``: the kernels for CUDA tensors they support (bf16 / fp16 / fp32,
  head dim a power of two in [16, 256], window <= 128) when Triton imports, the twin otherwise;
  kernel="triton" where they cannot run raises. On CPU the kernels run only in Triton's
  interpreter (TRITON_INTERPRET=1), which the tests use.

Precision: scores, softmax, A and all accumulations in fp32; the weights w2 * A and dS are rounded
to the value dtype before their matmuls (as FlashAttention does with P), so bf16 results agree with
the fp32 twin to bf16 noise, not bitwise. fp32 inputs multiply through TF32x3 (three tensor-core
passes, ~fp32 accuracy). dk and dv are summed with atomics: not bit-reproducible.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

__all__ = ["dc_mha", "dc_mha_reference", "dc_mha_triton", "triton_supports", "warm_kernels"]

_KERNELS = ("auto", "triton", "torch")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_M = 16            # queries per program (tl.dot's smallest tile)
MAX_WINDOW = 128        # keys per query the kernels take: BLOCK_K = 256 at most
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"   # read once at import, like Triton


# ------------------------------------------------------------------------------------------------
# the twin
# ------------------------------------------------------------------------------------------------
def dc_mha_reference(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor,
                     doc_ids: Tensor | None, window: int) -> Tensor:
    """y + the DC correction, by the formula of the module docstring on a dense mask.

    q, y (Tq, H, D); k, v (Tk, H, D) with Tk >= Tq: query i sits at key position Tk - Tq + i (the
    full forward has Tq = Tk; the KV-cache decoder passes the cached keys). w1, w2 (Tq, H) or (1, H).
    doc_ids (Tk,) document index per key position (None: one document). Returns y's dtype."""
    Tq, Tk = q.shape[0], k.shape[0]
    acc = torch.promote_types(q.dtype, torch.float32)
    query_pos = torch.arange(Tk - Tq, Tk, device=q.device)
    delta = query_pos[:, None] - torch.arange(Tk, device=q.device)[None, :]
    valid = (delta >= 0) & (delta < window)
    if doc_ids is not None:
        valid = valid & (doc_ids[Tk - Tq:, None] == doc_ids[None, :])
    scores = torch.einsum("thd,jhd->htj", q.to(acc), k.to(acc))
    probs = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)             # (H, Tq, Tk)
    mix = (w1.to(acc).expand(Tq, -1).T[..., None] * probs).sum(0)                  # (Tq, Tk)
    read = (mix @ v.to(acc).reshape(Tk, -1)).view(q.shape)                          # sum_j A v_h[j]
    return (y.to(acc) + w2.to(acc).expand(Tq, -1)[..., None] * read).to(y.dtype)


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _mm(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32. UPCAST (the interpreter only: its bf16 dot reads the raw bits)
        multiplies the already-rounded operands in fp32, which is what the GPU's bf16 dot computes."""
        if UPCAST:
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b, input_precision=PRECISION)
        return out

    @triton.jit
    def _window_tile(pid, T, doc_ptr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        """This program's queries (rows) and the keys they can reach (cols): the first col is W - 1
        before the first row, so BLOCK_K >= W + BLOCK_M - 1 covers every valid pair."""
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid * BLOCK_M - (WINDOW - 1) + tl.arange(0, BLOCK_K)
        row_ok = rows < T
        col_ok = (cols >= 0) & (cols < T)
        delta = rows[:, None] - cols[None, :]
        cols = tl.minimum(tl.maximum(cols, 0), T - 1)      # addresses stay in bounds; masks decide
        doc_r = tl.load(doc_ptr + rows, mask=row_ok, other=0)
        doc_c = tl.load(doc_ptr + cols, mask=col_ok, other=0)
        valid = (row_ok[:, None] & col_ok[None, :] & (delta >= 0) & (delta < WINDOW)
                 & (doc_r[:, None] == doc_c[None, :]))
        return rows.to(tl.int64), cols.to(tl.int64), row_ok, col_ok, valid

    @triton.jit
    def _head_probs(Q, K, rows, cols, row_ok, col_ok, valid, h, s_q, s_k, LSE, H: tl.constexpr,
                    D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, SAVE_LSE: tl.constexpr):
        """Head h's softmax over the window (BLOCK_M, BLOCK_K), fp32, 0 outside it. With SAVE_LSE
        it is normalized here and its log2-sum-exp stored; otherwise it is read back from LSE."""
        d = tl.arange(0, D)
        q = tl.load(Q + rows[:, None] * s_q + h * D + d[None, :], mask=row_ok[:, None], other=0.0)
        k = tl.load(K + cols[:, None] * s_k + h * D + d[None, :], mask=col_ok[:, None], other=0.0)
        s = _mm(q, tl.trans(k), PRECISION, UPCAST) * 1.4426950408889634   # log2 units
        if SAVE_LSE:
            s = tl.where(valid, s, -1.0e30)          # finite: a padding row must not produce NaN
            m = tl.max(s, axis=1)
            p = tl.where(valid, tl.exp2(s - m[:, None]), 0.0)
            total = tl.sum(p, axis=1)
            total = tl.where(total > 0, total, 1.0)   # every real row holds its own key
            tl.store(LSE + rows * H + h, m + tl.log2(total), mask=row_ok)
            p = p / total[:, None]
        else:
            lse = tl.load(LSE + rows * H + h, mask=row_ok, other=0.0)
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        return p

    @triton.jit
    def _dc_forward_kernel(Y, Q, K, V, W1, W2, DOC, OUT, LSE, s_y, s_q, s_k, s_v, T,
                           H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        rows, cols, row_ok, col_ok, valid = _window_tile(tl.program_id(0), T, DOC, WINDOW, BLOCK_M, BLOCK_K)
        d = tl.arange(0, D)
        mix = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for h in tl.static_range(H):        # A needs every head's probabilities first
            p = _head_probs(Q, K, rows, cols, row_ok, col_ok, valid, h, s_q, s_k, LSE, H, D,
                            PRECISION, UPCAST, True)
            w1 = tl.load(W1 + rows * H + h, mask=row_ok, other=0.0).to(tl.float32)
            mix += w1[:, None] * p
        for h in tl.static_range(H):
            v = tl.load(V + cols[:, None] * s_v + h * D + d[None, :], mask=col_ok[:, None], other=0.0)
            w2 = tl.load(W2 + rows * H + h, mask=row_ok, other=0.0).to(tl.float32)
            corr = _mm((w2[:, None] * mix).to(v.dtype), v, PRECISION, UPCAST)
            y = tl.load(Y + rows[:, None] * s_y + h * D + d[None, :], mask=row_ok[:, None], other=0.0)
            out = y.to(tl.float32) + corr
            tl.store(OUT + rows[:, None] * (H * D) + h * D + d[None, :], out.to(OUT.dtype.element_ty),
                     mask=row_ok[:, None])

    @triton.jit
    def _dc_backward_kernel(G, Q, K, V, W1, W2, DOC, LSE, DQ, DK, DV, DW1, DW2, s_g, s_q, s_k, s_v, T,
                            H: tl.constexpr, D: tl.constexpr, WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        rows, cols, row_ok, col_ok, valid = _window_tile(tl.program_id(0), T, DOC, WINDOW, BLOCK_M, BLOCK_K)
        d = tl.arange(0, D)
        # pass 1: the mixed map A, from the saved log-sum-exps
        mix = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for h in tl.static_range(H):
            p = _head_probs(Q, K, rows, cols, row_ok, col_ok, valid, h, s_q, s_k, LSE, H, D,
                            PRECISION, UPCAST, False)
            w1 = tl.load(W1 + rows * H + h, mask=row_ok, other=0.0).to(tl.float32)
            mix += w1[:, None] * p
        # pass 2: through the values. dM is not masked: A and P are 0 outside the window, and
        # everything dM reaches is multiplied by one of them
        dmix = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for h in tl.static_range(H):
            g = tl.load(G + rows[:, None] * s_g + h * D + d[None, :], mask=row_ok[:, None], other=0.0)
            v = tl.load(V + cols[:, None] * s_v + h * D + d[None, :], mask=col_ok[:, None], other=0.0)
            w2 = tl.load(W2 + rows * H + h, mask=row_ok, other=0.0).to(tl.float32)
            dm = _mm(g, tl.trans(v), PRECISION, UPCAST)
            tl.store(DW2 + rows * H + h, tl.sum(dm * mix, axis=1), mask=row_ok)
            dmix += w2[:, None] * dm
            dv = _mm(tl.trans((w2[:, None] * mix).to(g.dtype)), g, PRECISION, UPCAST)
            tl.atomic_add(DV + cols[:, None] * (H * D) + h * D + d[None, :], dv, mask=col_ok[:, None],
                          sem="relaxed")
        # pass 3: through each head's softmax
        for h in tl.static_range(H):
            p = _head_probs(Q, K, rows, cols, row_ok, col_ok, valid, h, s_q, s_k, LSE, H, D,
                            PRECISION, UPCAST, False)
            w1 = tl.load(W1 + rows * H + h, mask=row_ok, other=0.0).to(tl.float32)
            dw1 = tl.sum(dmix * p, axis=1)
            tl.store(DW1 + rows * H + h, dw1, mask=row_ok)
            ds = p * (w1[:, None] * dmix - (w1 * dw1)[:, None])
            q = tl.load(Q + rows[:, None] * s_q + h * D + d[None, :], mask=row_ok[:, None], other=0.0)
            k = tl.load(K + cols[:, None] * s_k + h * D + d[None, :], mask=col_ok[:, None], other=0.0)
            dq = _mm(ds.to(k.dtype), k, PRECISION, UPCAST)
            tl.store(DQ + rows[:, None] * (H * D) + h * D + d[None, :], dq, mask=row_ok[:, None])
            dk = _mm(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)
            tl.atomic_add(DK + cols[:, None] * (H * D) + h * D + d[None, :], dk, mask=col_ok[:, None],
                          sem="relaxed")


def _launch(window: int, dtype: torch.dtype) -> dict:
    block_k = max(16, triton.next_power_of_2(window + BLOCK_M - 1))
    # fp32 inputs keep ~fp32 products through three TF32 tensor-core passes; "ieee" (FMA loops over
    # these 64x256x128 tiles) took Triton's LLVM stage minutes per kernel on an H200 (the fp32
    # record-89 model test stalled there). bf16/fp16 ignore the setting
    return dict(WINDOW=window, BLOCK_M=BLOCK_M, BLOCK_K=block_k,
                PRECISION="tf32x3" if dtype == torch.float32 else "tf32", UPCAST=_INTERPRET)


def _rows(t: Tensor) -> Tensor:
    """(T, H, D) with unit head and dim strides (the kernels take one row stride)."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _weights(w: Tensor, T: int) -> Tensor:
    return w.expand(T, -1).contiguous()


def _forward(y, q, k, v, w1, w2, doc_ids, window):
    T, H, D = q.shape
    y, q, k, v = (_rows(t) for t in (y, q, k, v))
    out = torch.empty((T, H, D), dtype=y.dtype, device=y.device)
    lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
    if T > 0:
        _dc_forward_kernel[(triton.cdiv(T, BLOCK_M),)](
            y, q, k, v, _weights(w1, T), _weights(w2, T), doc_ids.to(torch.int32).contiguous(), out, lse,
            y.stride(0), q.stride(0), k.stride(0), v.stride(0), T, H=H, D=D, **_launch(window, q.dtype),
            num_warps=4)
    return out, lse


def _backward(dout, q, k, v, w1, w2, doc_ids, lse, window):
    T, H, D = q.shape
    dout, q, k, v = (_rows(t) for t in (dout, q, k, v))
    f32 = dict(dtype=torch.float32, device=q.device)
    dq = torch.empty((T, H, D), **f32)
    dk, dv = torch.zeros((T, H, D), **f32), torch.zeros((T, H, D), **f32)   # atomic sums
    dw1, dw2 = torch.empty((T, H), **f32), torch.empty((T, H), **f32)
    if T > 0:
        _dc_backward_kernel[(triton.cdiv(T, BLOCK_M),)](
            dout, q, k, v, _weights(w1, T), _weights(w2, T), doc_ids.to(torch.int32).contiguous(), lse,
            dq, dk, dv, dw1, dw2, dout.stride(0), q.stride(0), k.stride(0), v.stride(0), T, H=H, D=D,
            **_launch(window, q.dtype), num_warps=4)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dw1.to(w1.dtype), dw2.to(w2.dtype)


# ------------------------------------------------------------------------------------------------
# custom ops (traced by torch.compile as opaque nodes) and their autograd
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("speedrun::dc_mha_fwd", mutates_args=())
def dc_mha_fwd(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, doc_ids: Tensor,
               window: int) -> tuple[Tensor, Tensor]:
    """(y + correction (T, H, D) in y's dtype, per-row log2-sum-exp (T, H) fp32)."""
    return _forward(y, q, k, v, w1, w2, doc_ids, window)


@dc_mha_fwd.register_fake
def _(y, q, k, v, w1, w2, doc_ids, window):
    T, H, D = q.shape
    return y.new_empty((T, H, D)), q.new_empty((T, H), dtype=torch.float32)


@torch.library.custom_op("speedrun::dc_mha_bwd", mutates_args=())
def dc_mha_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, doc_ids: Tensor,
               lse: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dw1, dw2) of dc_mha_fwd (dy is dout itself)."""
    return _backward(dout, q, k, v, w1, w2, doc_ids, lse, window)


@dc_mha_bwd.register_fake
def _(dout, q, k, v, w1, w2, doc_ids, lse, window):
    T, H, _ = q.shape
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            w1.new_empty((T, H)), w2.new_empty((T, H)))


def _setup(ctx, inputs, output):
    y, q, k, v, w1, w2, doc_ids, window = inputs
    ctx.save_for_backward(q, k, v, w1, w2, doc_ids, output[1])
    ctx.window = window
    ctx.set_materialize_grads(False)   # the lse output is internal: its gradient stays None


def _backward_op(ctx, dout, dlse):
    q, k, v, w1, w2, doc_ids, lse = ctx.saved_tensors
    dq, dk, dv, dw1, dw2 = dc_mha_bwd(dout, q, k, v, w1, w2, doc_ids, lse, ctx.window)
    return dout, dq, dk, dv, dw1, dw2, None, None


dc_mha_fwd.register_autograd(_backward_op, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# dispatch
# ------------------------------------------------------------------------------------------------
def triton_supports(q: Tensor, k: Tensor, v: Tensor, window: int) -> bool:
    """Whether the kernels take these inputs (device aside): equal (T, H, D) shapes, one dtype
    among bf16/fp16/fp32, D a power of two in [16, 256], 1 <= window <= MAX_WINDOW."""
    D = q.shape[-1]
    return (q.dim() == 3 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.dtype in _DTYPES and 16 <= D <= 256 and D & (D - 1) == 0 and 1 <= window <= MAX_WINDOW)


def dc_mha_triton(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, doc_ids: Tensor,
                  window: int) -> Tensor:
    """The Triton path (no dispatch); raises where it cannot run."""
    if not HAS_TRITON:
        raise RuntimeError("dc_mha: kernel='triton' needs the triton package, which is not importable")
    if not (q.is_cuda or _INTERPRET):
        raise RuntimeError(f"dc_mha: kernel='triton' needs CUDA tensors (got device {q.device}); use "
                           "kernel='torch' or 'auto' on CPU (or TRITON_INTERPRET=1 for Triton's interpreter)")
    if not triton_supports(q, k, v, window):
        raise RuntimeError(f"dc_mha: kernel='triton' takes equal (T, H, D) q/k/v in bf16/fp16/fp32 with D "
                           f"a power of two in [16, 256] and window in [1, {MAX_WINDOW}]; got q "
                           f"{tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)}, window {window}")
    T = q.shape[0]
    # (1, H) weights (one per layer) become stride-0 (T, H) views: autograd sums their gradient
    return dc_mha_fwd(y, q, k, v, w1.expand(T, -1), w2.expand(T, -1), doc_ids, int(window))[0]


def warm_kernels(num_heads: int, head_dim: int, window: int, dtype: torch.dtype,
                 device: torch.device | str) -> bool:
    """JIT-compile the forward and backward kernels of this shape, window and dtype into Triton's
    on-disk cache by running them once on 64 random tokens; False (nothing run) where the kernels
    cannot run there. The trainer's warm-up helper calls it first thing, so the trainer's first DC
    call loads them instead of compiling (bf16 at the record's shape on an H200: 9.4 s forward +
    11.1 s backward, in the trainer's way otherwise). Triton's cache key holds the constexprs, the
    dtypes and which integer arguments are multiples of 16; any token count that is one (64 here,
    every micro-batch length) and any row stride that is one (H x D, or 3 H x D for views of a
    fused projection) shares the entry."""
    device = torch.device(device)
    shape = (64, num_heads, head_dim)
    probe = torch.empty(shape, dtype=dtype, device="meta")
    if not (HAS_TRITON and (device.type == "cuda" or _INTERPRET) and triton_supports(probe, probe, probe, window)):
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    y, q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_() for _ in range(4))
    w1, w2 = (torch.randn((1, num_heads), generator=gen, device=device).to(dtype).requires_grad_()
              for _ in range(2))
    doc_ids = torch.zeros(shape[0], dtype=torch.int32, device=device)
    out = dc_mha_triton(y, q, k, v, w1, w2, doc_ids, window)
    torch.autograd.grad(out.float().sum(), (y, q, k, v, w1, w2))
    return True


def dc_mha(y: Tensor, q: Tensor, k: Tensor, v: Tensor, w1: Tensor, w2: Tensor, doc_ids: Tensor | None,
           window: int, *, kernel: str = "auto") -> Tensor:
    """y + the lightweight DC-MHA correction (module docstring).

    y, q, k, v: (T, H, D), q already multiplied by the softmax scale; w1 (the RMS-normed mixing
    weights) and w2: (T, H) or (1, H); doc_ids: (T,) int document index per token (None: one
    document); window: keys per query, the query included. kernel: "auto" (Triton for CUDA inputs
    it supports, else the twin) | "triton" (error where it cannot run) | "torch" (the twin)."""
    if kernel not in _KERNELS:
        raise ValueError(f"dc_mha: kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "triton" if HAS_TRITON and q.is_cuda and triton_supports(q, k, v, window) else "torch"
    if kernel == "triton":
        if doc_ids is None:
            doc_ids = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
        return dc_mha_triton(y, q, k, v, w1, w2, doc_ids, window)
    return dc_mha_reference(y, q, k, v, w1, w2, doc_ids, window)
