"""The FP8 ReLU² MLP of record 89 (`model.fp8_mlp`): both projections' forward matmuls in float8 e4m3,
the backward in bf16; the per-layer scale state and its refresh after every optimizer step; the plain
twin that emulates the exact quantisation.

Layouts are the model's (MLP in gpt.py): x (T, d) normed activations, W_fc (d, H) used as x @ W_fc,
W_proj (d, H) used as F.linear(h, W_proj); d = 768, H = 3072 in the record. The maths, per layer:

    up      a_x  = max(max|x|, 1e-12)                       current amax of this forward's input
            x8   = e4m3(clamp(x * 448 / a_x))               s_x = a_x / 448
            W8   = e4m3(clamp(W_fc^T / s_fc)),              s_fc = max(amax|W_fc|, 1e-12) / 448  (refresh)
            pre  = bf16((x8 @ W8^T) * (s_x * s_fc))         fp8 x fp8, fp32 accumulation
            post = bf16(relu(pre)²)                         saved for the backward (no pre-activation)
    down    a    = the layer's delayed activation scale      previous forward's max(post) * 1.80 / 448
            p8   = e4m3(min(post * (1/a), 448))             values above the delayed scale saturate
            P8   = e4m3(clamp(W_proj / s_proj))             s_proj: delayed (previous refresh's
                                                             amax|W_proj| * 1.12 / 448), exact in the
                                                             forwards of steps 0..fp8_mlp_exact_steps
            out  = bf16((p8 @ P8^T) * (a * s_proj))         torch._scaled_mm (cuBLASLt)
    back    dW_proj = g^T post;  dpre = (g @ W_proj) * 2 sqrt(post);  dW_fc = x^T dpre;  dx = dpre W_fc^T
            (bf16, the real weights; relu2_mlp.py's kernel for dpre)

Every cast to e4m3 is preceded by an explicit clamp to +-448: an eager CUDA cast of an out-of-range
value gives NaN while a compiled one saturates (measured, r89-training.md 6.4), so eager and compiled
code agree only with the clamp. Conversions round to nearest even.

State (`FP8MLPState`, one per layer, a submodule of the MLP):
* persistent buffers (in the model's state_dict; the warm-up's snapshot restores them; checkpoints save
  them per rank, train/checkpoint.py): `w_proj_scale` (the s_proj the current W_proj copy was made
  with), `w_proj_next_scale` (the delayed s_proj for the next refresh), `act_scales` (one delayed
  activation scale per micro-step slot, initially 1.0) and `slot` (which slot the next training
  forward uses);
* non-persistent buffers rebuilt from the weights: the fp8 weights and s_fc. After any
  `load_state_dict` the MLP re-quantises them with the loaded s_proj ("keep"), which reproduces
  exactly what was saved.

Delayed activation scales and world sizes. The record keeps one scale per layer and rank, updated by
every forward: on 8 GPUs (one micro-batch per rank and step) micro-batch r of step s uses rank r's
amax of step s-1; on 1 GPU with 8 micro-steps, micro-batch j uses micro-batch j-1's amax (j = 0: the
previous step's last one), a different trajectory. Here each layer keeps one scale per micro-step
slot (`micro_steps` = the trainer's grad_accum): micro-step j uses the amax of micro-step j of the
previous step, which is what rank j does on 8 GPUs, so 1 GPU x 8 follows the 8-GPU trajectory (the
project's rule) at the cost of 8 floats per layer. The refresh after the optimizer step resets the
slot to 0; with micro_steps = 1 it is the record's per-rank scale. Ranks never synchronise scales.

Paths (`fp8_relu2_mlp`, what MLP.forward calls in training):
* "triton": the custom op `speedrun::fp8_relu2_mlp` (bf16 CUDA activations, FP8 tensor cores):
  one persistent Triton fp8 x fp8 matmul (TMA loads and stores) whose epilogue dequantises, squares,
  writes post in bf16 and in e4m3 (with the layer's delayed scale, read on the device from its slot)
  and the max of post (one atomic per program); `torch._scaled_mm` for the down projection, each scale
  in its own 16-byte-aligned
  allocation (cuBLASLt under CUDA 13 rejects scale pointers at 4-byte offsets with
  CUBLAS_STATUS_NOT_SUPPORTED, which is why the record's (1,)-views into one buffer fail there).
  The activation quantisation and the scale bookkeeping around the op are plain torch, fused by
  torch.compile into the block's graph; nothing depends on host values, so no recompiles and no
  host syncs (CUDA graphs replay it).
* "torch": the twin, readable torch emulating the same quantisation (quantise, fp32 matmul of the
  fp8 values, same scales and saturation) with the same bf16 backward. Training on the CPU runs it, so
  CPU runs follow the FP8 trajectory (and test the state's bookkeeping); GPUs without FP8 tensor cores
  (compute capability < 8.9) keep the bf16 MLP (`fp8_mlp_runs_on`), as the FP8 head does.
Evaluation never uses FP8 (MLP.forward takes the bf16 path when not training).

The weight refresh (`FP8MLPState.refresh`) is two Triton launches per layer on CUDA (per-tile amax of
both matrices; then quantise, W_fc transposed to (H, d) so both fp8 operands are K-major, plus the
scale bookkeeping by program 0), the twin elsewhere; both bitwise equal.
"""
from __future__ import annotations

