"""Fused ReLU² MLP: Triton matmuls with the activation (forward) or its derivative (backward) in the
epilogue, one opaque custom op for the whole MLP, and the plain twins.

Owns the model's MLP maths, out = relu(x @ W_fc)² @ W_proj^T, with x (T, d) activations (bf16 on GPU),
W_fc (d, H) stored (in, out) as the model keeps it (`mlp_fc`, used as x @ W_fc) and W_proj (d, H) an
nn.Linear weight (`mlp_proj`, used as F.linear(h, W_proj)). Two entry points:

* `relu2_mlp(x, w_fc, w_proj)`: the whole MLP (what `MLP.forward` calls with `model.fused_mlp`). Its
  Triton path is the `speedrun::relu2_mlp` custom op (opaque to torch.compile, so it sits inside the
  fullgraph-compiled blocks); twin: `relu2_mlp_reference`, exactly the model's plain code.
* `linear_relu_square(x, w_fc)`: the up-projection alone, h = relu(x @ W_fc)² (kept for
  benchmarks/bench_kernels.py); twin: `linear_relu_square_reference`.

Why fuse: unfused, the up-projection writes the pre-activation (T x H bf16, 201 MB at the record's
32768 x 3072), relu and square each read and write it again, and autograd keeps both the
pre-activation and the relu output for the backward. The backward then writes d h = d out @ W_proj
(another T x H), and a pointwise kernel reads it with the pre-activation to write d pre. Fused:

    forward   h = relu(x @ W_fc)²        one Triton matmul, relu² on the fp32 accumulator, writes only h
              out = h @ W_proj^T         cuBLAS
    backward  d pre = (d out @ W_proj) * 2 sqrt(h)   one Triton matmul whose epilogue loads the h tile:
                                                     d h never exists in memory
              d W_proj = d out^T @ h;  d x = d pre @ W_fc^T;  d W_fc = x^T @ d pre     cuBLAS

Only x, h and the two (already cast) weights are saved; never the pre-activation, because for h > 0
relu(pre) = sqrt(h), so
    d h / d pre = 2 relu(pre) = 2 sqrt(h)        (0 where pre <= 0, and sqrt(0) = 0 gives exactly that)
sqrt of the bf16 h is as precise as a stored bf16 pre-activation (sqrt halves the relative rounding
error of h), and d h stays in fp32 registers instead of being rounded to bf16.

Launch configuration: each kernel has one fixed tile config (`FORWARD_CONFIG`, `BACKWARD_CONFIG`) for
Hopper at the record's sizes (`SMALL_SMEM_CONFIG` on GPUs with less shared memory per block), so the
first call compiles one kernel (autotuning would compile and time
all `CONFIGS` at start-up, seconds of cold start). `AUTOTUNE = True` (or autotune=True per call) runs
the Triton autotuner over `CONFIGS` instead; benchmarks/bench_mlp.py uses it to choose the defaults.

`kernel="auto"` picks Triton for bf16/fp16 CUDA tensors when Triton imports, the twin otherwise;
kernel="triton" where it cannot run raises. On CPU the Triton path runs only in the Triton
interpreter (TRITON_INTERPRET=1), which the tests use with small tiles.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

__all__ = [
    "relu2_mlp",
    "relu2_mlp_reference",
    "relu2_mlp_triton",
    "linear_relu_square",
    "linear_relu_square_reference",
    "linear_relu_square_triton",
    "matmul_relu2",
    "matmul_relu2_grad",
    "relu2_grad_pre_reference",
    "relu2_mlp_grads",
    "TileConfig",
]

_KERNELS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.bfloat16, torch.float16)


# Read once at import, like Triton itself: a constant is also what torch.compile traces best.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests): CPU tensors, small tiles."""
    return _INTERPRET


# --------------------------------------------------------------------------------------------------
# The plain twins
# --------------------------------------------------------------------------------------------------
def linear_relu_square_reference(x: Tensor, w_fc: Tensor) -> Tensor:
    """The plain twin: relu(x @ W)², W cast to x's dtype as the model does (W is stored fp32)."""
    return torch.relu(x @ w_fc.to(x.dtype)).square()


