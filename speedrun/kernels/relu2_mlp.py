"""Fused MLP up-projection with ReLU²: a Triton matmul with the activation in its epilogue, and its twin.

Owns h = relu(x @ W)² for the MLP's first half: x (T, d) activations (bf16), W (d, H) the up-projection
stored (in, out) as the model keeps it (`mlp_fc`, used as x @ W). The plain twin
(`linear_relu_square_reference`) is what the model computes in PyTorch: `relu(x @ W).square()`.

Why fuse: unfused, the matmul writes the pre-activation (T x H bf16, 201 MB at the record's 32768 x
3072), relu and square each read and write it again, and autograd keeps both the pre-activation and
the relu output for the backward. The fused forward keeps the fp32 accumulator in registers, applies
relu and square there, and writes only h.

Backward keeps only x, W and h (no pre-activation): for h > 0, relu(pre) = sqrt(h), so
    d h / d pre = 2 relu(pre) = 2 sqrt(h)        (0 where pre <= 0, and sqrt(0) = 0 gives exactly that)
    d pre = d h * 2 sqrt(h);   d x = d pre @ W^T;   d W = x^T @ d pre
The two matmuls go to cuBLAS (torch); the element-wise d pre is one Triton pass (read dh and h, write
d pre) instead of several torch kernels. sqrt of the bf16 h is as precise as a stored bf16 pre-activation
(sqrt halves the relative rounding error of h).

`linear_relu_square(x, w, kernel="auto")` picks Triton for bf16/fp16 CUDA tensors when Triton imports,
the twin otherwise; kernel="triton" where it cannot run raises. On CPU the Triton path runs only in the
Triton interpreter (TRITON_INTERPRET=1), which the tests use with small tiles.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional: CPU installs and tests use the twin.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["linear_relu_square", "linear_relu_square_reference", "linear_relu_square_triton"]

_KERNELS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.bfloat16, torch.float16)


# Read once at import, like Triton itself: a constant is also what torch.compile traces best.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests): CPU tensors, small tiles."""
    return _INTERPRET


