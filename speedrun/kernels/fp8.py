"""The FP8 lm_head matmul (reference-spec 1.6) and its plain twin.

Owns:
- ``speedrun::fp8_mm``: a ``torch.library`` custom op computing x @ W^T with x and W quantized to
  float8 e4m3 (fixed scales, fast accumulation), with fake (meta) implementations and a
  hand-written backward registered with ``register_autograd`` (gradient quantized to e5m2);
- ``linear_head``: the bf16/fp32 twin (plain ``F.linear``), used on CPU, in eval and when FP8 is off;
- ``head_matmul``: the dispatcher the model calls.

Fixed scales (no amax tracking): x is RMS-normed, so |x_i| <= sqrt(dim) and x_s = sqrt(dim)/448
maps it into e4m3's range (448); w_s = 2^-9; the logit gradient of a summed, softcapped
cross-entropy is at most 1 in magnitude, grad_s = 1/448.

On non-CUDA devices the op still works (it emulates the scaled matmul in fp32 on the exact fp8
values), so its autograd wiring can be tested on CPU.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
E4M3_MAX = 448.0
W_SCALE = 2.0 ** -9
GRAD_SCALE = 1.0 / 448.0


def head_scales(dim: int) -> tuple[float, float, float]:
    """(x_s, w_s, grad_s) of the record (x_s = sqrt(768)/448 ~ 0.06186 for dim 768)."""
    return math.sqrt(dim) / E4M3_MAX, W_SCALE, GRAD_SCALE


@functools.cache
def fp8_supported(device_type: str, index: int | None = None) -> bool:
    """FP8 tensor-core matmuls need CUDA compute capability >= 8.9 (Ada, Hopper, Blackwell)."""
    if device_type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _scaled_mm(a: Tensor, b: Tensor, scale_a: float, scale_b: float, out_dtype: torch.dtype,
               fast_accum: bool) -> Tensor:
    """(a * scale_a) @ (b * scale_b) for fp8 a (row-major) and b (column-major)."""
    if a.is_cuda:
        # torch.full is a fill kernel: no host->device copy, no stream stall
        sa = torch.full((), scale_a, dtype=torch.float32, device=a.device)
        sb = torch.full((), scale_b, dtype=torch.float32, device=a.device)
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    # CPU emulation on the exact fp8 values (for tests of the op's wiring)
    return ((a.float() @ b.float()) * (scale_a * scale_b)).to(out_dtype)


@torch.library.custom_op("speedrun::fp8_mm", mutates_args=())
def fp8_mm(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, K) @ w (M, K)^T in fp8 e4m3. Returns (out (N, M) in x.dtype, x_f8, w_f8); the fp8
    copies are outputs so that the backward reuses them instead of quantizing again."""
    assert x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[1], "fp8_mm: (N,K) @ (M,K)^T"
    x_f8 = x.div(x_s).to(E4M3)
    w_f8 = w.div(w_s).to(E4M3)
    out = _scaled_mm(x_f8, w_f8.T, x_s, w_s, x.dtype, fast_accum=True)
    return out, x_f8, w_f8


@fp8_mm.register_fake
def _fp8_mm_fake(x: Tensor, w: Tensor, x_s: float, w_s: float, grad_s: float):
    return (x.new_empty(x.shape[0], w.shape[0]), x.new_empty(x.shape, dtype=E4M3),
            w.new_empty(w.shape, dtype=E4M3))


def _fp8_mm_setup_context(ctx, inputs, output) -> None:
    x, w, x_s, w_s, grad_s = inputs
    _, x_f8, w_f8 = output
    ctx.save_for_backward(x_f8, w_f8)
    ctx.scales = (x_s, w_s, grad_s)
    ctx.dtypes = (x.dtype, w.dtype)
    ctx.mark_non_differentiable(x_f8, w_f8)


def _fp8_mm_backward(ctx, grad_out: Tensor, _grad_x_f8, _grad_w_f8):
    """grad_x = g @ W, grad_W = g^T @ x with g quantized to e5m2 (more range, less precision:
    gradients span more orders of magnitude than activations). Plain traceable torch code, so a
    compiled caller can fuse the quantization into the producer of grad_out."""
    x_f8, w_f8 = ctx.saved_tensors
    x_s, w_s, grad_s = ctx.scales
    x_dtype, w_dtype = ctx.dtypes
    g_f8 = grad_out.div(grad_s).to(E5M2)
    # _scaled_mm wants its second operand column-major: .T.contiguous().T
    grad_x = _scaled_mm(g_f8, w_f8.T.contiguous().T, grad_s, w_s, x_dtype, fast_accum=False)
    grad_w = _scaled_mm(x_f8.T.contiguous(), g_f8.T.contiguous().T, x_s, grad_s, torch.float32,
                        fast_accum=False).T
    return grad_x, grad_w.to(w_dtype), None, None, None


fp8_mm.register_autograd(_fp8_mm_backward, setup_context=_fp8_mm_setup_context)


def fp8_linear(x: Tensor, w: Tensor, scales: tuple[float, float, float] | None = None) -> Tensor:
    """x @ w^T through the FP8 op (any device; real FP8 kernels only on CUDA)."""
    x_s, w_s, grad_s = scales if scales is not None else head_scales(x.shape[-1])
    return torch.ops.speedrun.fp8_mm(x, w, x_s, w_s, grad_s)[0]


def linear_head(x: Tensor, w: Tensor) -> Tensor:
    """The twin: a plain linear in the activation dtype."""
    return F.linear(x, w)


def fp8_active(requested: bool, device: torch.device) -> bool:
    """Whether the training head runs in FP8: requested and the device has FP8 tensor cores.
    Decided outside compiled code (the answer is a Python bool the compiled head specializes on)."""
    return bool(requested) and fp8_supported(device.type, device.index)


def head_matmul(x: Tensor, w: Tensor, use_fp8: bool, scales: tuple[float, float, float] | None = None) -> Tensor:
    """lm_head matmul: the FP8 op if ``use_fp8`` (already resolved by ``fp8_active``; ``scales`` its
    (x_s, w_s, grad_s), None = head_scales), else the twin."""
    return fp8_linear(x, w, scales) if use_fp8 else linear_head(x, w)