def relu2_mlp_reference(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    """The plain twin of the whole MLP: exactly `MLP.forward` with relu², weights cast to x's dtype."""
    h = x @ w_fc.to(x.dtype)
    h = F.relu(h).square()
    return F.linear(h, w_proj.to(x.dtype))


# --------------------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of the matmul kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def smem_bytes(self, element_size: int = 2) -> int:
        """Shared memory of the pipelined operand tiles (the epilogue may need more on top)."""
        return (self.block_m * self.block_k + self.block_k * self.block_n) * element_size * self.num_stages

    def meta(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k, GROUP_M=self.group_m)

    def __str__(self) -> str:
        return (f"BLOCK_M={self.block_m} BLOCK_N={self.block_n} BLOCK_K={self.block_k} GROUP_M={self.group_m} "
                f"num_warps={self.num_warps} num_stages={self.num_stages}")


# Hopper (H100: 227 KB of shared memory per block), bf16, M = 32768 tokens, N = H = 3072, K = d = 768.
# Both kernels: the autotuner's pick of the CONFIGS sweep on an H100 (benchmarks/bench_mlp.py,
# 2026-11-28): forward 0.275 ms vs 0.308 ms for 128 x 256 / 3 stages, backward 0.359 ms vs 0.377 ms
# for 128 x 128 / 3 stages; 4 stages = (128*64 + 64*256) * 2 B * 4 = 192 KB (Triton reuses the
# pipeline buffers for the epilogue), GROUP_M 16 keeps more of x in L2 across neighbouring tiles.
FORWARD_CONFIG = TileConfig(128, 256, 64, 16, num_warps=8, num_stages=4)
BACKWARD_CONFIG = TileConfig(128, 256, 64, 16, num_warps=8, num_stages=4)
# GPUs with less shared memory per block (A100: 164 KB, consumer cards: ~100 KB): 96 KB tiles.
SMALL_SMEM_CONFIG = TileConfig(128, 128, 64, 8, num_warps=8, num_stages=3)
# The candidates of the autotuner and of bench_mlp.py's sweep (the two defaults first).
CONFIGS = (
    TileConfig(128, 256, 64, 8, num_warps=8, num_stages=3),
    SMALL_SMEM_CONFIG,
    TileConfig(128, 128, 64, 8, num_warps=8, num_stages=4),
    TileConfig(128, 128, 64, 8, num_warps=4, num_stages=4),
    TileConfig(256, 128, 64, 8, num_warps=8, num_stages=3),
    FORWARD_CONFIG,
    TileConfig(64, 256, 64, 8, num_warps=4, num_stages=4),
)
# The interpreter: small tiles keep it fast and exercise the masked edges of every dimension.
INTERPRETER_CONFIG = TileConfig(16, 32, 16, 2, num_warps=4, num_stages=1)

AUTOTUNE = False  # True: autotune over CONFIGS at the first launch of each size (benchmarks only)


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _relu2_matmul_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        h_ptr,
        M,
        N,
        stride_am,
        stride_ak,
        stride_bk,
        stride_bn,
        stride_cm,
        stride_cn,
        stride_hm,
        stride_hn,
        K: tl.constexpr,  # constexpr: d is fixed for a model, and the K loop bound must be static
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        RELU2_GRAD: tl.constexpr,  # False: c = relu(a @ b)²; True: c = (a @ b) * 2 sqrt(h)
        UPCAST: tl.constexpr,  # interpreter only: its bf16 dot is wrong, so multiply in fp32 there
    ):
        # Grouped tile order: GROUP_M consecutive programs share one column band of b and walk
        # down the rows, so the b tiles they read are still in L2 when the next program needs them.
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
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_am  # int64: T x H can exceed 2^31 elements
        b_cols = b_ptr + cols[None, :] * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if K % BLOCK_K == 0:  # static: no K mask in the main loop at the model's sizes
                a_mask = row_ok[:, None]
                b_mask = col_ok[None, :]
            else:
                a_mask = row_ok[:, None] & (ks < K)[None, :]
                b_mask = (ks < K)[:, None] & col_ok[None, :]
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=a_mask, other=0.0)
            b = tl.load(b_cols + ks[:, None] * stride_bk, mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)

        # Epilogue in fp32 registers, one rounding to the output dtype.
        tile_ok = row_ok[:, None] & col_ok[None, :]
        if RELU2_GRAD:
            # d pre = d h * 2 relu(pre) = d h * 2 sqrt(h): d h (the accumulator) is never stored.
            h_tile = h_ptr + rows.to(tl.int64)[:, None] * stride_hm + cols[None, :] * stride_hn
            h = tl.load(h_tile, mask=tile_ok, other=0.0).to(tl.float32)
            acc = acc * (2.0 * tl.sqrt(h))
        else:
            acc = tl.maximum(acc, 0.0)
            acc = acc * acc
        c_tile = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_tile, acc.to(c_ptr.dtype.element_ty), mask=tile_ok)

    def _autotuned(configs):
        return triton.autotune(
            configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages) for c in configs],
            key=["M", "N", "K"],
        )(_relu2_matmul_kernel)

    # Two tuners over the same kernel: each keeps its own best config (the epilogues differ).
    _linear_relu_square_autotuned = _autotuned(CONFIGS)
    _relu2_grad_autotuned = _autotuned(CONFIGS)

    @triton.jit
    def _relu_square_backward_kernel(grad_h_ptr, h_ptr, grad_pre_ptr, n_elements, BLOCK: tl.constexpr):
        # d pre = d h * 2 sqrt(h), element-wise (linear_relu_square's backward, where d h is an input).
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        grad_h = tl.load(grad_h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_pre = 2.0 * tl.sqrt(h) * grad_h
        tl.store(grad_pre_ptr + offsets, grad_pre.to(grad_pre_ptr.dtype.element_ty), mask=mask)


def _launch(a: Tensor, b: Tensor, c: Tensor, h: Tensor, grad: bool, config: TileConfig | None,
            autotune: bool | None) -> None:
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0:
        return
    args = (a, b, c, h, m, n, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1), h.stride(0), h.stride(1))
    if config is None and not _interpreting() and (AUTOTUNE if autotune is None else autotune):
        tuner = _relu2_grad_autotuned if grad else _linear_relu_square_autotuned

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        tuner[grid](*args, K=k, RELU2_GRAD=grad, UPCAST=False)
        return
    if config is None:
        config = INTERPRETER_CONFIG if _interpreting() else _default_config(grad, a.device)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _relu2_matmul_kernel[grid](*args, K=k, **config.meta(), RELU2_GRAD=grad, UPCAST=_interpreting(),
                               num_warps=config.num_warps, num_stages=config.num_stages)


