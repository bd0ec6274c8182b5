"""Symmetric matmuls for Polar Express: ``X @ X.mT`` and ``b*A + c*A@A`` (A symmetric).

Both products are symmetric, so a Triton kernel computes only the tiles on and below the diagonal
and writes each off-diagonal tile twice (as itself and, transposed, as its mirror): about half the
FLOPs of a plain matmul. ``b*A + c*A@A`` is the same kernel as ``X @ X.mT`` (A@A == A@A.mT because A
is symmetric) with an epilogue adding ``b*A``.

Each kernel has a plain PyTorch twin (``*_reference``) that the tests compare against. The kernels
run on CUDA, or on CPU under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the CPU test suite checks them.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The interpreter's tl.dot mishandles bf16 operands (it multiplies their raw bits); there the tiles
# are widened to fp32 first, which is the same math (bf16 products are exact in fp32). No-op on GPU.
_WIDEN_FOR_INTERPRETER = tl.constexpr(_INTERPRET)


def xxt_reference(X: torch.Tensor) -> torch.Tensor:
    """X @ X.mT over the leading (batch) dims."""
    return X @ X.mT


def ba_plus_caa_reference(A: torch.Tensor, b: float, c: float) -> torch.Tensor:
    """b*A + c*A@A for square A over the leading (batch) dims."""
    return torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else b * A + c * (A @ A)


# (BLOCK, BLOCK_K, num_warps, num_stages) candidates. Autotuning them all at the first optimizer
# step costs seconds of start time per (M, K, HAS_ADD) key, so the kernel runs one fixed config
# (DEFAULT_CONFIG) unless AUTOTUNE is set (benchmarks/bench_optim.py --autotune, to re-pick it).
CANDIDATES = [(64, 64, 4, 4), (128, 64, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3)]
DEFAULT_CONFIG = (128, 64, 8, 3)
AUTOTUNE = False


def _configs() -> list[triton.Config]:
    if _INTERPRET:  # the interpreter runs every config; one small one keeps the CPU tests quick
        return [triton.Config({"BLOCK": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in CANDIDATES]


@triton.jit
def _symmetric_kernel(X, A, Out, M, K: tl.constexpr, alpha, beta,
                      sxb, sxm, sxk, sab, sam, san, sob, som, son,
                      HAS_ADD: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Out = alpha * X @ X.mT (+ beta * A), computing only lower-triangle tiles and mirroring."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # pid enumerates lower-triangle tiles row by row: (0,0), (1,0), (1,1), (2,0), ...
    i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)          # fix float rounding either way
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2

    rows = i * BLOCK + tl.arange(0, BLOCK)
    cols = j * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    X += batch * sxb
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        left = tl.load(X + rows[:, None] * sxm + kk[None, :] * sxk,
                       mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        right = tl.load(X + cols[None, :] * sxm + kk[:, None] * sxk,   # X[cols].T, (BLOCK_K, BLOCK)
                        mask=(cols[None, :] < M) & (kk[:, None] < K), other=0.0)
        if _WIDEN_FOR_INTERPRETER:
            left, right = left.to(tl.float32), right.to(tl.float32)
        acc = tl.dot(left, right, acc)
    acc = acc * alpha
    tile_mask = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_ADD:
        add = tl.load(A + batch * sab + rows[:, None] * sam + cols[None, :] * san, mask=tile_mask, other=0.0)
        acc += beta * add.to(tl.float32)
    out = acc.to(Out.dtype.element_ty)
    Out += batch * sob
    tl.store(Out + rows[:, None] * som + cols[None, :] * son, out, mask=tile_mask)
    if i != j:  # the mirror tile; A is symmetric, so beta*A[j,i] == beta*A[i,j].T
        tl.store(Out + cols[:, None] * som + rows[None, :] * son, tl.trans(out),
                 mask=(cols[:, None] < M) & (rows[None, :] < M))


_symmetric_autotuned = triton.autotune(configs=_configs(), key=["M", "K", "HAS_ADD"])(_symmetric_kernel)


def _launch(X: torch.Tensor, A: torch.Tensor | None, out: torch.Tensor, alpha: float, beta: float) -> None:
    B, M, K = X.shape
    add = A if A is not None else X  # unused pointer when HAS_ADD is false
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK"]) * (triton.cdiv(M, meta["BLOCK"]) + 1) // 2, B)
    args = (X, add, out, M, K, alpha, beta, *X.stride(), *add.stride(), *out.stride())
    if AUTOTUNE or _INTERPRET:
        _symmetric_autotuned[grid](*args, HAS_ADD=A is not None)
        return
    block, block_k, warps, stages = DEFAULT_CONFIG
    _symmetric_kernel[grid](*args, HAS_ADD=A is not None, BLOCK=block, BLOCK_K=block_k,
                            num_warps=warps, num_stages=stages)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.size(-2), x.size(-1))


def xxt(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """X @ X.mT for X of shape (..., M, K); result (..., M, M) in X's dtype (fp32 accumulation)."""
    X3 = _as_3d(X)
    if out is None:
        out = X.new_empty(*X.shape[:-1], X.size(-2))
    _launch(X3, None, _as_3d(out), 1.0, 0.0)
    return out


def ba_plus_caa(A: torch.Tensor, b: float, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """b*A + c*A@A for symmetric A of shape (..., M, M) (symmetry is assumed, not checked)."""
    if A.size(-1) != A.size(-2):
        raise ValueError(f"ba_plus_caa needs square matrices, got shape {tuple(A.shape)}")
    A3 = _as_3d(A)
    if out is None:
        out = torch.empty_like(A)
    _launch(A3, A3, _as_3d(out), float(c), float(b))
    return out
