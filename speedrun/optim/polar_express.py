"""Polar Express orthogonalization: G -> approximately U V^T (the polar factor of G), batched, bf16.

Five odd-polynomial steps X <- a*X + (b*A + c*A@A) @ X with A = X @ X.mT, using the record's
coefficients (computed for 5 iterations, safety 2e-2, cushion 2). The input is first scaled so its
spectral norm is below 1 (Frobenius norm * 1.02), and wide matrices are used as-is while tall ones
are transposed, so A is always the smaller Gram matrix.

``polar_express_reference`` is the plain PyTorch twin. The Triton path replaces the two symmetric
products (X@X.mT and b*A + c*A@A) with kernels that compute one triangle and mirror it
(speedrun/kernels/symmetric_matmul.py); the remaining X update stays a cuBLAS baddbmm.
"""
from __future__ import annotations

import os

import torch

# (a, b, c) per iteration: p(x) = a*x + b*x^3 + c*x^5 applied to the singular values.
COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


AUTO_TRITON_MIN_DIM = 128   # kernel="auto" uses the symmetric kernels from this size of the Gram matrix


def _prepare(G: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """bf16, (batch, rows <= cols), spectral norm < 1."""
    if G.dim() < 2:
        raise ValueError(f"polar_express needs matrices (..., m, n), got shape {tuple(G.shape)}")
    X = G.bfloat16().reshape(-1, G.size(-2), G.size(-1))
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    return X.contiguous(), tall


def _finish(X: torch.Tensor, tall: bool, shape: torch.Size) -> torch.Tensor:
    return (X.mT if tall else X).reshape(shape)


def polar_express_reference(G: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch Polar Express over the leading dims of G (..., m, n); returns bf16."""
    X, tall = _prepare(G)
    for a, b, c in COEFFICIENTS:
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)   # b*A + c*A@A
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)  # a*X + B@X
    return _finish(X, tall, G.shape)


def _polar_express_triton(G: torch.Tensor) -> torch.Tensor:
    from speedrun.kernels.symmetric_matmul import ba_plus_caa, xxt
    X, tall = _prepare(G)
    A = X.new_empty(X.size(0), X.size(1), X.size(1))
    B = torch.empty_like(A)
    for a, b, c in COEFFICIENTS:
        xxt(X, out=A)
        ba_plus_caa(A, b, c, out=B)
        X = torch.baddbmm(X, B, X, beta=a, alpha=1.0)
    return _finish(X, tall, G.shape)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(G: torch.Tensor, kernel: str) -> bool:
    if kernel == "torch":
        return False
    if kernel == "auto":
        # small matrices (the gates, 6 x 12): cuBLAS is faster there (H200: 0.58 vs 0.76 ms for
        # 10 x 6 x 12), and one kernel variant fewer to JIT-compile at start
        return G.is_cuda and min(G.shape[-2:]) >= AUTO_TRITON_MIN_DIM and triton_available()
    if kernel == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"  # CPU tests of the kernels
        if not triton_available():
            raise RuntimeError("polar_express(kernel='triton'): triton is not installed; "
                               "use kernel='torch' or 'auto'")
        if not (G.is_cuda or interpreted):
            raise RuntimeError(f"polar_express(kernel='triton'): the Triton kernels need a CUDA tensor "
                               f"(got one on {G.device}); use kernel='torch' or 'auto'")
        return True
    raise ValueError(f"polar_express: kernel must be 'auto', 'triton' or 'torch', got {kernel!r}")


def polar_express(G: torch.Tensor, kernel: str = "auto") -> torch.Tensor:
    """Orthogonalize each matrix of G (..., m, n); returns bf16 of the same shape.

    kernel: "torch" (plain twin), "triton" (symmetric kernels; error if unavailable), "auto"
    (Triton on CUDA when triton is importable and the matrices are not tiny, else torch).
    """
    if _use_triton(G, kernel):
        return _polar_express_triton(G)
    return polar_express_reference(G)