@functools.cache
def _fits_hopper_tiles(device_index: int) -> bool:
    """Whether the device has the ~200 KB of shared memory per block the Hopper tiles use."""
    props = torch.cuda.get_device_properties(device_index)
    return getattr(props, "shared_memory_per_block_optin", 0) >= 200 * 1024


def _default_config(grad: bool, device: torch.device) -> TileConfig:
    if device.type == "cuda" and not _fits_hopper_tiles(device.index or 0):
        return SMALL_SMEM_CONFIG
    return BACKWARD_CONFIG if grad else FORWARD_CONFIG


def matmul_relu2(x: Tensor, w: Tensor, *, config: TileConfig | None = None, autotune: bool | None = None) -> Tensor:
    """The forward kernel: relu(x @ w)² for x (M, K), w (K, N) of one 16-bit dtype; returns (M, N).

    config: a fixed TileConfig (default FORWARD_CONFIG, INTERPRETER_CONFIG in the interpreter);
    autotune: tune over CONFIGS instead (default: the module's AUTOTUNE); ignored when config is given."""
    h = torch.empty((x.shape[0], w.shape[1]), device=x.device, dtype=x.dtype)
    _launch(x, w, h, h, False, config, autotune)  # h_ptr unused by the forward epilogue
    return h


def matmul_relu2_grad(grad_out: Tensor, w_proj: Tensor, h: Tensor, *, config: TileConfig | None = None,
                      autotune: bool | None = None) -> Tensor:
    """The backward kernel: d pre = (grad_out @ w_proj) * 2 sqrt(h) for grad_out (M, d), w_proj (d, H)
    and h (M, H) = relu(pre)²; returns d pre (M, H) in h's dtype. config/autotune as in matmul_relu2
    (default BACKWARD_CONFIG)."""
    grad_pre = torch.empty((grad_out.shape[0], w_proj.shape[1]), device=h.device, dtype=h.dtype)
    _launch(grad_out, w_proj, grad_pre, h, True, config, autotune)
    return grad_pre