import os
from typing import Literal

import torch
from torch import Tensor, nn

from speedrun.kernels.fp8 import E4M3, E4M3_MAX, fp8_supported
from speedrun.kernels.relu2_mlp import TileConfig, _fits_hopper_tiles, relu2_mlp_grads
from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "AMAX_FLOOR",
    "FP8MLPState",
    "fp8_relu2_mlp",
    "fp8_relu2_mlp_reference",
    "fp8_mlp_runs_on",
    "fp8_up_projection",
    "up_projection_reference",
    "down_projection",
    "down_projection_reference",
    "quantize_e4m3",
    "quantize_activation",
    "RefreshMode",
]

AMAX_FLOOR = 1e-12      # the record's floor on every amax (a zero matrix gets a tiny, finite scale)
RefreshMode = Literal["exact", "delayed", "keep"]
_MODES = {"exact": 0, "delayed": 1, "keep": 2}
_KERNELS = ("auto", "triton", "torch")

# Read once at import, like Triton itself (and relu2_mlp.py).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    return _INTERPRET


# --------------------------------------------------------------------------------------------------
# Quantisation and the twin's maths (plain torch; also the op's CPU path)
# --------------------------------------------------------------------------------------------------
def quantize_e4m3(values: Tensor) -> Tensor:
    """fp32 values -> e4m3, round to nearest even, saturating at +-448 (explicit clamp, see above)."""
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tensor current scaling of the up-projection input x (T, d): (x8 e4m3 (T, d), s_x (1,) fp32)
    with s_x = max(max|x|, 1e-12) / 448. x carries no gradient here (pass x.detach())."""
    amax = x.abs().amax().float().clamp_min(AMAX_FLOOR).view(1)
    return quantize_e4m3(x.float() * (E4M3_MAX / amax)), amax / E4M3_MAX


def up_projection_reference(x_f8: Tensor, x_scale: Tensor, w_fc_f8: Tensor, w_fc_scale: Tensor,
                            act_scale: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(post, post8): post = relu(pre)² in out_dtype with pre = out_dtype((x8 @ W8^T) * (s_x s_fc)),
    post8 = e4m3(min(post / a, 448)) for the delayed activation scale a (1,)."""
    acc = x_f8.float() @ w_fc_f8.float().t()
    pre = (acc * (x_scale * w_fc_scale)).to(out_dtype)
    post = torch.relu(pre).square()     # in out_dtype: the square is rounded once, as the kernel does
    return post, quantize_e4m3(post.float() * (1.0 / act_scale))


def down_projection_reference(post_f8: Tensor, w_proj_f8: Tensor, act_scale: Tensor, w_proj_scale: Tensor,
                              out_dtype: torch.dtype) -> Tensor:
    """out = out_dtype((post8 @ P8^T) * (a * s_proj)): what torch._scaled_mm computes."""
    return ((post_f8.float() @ w_proj_f8.float().t()) * (act_scale * w_proj_scale)).to(out_dtype)


def _aligned(scale: Tensor) -> Tensor:
    """cuBLASLt (CUDA 13) needs 16-byte-aligned scale pointers; a view at another offset is copied."""
    return scale if scale.data_ptr() % 16 == 0 else scale.clone()


def down_projection(post_f8: Tensor, w_proj_f8: Tensor, act_scale: Tensor, w_proj_scale: Tensor,
                    out_dtype: torch.dtype) -> Tensor:
    """The down projection: torch._scaled_mm on CUDA (post8 row-major, W_proj's fp8 copy (d, H)
    row-major = (H, d) column-major, fast accumulation as the record), the emulation elsewhere."""
    if not post_f8.is_cuda:
        return down_projection_reference(post_f8, w_proj_f8, act_scale, w_proj_scale, out_dtype)
    return torch._scaled_mm(post_f8, w_proj_f8.t(), scale_a=_aligned(act_scale), scale_b=_aligned(w_proj_scale),
                            out_dtype=out_dtype, use_fast_accum=True)