def linear_relu_square_reference(x: Tensor, w_fc: Tensor) -> Tensor:
    """The plain twin: relu(x @ W)², W cast to x's dtype as the model does (W is stored fp32)."""
    return torch.relu(x @ w_fc.to(x.dtype)).square()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _linear_relu_square_kernel(
        x_ptr,
        w_ptr,
        h_ptr,
        M,
        N,
        stride_xm,
        stride_xk,
        stride_wk,
        stride_wn,
        stride_hm,
        stride_hn,
        K: tl.constexpr,  # constexpr: d is fixed for a model, and the K loop bound must be static
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong, so multiply in fp32 there
    ):
        # Grouped tile order: GROUP_M consecutive programs share one column band of W and walk
        # down the rows, so the W tiles they read are still in L2 when the next program needs them.
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(N, BLOCK_N)
        tiles_per_group = GROUP_M * tiles_n
        group = pid // tiles_per_group
        first_m = group * GROUP_M
        group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_in_group = pid % tiles_per_group
        pid_m = first_m + pid_in_group % group_rows
        pid_n = pid_in_group // group_rows

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < N
        x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm  # int64: T x d can exceed 2^31 elements
        w_cols = w_ptr + cols[None, :] * stride_wn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(x_rows + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        # Epilogue in fp32 registers: relu then square, one rounding to the output dtype.
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
        h_tile = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
        tl.store(h_tile, acc.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    _linear_relu_square_autotuned = triton.autotune(
        # Hopper-friendly tiles for K = 768 (short main loop): 128-row tiles fill a warpgroup MMA,
        # wide N tiles amortise the x loads; 3-4 stages hide HBM latency within the 228 KB of SMEM.
        configs=[
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
            triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        ],
        key=["M", "N", "K"],
    )(_linear_relu_square_kernel)

    @triton.jit
    def _relu_square_backward_kernel(grad_h_ptr, h_ptr, grad_pre_ptr, n_elements, BLOCK: tl.constexpr):
        # d pre = d h * 2 sqrt(h): relu(pre) rebuilt from the saved post-activation.
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad_h = tl.load(grad_h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_pre = 2.0 * tl.sqrt(h) * grad_h
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)


def _require_triton(x: Tensor, w: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("linear_relu_square: kernel='triton' needs the triton package, which is not importable")
    if not ((x.is_cuda and w.is_cuda) or _interpreting()):
        raise RuntimeError(
            f"linear_relu_square: kernel='triton' needs CUDA tensors (got {x.device}, {w.device}); use "
            "kernel='torch' or 'auto' on CPU (or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)"
        )
    if x.dtype not in _TRITON_DTYPES:
        raise RuntimeError(f"linear_relu_square: kernel='triton' needs bf16 or fp16 activations, got {x.dtype}")


def _forward(x: Tensor, w: Tensor) -> Tensor:
    m, k = x.shape
    n = w.shape[1]
    h = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return h
    args = (x, w, h, m, n, x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(0), h.stride(1))
    if _interpreting():
        # Small tiles keep the interpreter fast and exercise the masked edges of every dimension.
        grid = (triton.cdiv(m, 16) * triton.cdiv(n, 32),)
        _linear_relu_square_kernel[grid](*args, K=k, BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, UPCAST=True)
    else:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _linear_relu_square_autotuned[grid](*args, K=k, UPCAST=False)
    return h


def _grad_pre(grad_h: Tensor, h: Tensor) -> Tensor:
    grad_h = grad_h.contiguous()
    grad_pre = torch.empty_like(h)
    n = h.numel()
    block = 256 if _interpreting() else 2048
    if n > 0:
        _relu_square_backward_kernel[(triton.cdiv(n, block),)](grad_h, h, grad_pre, n, BLOCK=block, num_warps=8)
    return grad_pre


class _LinearReluSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:
        h = _forward(x, w)
        ctx.save_for_backward(x, w, h)  # h, not the pre-activation: sqrt(h) rebuilds relu(pre)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        x, w, h = ctx.saved_tensors
        grad_pre = _grad_pre(grad_h, h)
        grad_x = grad_pre @ w.t() if ctx.needs_input_grad[0] else None
        grad_w = x.t() @ grad_pre if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def linear_relu_square_triton(x: Tensor, w_fc: Tensor) -> Tensor:
    """The Triton path (no dispatch). See `linear_relu_square` for the arguments."""
    _check_shapes(x, w_fc)
    _require_triton(x, w_fc)
    lead = x.shape[:-1]
    # The cast is outside the autograd.Function so autograd casts dW back to W's (fp32) dtype.
    h = _LinearReluSquare.apply(x.reshape(-1, x.shape[-1]), w_fc.to(x.dtype))
    return h.reshape(*lead, w_fc.shape[1])


def _check_shapes(x: Tensor, w_fc: Tensor) -> None:
    if w_fc.dim() != 2 or x.dim() < 1 or x.shape[-1] != w_fc.shape[0]:
        raise ValueError(
            f"linear_relu_square: expected x (..., d) and w_fc (d, H), got {tuple(x.shape)} and {tuple(w_fc.shape)}"
        )


def linear_relu_square(x: Tensor, w_fc: Tensor, *, kernel: str = "auto") -> Tensor:
    """relu(x @ w_fc)² with x (..., d) and w_fc (d, H) stored (in, out); returns (..., H) in x's dtype.

    kernel: "auto" (Triton for bf16/fp16 CUDA tensors when importable, else the twin) | "triton"
    (error where it cannot run) | "torch" (the twin).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"linear_relu_square: kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        usable = HAS_TRITON and x.is_cuda and w_fc.is_cuda and x.dtype in _TRITON_DTYPES
        kernel = "triton" if usable else "torch"
    if kernel == "triton":
        return linear_relu_square_triton(x, w_fc)
    _check_shapes(x, w_fc)
    return linear_relu_square_reference(x, w_fc)