# --------------------------------------------------------------------------------------------------
# The whole MLP as a custom op (opaque to torch.compile; backward registered with autograd)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("speedrun::relu2_mlp", mutates_args=())
def _relu2_mlp_op(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> tuple[Tensor, Tensor]:
    """x (T, d), w_fc (d, H), w_proj (d, H), all one 16-bit dtype. Returns (out (T, d), h (T, H)); h is an
    output only so that the backward can save it (it is marked non-differentiable)."""
    h = matmul_relu2(x, w_fc)
    return F.linear(h, w_proj), h


@_relu2_mlp_op.register_fake
def _relu2_mlp_fake(x: Tensor, w_fc: Tensor, w_proj: Tensor):
    return x.new_empty(x.shape[0], w_proj.shape[0]), x.new_empty(x.shape[0], w_fc.shape[1])


@torch.library.custom_op("speedrun::relu2_mlp_grad_pre", mutates_args=())
def _relu2_grad_pre_op(grad_out: Tensor, w_proj: Tensor, h: Tensor) -> Tensor:
    """d pre = (grad_out @ w_proj) * 2 sqrt(h), (T, H): the backward kernel as an op of its own, because
    a compiled caller's backward is traced with fake tensors, which a raw Triton launch cannot take."""
    return matmul_relu2_grad(grad_out, w_proj, h)


@_relu2_grad_pre_op.register_fake
def _relu2_grad_pre_fake(grad_out: Tensor, w_proj: Tensor, h: Tensor):
    return h.new_empty(h.shape)


def _relu2_mlp_setup_context(ctx, inputs, output) -> None:
    x, w_fc, w_proj = inputs
    _, h = output
    ctx.save_for_backward(x, w_fc, w_proj, h)  # h, not the pre-activation: sqrt(h) rebuilds relu(pre)
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)  # else eager autograd writes a T x H zero "gradient" of h


def relu2_grad_pre_reference(grad_out: Tensor, w_proj: Tensor, h: Tensor) -> Tensor:
    """The plain twin of `matmul_relu2_grad`: (grad_out @ w_proj) * 2 sqrt(h) in fp32, rounded once to
    h's dtype as the kernel's epilogue does."""
    return ((grad_out.float() @ w_proj.float()) * (2.0 * h.float().sqrt())).to(h.dtype)


def relu2_mlp_grads(grad_out: Tensor | None, x: Tensor, w_fc: Tensor, w_proj: Tensor, h: Tensor,
                    needs: tuple[bool, ...] = (True, True, True), fused: bool = True):
    """(d x, d W_fc, d W_proj) of out = h @ W_proj^T with h = relu(x @ W_fc)², from h alone:
    d pre = (d out @ W_proj) * 2 sqrt(h). Shared by this module's op and the FP8 MLP (kernels/fp8_mlp.py),
    whose backward is this bf16 one. fused: d pre through the Triton kernel op (CUDA or the interpreter),
    else `relu2_grad_pre_reference`. Plain traceable torch around it: the three cuBLAS matmuls stay visible
    to a compiled caller (and are skipped for inputs that need no gradient); None where not needed."""
    need_x, need_fc, need_proj = needs[:3]
    grad_x = grad_w_fc = grad_w_proj = None
    if grad_out is None:  # out did not reach the loss (grads are not materialized)
        return grad_x, grad_w_fc, grad_w_proj
    grad_out = grad_out.to(h.dtype)
    if need_x or need_fc:
        if fused:
            grad_pre = torch.ops.speedrun.relu2_mlp_grad_pre(grad_out, w_proj, h)
        else:
            grad_pre = relu2_grad_pre_reference(grad_out, w_proj, h)
        grad_x = grad_pre @ w_fc.t() if need_x else None
        grad_w_fc = x.t() @ grad_pre if need_fc else None
    if need_proj:
        grad_w_proj = grad_out.t() @ h
    return grad_x, grad_w_fc, grad_w_proj


def _relu2_mlp_backward(ctx, grad_out: Tensor, _grad_h):
    x, w_fc, w_proj, h = ctx.saved_tensors
    return relu2_mlp_grads(grad_out, x, w_fc, w_proj, h, ctx.needs_input_grad)


_relu2_mlp_op.register_autograd(_relu2_mlp_backward, setup_context=_relu2_mlp_setup_context)


# --------------------------------------------------------------------------------------------------
# linear_relu_square's autograd (up-projection only; d h arrives from outside, so it stays element-wise)
# --------------------------------------------------------------------------------------------------
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
        h = matmul_relu2(x, w)
        ctx.save_for_backward(x, w, h)  # h, not the pre-activation: sqrt(h) rebuilds relu(pre)
        return h

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        x, w, h = ctx.saved_tensors
        grad_pre = _grad_pre(grad_h, h)
        grad_x = grad_pre @ w.t() if ctx.needs_input_grad[0] else None
        grad_w = x.t() @ grad_pre if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