class _FP8ReLU2MLPTwin(torch.autograd.Function):
    """The twin: the forward emulates the FP8 maths exactly; the backward is the bf16 MLP's, from post."""

    @staticmethod
    def forward(ctx, x, w_fc, w_proj, x_f8, x_scale, w_fc_f8, w_fc_scale, w_proj_f8, w_proj_scale, act_scale):
        post, post_f8 = up_projection_reference(x_f8, x_scale, w_fc_f8, w_fc_scale, act_scale, x.dtype)
        out = down_projection_reference(post_f8, w_proj_f8, act_scale, w_proj_scale, x.dtype)
        amax = post.amax().float().view(1)
        ctx.save_for_backward(x, w_fc, w_proj, post)
        ctx.mark_non_differentiable(amax)
        return out, amax

    @staticmethod
    def backward(ctx, grad_out, _grad_amax):
        x, w_fc, w_proj, post = ctx.saved_tensors
        grads = relu2_mlp_grads(grad_out, x, w_fc, w_proj, post, ctx.needs_input_grad, fused=False)
        return (*grads, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
# Up projection, Hopper (227 KB of shared memory per block): fp8 tiles, BLOCK_K 128 (the fp8 MMA's
# 128-byte rows), 3 stages = (128*128 + 128*256) B * 3 = 144 KB + 48 KB of store staging; the record's
# kernel uses the same 128 x 256 x 128 tile. benchmarks/bench_fp8_mlp.py sweeps CONFIGS to re-pin it.
# (group_m is unused: the persistent kernel walks the tiles row by row, W stays in L2.)
FORWARD_CONFIG = TileConfig(128, 256, 128, 8, num_warps=8, num_stages=3)
# FP8 GPUs with ~100 KB of shared memory per block (Ada): 48 KB of tiles.
SMALL_SMEM_CONFIG = TileConfig(128, 128, 64, 8, num_warps=8, num_stages=3)
CONFIGS = (   # (4 stages of 128 x 256 x 128 need 240 KB: more than Hopper has)
    FORWARD_CONFIG,
    TileConfig(128, 128, 128, 8, num_warps=8, num_stages=4),
    TileConfig(128, 128, 128, 8, num_warps=4, num_stages=4),
    TileConfig(256, 128, 128, 8, num_warps=8, num_stages=3),
    TileConfig(128, 256, 64, 8, num_warps=8, num_stages=4),
    TileConfig(64, 256, 128, 8, num_warps=4, num_stages=4),
)
INTERPRETER_CONFIG = TileConfig(16, 32, 32, 2, num_warps=4, num_stages=1)
# The refresh: 64 x 64 tiles of the (d, H) weights (576 programs for 768 x 3072).
REFRESH_BLOCK = 64
INTERPRETER_REFRESH_BLOCK = 16

if HAS_TRITON:

    @triton.jit
    def _as_bf16(v, EXACT_ROUNDING: tl.constexpr):
        """fp32 -> the nearest bf16 value (ties to even), kept in fp32. The interpreter truncates in
        its own conversion, so there the rounding is done on the bits (finite values)."""
        if EXACT_ROUNDING:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return v.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _to_e4m3(v, EXACT_ROUNDING: tl.constexpr):
        """fp32 values already clamped to [-448, 448] -> e4m3, ties to even. The interpreter loses the
        carry into the exponent when it rounds (125.4 -> 64), so there the value is first rounded on
        the bits (normal range: 3 mantissa bits; subnormals below 2^-6: multiples of 2^-9), which its
        conversion then keeps exactly."""
        if EXACT_ROUNDING:
            mag = tl.abs(v)
            bits = mag.to(tl.uint32, bitcast=True)
            normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
            subnormal = ((mag * 512.0 + 8388608.0) - 8388608.0) * (1.0 / 512.0)  # fp32 add rounds to even
            mag = tl.where(mag < 0.015625, subnormal, normal)
            v = tl.where(v < 0, -mag, mag)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _fp8_up_tiles(
        x_desc,           # x8 (M, K) e4m3: TMA descriptor, block (BLOCK_M, BLOCK_K)
        w_desc,           # W_fc's fp8 copy (N, K) e4m3, K-major as the fp8 MMA wants it: block (BLOCK_N, BLOCK_K)
        post_desc,        # out: post (M, N) bf16, block (BLOCK_M, BLOCK_N // 2)
        post_f8_desc,     # out: post8 (M, N) e4m3, block (BLOCK_M, BLOCK_N // 2)
        amax_ptr,         # out: max(post) (1,) fp32, zeroed by the caller; one atomic per program
        x_scale_ptr,      # s_x (1,)
        w_scale_ptr,      # s_fc (1,)
        act_scales_ptr,   # the layer's delayed activation scales, one per slot
        slot_ptr,         # (1,) int64: this forward's slot
        act_out_ptr,      # out: the slot's scale (1,) fp32, a fresh aligned tensor for _scaled_mm
        M,
        N,
        num_programs,
        tiles_per_program,
        K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EXACT_ROUNDING: tl.constexpr,
    ):
        # Persistent: one program per SM walks the output tiles pid, pid + P, ... (row-major: W, 2.4 MB in
        # fp8, stays in L2); flatten lets the pipeliner load the next tile's operands during this one's
        # epilogue. A program's last round may run past the end: it redoes the last tile (same values).
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        last_tile = tl.cdiv(M, BLOCK_M) * tiles_n - 1
        scale = tl.load(x_scale_ptr) * tl.load(w_scale_ptr)
        act_scale = tl.load(act_scales_ptr + tl.load(slot_ptr))
        inverse = tl.div_rn(1.0, act_scale)
        amax = 0.0
        for i in tl.range(0, tiles_per_program, flatten=True):
            tile = tl.minimum(pid + i * num_programs, last_tile)
            off_m = (tile // tiles_n) * BLOCK_M
            off_n = (tile % tiles_n) * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):   # out-of-bounds rows / K columns load as zeros
                acc = tl.dot(x_desc.load([off_m, k0]), w_desc.load([off_n, k0]).T, acc)
            # the epilogue one half of the columns at a time (fewer live registers, smaller stores)
            halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            amax = tl.maximum(amax, _up_epilogue(halves[0], scale, inverse, post_desc, post_f8_desc, off_m, off_n,
                                                 EXACT_ROUNDING))
            amax = tl.maximum(amax, _up_epilogue(halves[1], scale, inverse, post_desc, post_f8_desc, off_m,
                                                 off_n + BLOCK_N // 2, EXACT_ROUNDING))
        tl.atomic_max(amax_ptr, amax)
        if pid == 0:
            tl.store(act_out_ptr, act_scale)

    @triton.jit
    def _fp8_up_kernel(x_desc, w_desc, post_desc, post_f8_desc, amax_ptr, x_scale_ptr, w_scale_ptr, act_scales_ptr,
                       slot_ptr, act_out_ptr, M, N, num_programs, tiles_per_program, K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EXACT_ROUNDING: tl.constexpr):
        _fp8_up_tiles(x_desc, w_desc, post_desc, post_f8_desc, amax_ptr, x_scale_ptr, w_scale_ptr, act_scales_ptr,
                      slot_ptr, act_out_ptr, M, N, num_programs, tiles_per_program, K, BLOCK_M, BLOCK_N, BLOCK_K,
                      EXACT_ROUNDING)

    @triton.jit
    def _fp8_up_kernel_interpreted(x_desc, w_desc, post_desc, post_f8_desc, amax_ptr, x_scale_ptr, w_scale_ptr,
                                   act_scales_ptr, slot_ptr, act_out_ptr, M, N, num_programs,
                                   TILES_PER_PROGRAM: tl.constexpr, K: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EXACT_ROUNDING: tl.constexpr):
        # the same body; the interpreter holds runtime scalars as 1-element arrays, which a loop bound
        # cannot be under numpy 2, so there the tile count is a constant
        _fp8_up_tiles(x_desc, w_desc, post_desc, post_f8_desc, amax_ptr, x_scale_ptr, w_scale_ptr, act_scales_ptr,
                      slot_ptr, act_out_ptr, M, N, num_programs, TILES_PER_PROGRAM, K, BLOCK_M, BLOCK_N, BLOCK_K,
                      EXACT_ROUNDING)

    @triton.jit
    def _up_epilogue(acc, scale, inverse, post_desc, post_f8_desc, off_m, off_n, EXACT_ROUNDING: tl.constexpr):
        """Dequantise, round to bf16, relu, square, round again; store post and post8 = e4m3(min(post /
        a, 448)) (post >= 0: only the upper clamp; the stores drop rows past M); return max(post) (rows
        past M are zeros)."""
        pre = _as_bf16(acc * scale, EXACT_ROUNDING)
        pre = tl.maximum(pre, 0.0)
        post = _as_bf16(pre * pre, EXACT_ROUNDING)
        post_desc.store([off_m, off_n], post.to(tl.bfloat16))
        post_f8_desc.store([off_m, off_n], _to_e4m3(tl.minimum(post * inverse, 448.0), EXACT_ROUNDING))
        return tl.max(tl.max(post, axis=1), axis=0)

    @triton.jit
    def _weight_amax_kernel(fc_ptr, proj_ptr, partial_ptr, used_ptr, next_ptr, D, H, stride_fc, stride_proj,
                            BLOCK: tl.constexpr, DELAYED: tl.constexpr):
        # per tile: max|W_fc| and max|W_proj| into partial[2 tile], partial[2 tile + 1]
        pid = tl.program_id(0)
        tiles_h = tl.cdiv(H, BLOCK)
        rows = (pid // tiles_h) * BLOCK + tl.arange(0, BLOCK)
        cols = (pid % tiles_h) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < D)[:, None] & (cols < H)[None, :]
        fc = tl.load(fc_ptr + rows[:, None] * stride_fc + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        proj = tl.load(proj_ptr + rows[:, None] * stride_proj + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(partial_ptr + 2 * pid, tl.max(tl.max(tl.abs(fc), axis=1), axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.max(tl.max(tl.abs(proj), axis=1), axis=0))
        if DELAYED:
            if pid == 0:  # this refresh quantises with the previous refresh's delayed scale
                tl.store(used_ptr, tl.load(next_ptr))

    @triton.jit
    def _weight_quantize_kernel(fc_ptr, proj_ptr, fc_f8_ptr, proj_f8_ptr, partial_ptr, fc_scale_ptr, used_ptr,
                                next_ptr, slot_ptr, D, H, stride_fc, stride_proj, num_tiles, next_factor,
                                PARTIALS: tl.constexpr, BLOCK: tl.constexpr, MODE: tl.constexpr,
                                EXACT_ROUNDING: tl.constexpr):
        # every program reduces the partial amaxes itself (a few KB from L2), so no third launch
        p = tl.arange(0, PARTIALS)
        amax_fc = tl.max(tl.load(partial_ptr + 2 * p, mask=p < num_tiles, other=0.0), axis=0)
        amax_proj = tl.max(tl.load(partial_ptr + 2 * p + 1, mask=p < num_tiles, other=0.0), axis=0)
        amax_fc = tl.maximum(amax_fc, 1e-12)
        amax_proj = tl.maximum(amax_proj, 1e-12)
        fc_scale = tl.div_rn(amax_fc, 448.0)
        if MODE == 0:   # exact: this refresh's own amax
            proj_scale = tl.div_rn(amax_proj, 448.0)
        else:           # delayed (copied into used_ptr by the amax kernel) or keep: the stored scale
            proj_scale = tl.load(used_ptr)

        pid = tl.program_id(0)
        tiles_h = tl.cdiv(H, BLOCK)
        rows = (pid // tiles_h) * BLOCK + tl.arange(0, BLOCK)
        cols = (pid % tiles_h) * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < D)[:, None] & (cols < H)[None, :]
        fc = tl.load(fc_ptr + rows[:, None] * stride_fc + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        proj = tl.load(proj_ptr + rows[:, None] * stride_proj + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        fc_q = _to_e4m3(tl.minimum(tl.maximum(tl.div_rn(fc, fc_scale), -448.0), 448.0), EXACT_ROUNDING)
        proj_q = _to_e4m3(tl.minimum(tl.maximum(tl.div_rn(proj, proj_scale), -448.0), 448.0), EXACT_ROUNDING)
        # W_fc's copy is (H, D): written transposed
        tl.store(fc_f8_ptr + cols[:, None] * D + rows[None, :], tl.trans(fc_q), mask=tl.trans(mask))
        tl.store(proj_f8_ptr + rows[:, None] * H + cols[None, :], proj_q, mask=mask)
        if pid == 0:
            tl.store(fc_scale_ptr, fc_scale)
            if MODE == 0:
                tl.store(used_ptr, proj_scale)
            if MODE != 2:  # a new optimizer step: the next refresh's delayed scale, slot 0 again
                tl.store(next_ptr, amax_proj * next_factor)
                tl.store(slot_ptr, 0)


def _num_programs(device: torch.device) -> int:
    """The persistent kernel's grid: one program per SM (3 in the interpreter: several tiles each)."""
    if _interpreting():
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _fp8_shapes_ok(*dims: int) -> bool:
    """The op's rule on d and H: multiples of 16 (16-byte TMA rows in fp8; _scaled_mm requires it too)."""
    return all(n % 16 == 0 for n in dims)


def _default_config(device: torch.device) -> TileConfig:
    if _interpreting():
        return INTERPRETER_CONFIG
    return FORWARD_CONFIG if _fits_hopper_tiles(device.index or 0) else SMALL_SMEM_CONFIG


def _require_triton(name: str, *tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name}: kernel='triton' needs the triton package, which is not importable")
    if not (all(t.is_cuda for t in tensors) or _interpreting()):
        raise RuntimeError(f"{name}: kernel='triton' needs CUDA tensors (got {tensors[0].device}); use kernel='torch' "
                           "or 'auto' (or set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)")


def fp8_up_projection(x_f8: Tensor, x_scale: Tensor, w_fc_f8: Tensor, w_fc_scale: Tensor, act_scales: Tensor,
                      slot: Tensor, out_dtype: torch.dtype = torch.bfloat16, *, config: TileConfig | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused up projection (Triton): x8 (T, d) and W_fc's fp8 copy (H, d) -> (post (T, H) out_dtype,
    post8 (T, H) e4m3, max(post) (1,) fp32, the slot's activation scale (1,) fp32). act_scales (S,) and
    slot (1,) int64 select the delayed scale on the device. config: a TileConfig (default
    FORWARD_CONFIG; INTERPRETER_CONFIG in the interpreter); d and H must be multiples of 16 (TMA rows,
    and _scaled_mm's own rule)."""
    _require_triton("fp8_up_projection", x_f8, w_fc_f8)
    if out_dtype != torch.bfloat16:
        raise RuntimeError(f"fp8_up_projection: post is bf16 (the record's); got out_dtype {out_dtype}")
    if x_f8.dtype != E4M3 or w_fc_f8.dtype != E4M3 or x_f8.dim() != 2 or x_f8.shape[1] != w_fc_f8.shape[1] \
            or not x_f8.is_contiguous() or not w_fc_f8.is_contiguous() or not _fp8_shapes_ok(*w_fc_f8.shape):
        raise ValueError(f"fp8_up_projection: expected contiguous e4m3 x8 (T, d) and W8 (H, d) with d and H multiples "
                         f"of 16, got {x_f8.dtype} {tuple(x_f8.shape)} and {w_fc_f8.dtype} {tuple(w_fc_f8.shape)}")
    M, K = x_f8.shape
    N = w_fc_f8.shape[0]
    post = torch.empty((M, N), device=x_f8.device, dtype=out_dtype)
    post_f8 = torch.empty((M, N), device=x_f8.device, dtype=E4M3)
    amax = torch.zeros(1, device=x_f8.device, dtype=torch.float32)
    if M == 0:
        return post, post_f8, amax, act_scales.index_select(0, slot)
    act = torch.empty(1, device=x_f8.device, dtype=torch.float32)
    cfg = config or _default_config(x_f8.device)
    # tiles no larger than the matrix (small models, tests); fp8 MMAs take K in steps of 32
    block_n = min(cfg.block_n, max(32, triton.next_power_of_2(N)))
    block_k = min(cfg.block_k, max(32, triton.next_power_of_2(K)))
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, block_n)
    programs = min(tiles, _num_programs(x_f8.device))
    descriptor = TensorDescriptor.from_tensor
    kernel = _fp8_up_kernel_interpreted if _interpreting() else _fp8_up_kernel
    kernel[(programs,)](
        descriptor(x_f8, [cfg.block_m, block_k]), descriptor(w_fc_f8, [block_n, block_k]),
        descriptor(post, [cfg.block_m, block_n // 2]), descriptor(post_f8, [cfg.block_m, block_n // 2]),
        amax, x_scale, w_fc_scale, act_scales, slot, act, M, N, programs, triton.cdiv(tiles, programs),
        K=K, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k, EXACT_ROUNDING=_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return post, post_f8, amax, act


# --------------------------------------------------------------------------------------------------
# The custom op (opaque to torch.compile; backward registered with autograd)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("speedrun::fp8_relu2_mlp", mutates_args=())
def _fp8_relu2_mlp_op(x: Tensor, w_fc: Tensor, w_proj: Tensor, x_f8: Tensor, x_scale: Tensor, w_fc_f8: Tensor,
                      w_fc_scale: Tensor, w_proj_f8: Tensor, w_proj_scale: Tensor, act_scales: Tensor,
                      slot: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, d), w_fc / w_proj (d, H) in x's dtype (saved for the backward only); the fp8 operands and
    scales as FP8MLPState holds them. Returns (out (T, d), post (T, H), max(post) (1,) fp32); post is an
    output so that the backward can save it, it and the amax are not differentiable. On the CPU (tests
    of the wiring) the matmuls are emulated; in the Triton interpreter the up kernel runs."""
    if x.is_cuda or _interpreting():
        post, post_f8, amax, act = fp8_up_projection(x_f8, x_scale, w_fc_f8, w_fc_scale, act_scales, slot, x.dtype)
    else:
        act = act_scales.index_select(0, slot)
        post, post_f8 = up_projection_reference(x_f8, x_scale, w_fc_f8, w_fc_scale, act, x.dtype)
        amax = post.amax().float().view(1)
    return down_projection(post_f8, w_proj_f8, act, w_proj_scale, x.dtype), post, amax


@_fp8_relu2_mlp_op.register_fake
def _fp8_relu2_mlp_fake(x, w_fc, w_proj, x_f8, x_scale, w_fc_f8, w_fc_scale, w_proj_f8, w_proj_scale, act_scales,
                        slot):
    return (x.new_empty(x.shape[0], w_proj.shape[0]), x.new_empty(x.shape[0], w_fc.shape[1]),
            x.new_empty(1, dtype=torch.float32))


def _fp8_relu2_mlp_setup_context(ctx, inputs, output) -> None:
    x, w_fc, w_proj = inputs[:3]
    _, post, amax = output
    ctx.save_for_backward(x, w_fc, w_proj, post)   # the bf16 tensors; no fp8 copy is kept
    ctx.mark_non_differentiable(post, amax)
    ctx.set_materialize_grads(False)


def _fp8_relu2_mlp_backward(ctx, grad_out, _grad_post, _grad_amax):
    """The bf16 backward of the relu² MLP from post (relu2_mlp.py's fused d pre kernel on CUDA)."""
    x, w_fc, w_proj, post = ctx.saved_tensors
    fused = grad_out is not None and (grad_out.is_cuda or _interpreting())
    grads = relu2_mlp_grads(grad_out, x, w_fc, w_proj, post, ctx.needs_input_grad, fused=fused)
    return (*grads, None, None, None, None, None, None, None, None)


_fp8_relu2_mlp_op.register_autograd(_fp8_relu2_mlp_backward, setup_context=_fp8_relu2_mlp_setup_context)


# --------------------------------------------------------------------------------------------------
# The per-layer state and its refresh
# --------------------------------------------------------------------------------------------------
class FP8MLPState(nn.Module):
    """One layer's FP8 state (buffers; see the module docstring). dim, hidden: the MLP's d and H;
    micro_steps: slots of delayed activation scales (the trainer's grad_accum); act_headroom (1.80),
    weight_headroom (1.12): the delayed scales' margins over the last amax; exact_steps (16): the
    refreshes after steps < exact_steps use the exact current W_proj scale."""

    def __init__(self, dim: int, hidden: int, micro_steps: int = 1, act_headroom: float = 1.80,
                 weight_headroom: float = 1.12, exact_steps: int = 16):
        super().__init__()
        if micro_steps < 1:
            raise ValueError(f"FP8MLPState: micro_steps must be >= 1, got {micro_steps}")
        self.act_headroom, self.weight_headroom, self.exact_steps = act_headroom, weight_headroom, exact_steps
        # each scale its own allocation: 16-byte aligned for cuBLASLt
        # (zero bytes viewed as e4m3: a fill kernel for fp8 is not available everywhere)
        self.register_buffer("w_fc_f8", torch.zeros(hidden, dim, dtype=torch.uint8).view(E4M3), persistent=False)
        self.register_buffer("w_fc_scale", torch.ones(1), persistent=False)
        self.register_buffer("w_proj_f8", torch.zeros(dim, hidden, dtype=torch.uint8).view(E4M3), persistent=False)
        self.register_buffer("w_proj_scale", torch.ones(1))
        self.register_buffer("w_proj_next_scale", torch.ones(1))
        self.register_buffer("act_scales", torch.ones(micro_steps))
        self.register_buffer("slot", torch.zeros(1, dtype=torch.int64))

    @property
    def micro_steps(self) -> int:
        return self.act_scales.numel()

    @torch.no_grad()
    def reset(self, w_fc: Tensor, w_proj: Tensor) -> None:
        """The state of a freshly initialised model: activation scales 1.0, slot 0, exact weight scales."""
        self.act_scales.fill_(1.0)
        self.refresh(w_fc, w_proj, "exact")

    def after_optimizer_step(self, w_fc: Tensor, w_proj: Tensor, step: int) -> None:
        """The refresh after optimizer step ``step``: exact W_proj scale while step < exact_steps."""
        self.refresh(w_fc, w_proj, "exact" if step < self.exact_steps else "delayed")

    @torch.no_grad()
    def refresh(self, w_fc: Tensor, w_proj: Tensor, mode: RefreshMode, kernel: str = "auto") -> None:
        """Quantise the weights (d, H) into the fp8 copies. mode: "exact" (s_proj from this amax),
        "delayed" (s_proj = the previous refresh's amax * weight_headroom / 448), both setting the next
        delayed scale and slot 0; "keep" (re-quantise with the stored s_proj, nothing else changes:
        after loading a state). kernel: "auto" (Triton on CUDA), "triton", "torch" (the twin)."""
        if mode not in _MODES:
            raise ValueError(f"FP8MLPState.refresh: mode must be one of {tuple(_MODES)}, got {mode!r}")
        if kernel not in _KERNELS:
            raise ValueError(f"FP8MLPState.refresh: kernel must be one of {_KERNELS}, got {kernel!r}")
        if w_fc.shape != w_proj.shape or w_fc.shape != self.w_proj_f8.shape:
            raise ValueError(f"FP8MLPState.refresh: expected W_fc and W_proj of shape {tuple(self.w_proj_f8.shape)}, "
                             f"got {tuple(w_fc.shape)} and {tuple(w_proj.shape)}")
        if kernel == "auto":
            kernel = "triton" if HAS_TRITON and w_fc.is_cuda else "torch"
        if kernel == "triton":
            _require_triton("FP8MLPState.refresh", w_fc, w_proj)
            self._refresh_triton(w_fc.detach(), w_proj.detach(), mode)
        else:
            self._refresh_reference(w_fc.detach(), w_proj.detach(), mode)

    def _refresh_reference(self, w_fc: Tensor, w_proj: Tensor, mode: str) -> None:
        """The twin of the two refresh kernels."""
        amax_fc = w_fc.abs().amax().float().clamp_min(AMAX_FLOOR)
        amax_proj = w_proj.abs().amax().float().clamp_min(AMAX_FLOOR)
        self.w_fc_scale.copy_(amax_fc / E4M3_MAX)
        self.w_fc_f8.copy_(quantize_e4m3(w_fc.float().t() / self.w_fc_scale))
        if mode == "exact":
            self.w_proj_scale.copy_(amax_proj / E4M3_MAX)
        elif mode == "delayed":
            self.w_proj_scale.copy_(self.w_proj_next_scale)
        self.w_proj_f8.copy_(quantize_e4m3(w_proj.float() / self.w_proj_scale))
        if mode != "keep":
            self.w_proj_next_scale.copy_(amax_proj * (self.weight_headroom / E4M3_MAX))
            self.slot.zero_()

    def _refresh_triton(self, w_fc: Tensor, w_proj: Tensor, mode: str) -> None:
        if w_fc.stride(1) != 1 or w_proj.stride(1) != 1:
            raise ValueError("FP8MLPState.refresh: the weights need unit inner strides")
        D, H = w_fc.shape
        block = INTERPRETER_REFRESH_BLOCK if _interpreting() else REFRESH_BLOCK
        tiles = triton.cdiv(D, block) * triton.cdiv(H, block)
        partial = torch.empty(2 * tiles, device=w_fc.device, dtype=torch.float32)
        _weight_amax_kernel[(tiles,)](w_fc, w_proj, partial, self.w_proj_scale, self.w_proj_next_scale, D, H,
                                      w_fc.stride(0), w_proj.stride(0), BLOCK=block, DELAYED=mode == "delayed",
                                      num_warps=4)
        _weight_quantize_kernel[(tiles,)](
            w_fc, w_proj, self.w_fc_f8, self.w_proj_f8, partial, self.w_fc_scale, self.w_proj_scale,
            self.w_proj_next_scale, self.slot, D, H, w_fc.stride(0), w_proj.stride(0), tiles,
            self.weight_headroom / E4M3_MAX, PARTIALS=triton.next_power_of_2(tiles), BLOCK=block,
            # rounded on the bits on the GPU too: the copies must equal the twin's byte for byte, and
            # the bit rounding costs nothing next to the loads (one refresh per optimizer step)
            MODE=_MODES[mode], EXACT_ROUNDING=True, num_warps=4)

    @torch.no_grad()
    def record_post_amax(self, amax: Tensor) -> None:
        """After a training forward: this slot's scale for the next step's forward in the same slot is
        max(amax, 1e-12) * act_headroom / 448; the next forward uses the next slot. Device-side only."""
        scale = amax.float().clamp_min(AMAX_FLOOR) * (self.act_headroom / E4M3_MAX)
        self.act_scales.index_copy_(0, self.slot, scale.view(1))
        self.slot.add_(1).remainder_(self.act_scales.numel())

    def extra_repr(self) -> str:
        return (f"micro_steps={self.micro_steps}, act_headroom={self.act_headroom}, "
                f"weight_headroom={self.weight_headroom}, exact_steps={self.exact_steps}")


# --------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _fp8_hardware(device_type: str, index: int | None) -> bool:
    """fp8_supported as a constant to torch.compile (MLP.forward runs inside the compiled blocks)."""
    return fp8_supported(device_type, index)


def fp8_mlp_runs_on(x: Tensor) -> bool:
    """Whether a training forward on activations x runs the FP8 MLP: on GPUs with FP8 tensor cores
    (compute capability >= 8.9) and on the CPU (the twin, so CPU runs follow the FP8 trajectory). GPUs
    without FP8 keep the bf16 MLP, as the FP8 head does (the emulation there would be fp32 matmuls)."""
    return not x.is_cuda or _fp8_hardware(x.device.type, x.device.index)


def _check_shapes(x: Tensor, w_fc: Tensor, w_proj: Tensor, state: FP8MLPState) -> None:
    if w_fc.dim() != 2 or x.dim() < 1 or x.shape[-1] != w_fc.shape[0] or w_proj.shape != w_fc.shape \
            or state.w_proj_f8.shape != w_fc.shape:
        raise ValueError(
            f"fp8_relu2_mlp: expected x (..., d), w_fc and w_proj (d, H) matching the state's "
            f"{tuple(state.w_proj_f8.shape)}, got {tuple(x.shape)}, {tuple(w_fc.shape)} and {tuple(w_proj.shape)}")
    if state.w_fc_f8.dtype != E4M3 or state.w_proj_scale.dtype != torch.float32:
        raise ValueError("fp8_relu2_mlp: the FP8 state's buffers changed dtype (a module .to(dtype) / .half() "
                         "converts them); keep FP8MLPState's buffers in e4m3 / fp32")


def fp8_relu2_mlp(x: Tensor, w_fc: Tensor, w_proj: Tensor, state: FP8MLPState, *, kernel: str = "auto") -> Tensor:
    """Training forward of the FP8 relu² MLP: relu(x @ W_fc)² @ W_proj^T with both forward matmuls in
    e4m3 (see the module docstring), then this forward's max(post) recorded into ``state``. x (..., d);
    w_fc, w_proj (d, H) of any float dtype, cast to x's (the weight gradients come back in theirs).

    kernel: "auto" (the op for bf16 CUDA activations on FP8 hardware with Triton and d, H multiples of
    16, else the twin) |
    "triton" (the op; an error where it cannot run) | "torch" (the twin)."""
    if kernel not in _KERNELS:
        raise ValueError(f"fp8_relu2_mlp: kernel must be one of {_KERNELS}, got {kernel!r}")
    _check_shapes(x, w_fc, w_proj, state)
    if kernel == "auto":
        usable = HAS_TRITON and x.is_cuda and x.dtype == torch.bfloat16 and _fp8_shapes_ok(*w_fc.shape)
        kernel = "triton" if usable and _fp8_hardware(x.device.type, x.device.index) else "torch"
    if kernel == "triton":
        _require_triton("fp8_relu2_mlp", x)
        if x.dtype != torch.bfloat16:
            raise RuntimeError(f"fp8_relu2_mlp: kernel='triton' needs bf16 activations, got {x.dtype}")
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    x_f8, x_scale = quantize_activation(x2.detach())
    # the casts are outside the op / Function so that autograd casts the weight gradients back
    w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)
    quantized = (x_f8, x_scale, state.w_fc_f8, state.w_fc_scale, state.w_proj_f8, state.w_proj_scale)
    if kernel == "triton":
        out, _, amax = torch.ops.speedrun.fp8_relu2_mlp(x2, w_fc, w_proj, *quantized, state.act_scales, state.slot)
    else:
        act_scale = state.act_scales.index_select(0, state.slot)
        out, amax = _FP8ReLU2MLPTwin.apply(x2, w_fc, w_proj, *quantized, act_scale)
    state.record_post_amax(amax)
    return out.reshape(*lead, d)


def fp8_relu2_mlp_reference(x: Tensor, w_fc: Tensor, w_proj: Tensor, state: FP8MLPState) -> Tensor:
    """The twin (`fp8_relu2_mlp(..., kernel="torch")`)."""
    return fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="torch")