# --------------------------------------------------------------------------------------------------
# Checks and dispatchers
# --------------------------------------------------------------------------------------------------
def _require_triton(name: str, *tensors: Tensor) -> None:
    x = tensors[0]
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: kernel='triton' needs the triton package, which is not importable")
    if not (all(t.is_cuda for t in tensors) or _interpreting()):
        raise RuntimeError(
            f"{name}: kernel='triton' needs CUDA tensors (got {', '.join(str(t.device) for t in tensors)}); use "
            "kernel='torch' or 'auto' on CPU (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
        )
    if x.dtype not in _TRITON_DTYPES:
        raise RuntimeError(f"{name}: kernel='triton' needs bf16 or fp16 activations, got {x.dtype}")


def _check_shapes(x: Tensor, w_fc: Tensor) -> None:
    if w_fc.dim() != 2 or x.dim() < 1 or x.shape[-1] != w_fc.shape[0]:
        raise ValueError(
            f"linear_relu_square: expected x (..., d) and w_fc (d, H), got {tuple(x.shape)} and {tuple(w_fc.shape)}"
        )


def _check_mlp_shapes(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> None:
    if w_fc.dim() != 2 or x.dim() < 1 or x.shape[-1] != w_fc.shape[0] or w_proj.shape != w_fc.shape:
        raise ValueError(
            f"relu2_mlp: expected x (..., d), w_fc (d, H) and w_proj (d, H), got {tuple(x.shape)}, "
            f"{tuple(w_fc.shape)} and {tuple(w_proj.shape)}"
        )


def _check_kernel(name: str, kernel: str) -> None:
    if kernel not in _KERNELS:
        raise ValueError(f"{name}: kernel must be one of {_KERNELS}, got {kernel!r}")


def _triton_usable(*tensors: Tensor) -> bool:
    return HAS_TRITON and all(t.is_cuda for t in tensors) and tensors[0].dtype in _TRITON_DTYPES


def relu2_mlp_triton(x: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    """The fused path (no dispatch). See `relu2_mlp` for the arguments."""
    _check_mlp_shapes(x, w_fc, w_proj)
    _require_triton("relu2_mlp", x, w_fc, w_proj)
    lead = x.shape[:-1]
    # The casts are outside the op so autograd casts the weight gradients back to fp32.
    out, _ = torch.ops.speedrun.relu2_mlp(x.reshape(-1, x.shape[-1]), w_fc.to(x.dtype), w_proj.to(x.dtype))
    return out.reshape(*lead, w_proj.shape[0])


def relu2_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, *, kernel: str = "auto") -> Tensor:
    """relu(x @ w_fc)² @ w_proj^T with x (..., d), w_fc (d, H) stored (in, out) and w_proj (d, H) an
    nn.Linear weight; weights of any float dtype, cast to x's. Returns (..., d) in x's dtype.

    kernel: "auto" (the fused op for bf16/fp16 CUDA tensors when Triton imports, else the twin) |
    "triton" (error where it cannot run) | "torch" (the twin)."""
    _check_kernel("relu2_mlp", kernel)
    if kernel == "auto":
        kernel = "triton" if _triton_usable(x, w_fc, w_proj) else "torch"
    if kernel == "triton":
        return relu2_mlp_triton(x, w_fc, w_proj)
    _check_mlp_shapes(x, w_fc, w_proj)
    return relu2_mlp_reference(x, w_fc, w_proj)


def linear_relu_square_triton(x: Tensor, w_fc: Tensor) -> Tensor:
    """The Triton path (no dispatch). See `linear_relu_square` for the arguments."""
    _check_shapes(x, w_fc)
    _require_triton("linear_relu_square", x, w_fc)
    lead = x.shape[:-1]
    # The cast is outside the autograd.Function so autograd casts dW back to W's (fp32) dtype.
    h = _LinearReluSquare.apply(x.reshape(-1, x.shape[-1]), w_fc.to(x.dtype))
    return h.reshape(*lead, w_fc.shape[1])


def linear_relu_square(x: Tensor, w_fc: Tensor, *, kernel: str = "auto") -> Tensor:
    """relu(x @ w_fc)² with x (..., d) and w_fc (d, H) stored (in, out); returns (..., H) in x's dtype.

    kernel: "auto" (Triton for bf16/fp16 CUDA tensors when importable, else the twin) | "triton"
    (error where it cannot run) | "torch" (the twin).
    """
    _check_kernel("linear_relu_square", kernel)
    if kernel == "auto":
        kernel = "triton" if _triton_usable(x, w_fc) else "torch"
    if kernel == "triton":
        return linear_relu_square_triton(x, w_fc)
    _check_shapes(x, w_fc)
    return linear_relu_square_reference(x, w_fc)
