"""FP8 lm_head fused with the softcapped cross-entropy: one op pair whose backward writes the logit
gradient straight to float8 e5m2, and the plain twin (the unfused pipeline).

Owns the training loss when the head runs in FP8 (`model.fp8_head`) and `model.fused_loss` is on.
Unfused, the head is `speedrun::fp8_mm` followed by `softcapped_cross_entropy` (softcap_ce.py): the CE
backward writes dL/dz in bf16 (T x V, 3.3 GB at the record's 32768 x 50304), then fp8_mm's backward
reads it back only to quantize it (g / grad_s -> e5m2) and to write a transposed copy for the weight
gradient (2.3 ms per micro-batch on an H100). Fused:

    forward   x_f8, w_f8 = e4m3(x / x_s), e4m3(w / w_s);  z = _scaled_mm(x_f8, w_f8^T)  (bf16 logits)
              per-row loss and lse: the softcap_ce forward kernel; returns the summed loss (fp32)
    backward  one Triton kernel over (BLOCK_T x BLOCK_V) tiles of z: recomputes dL/dz in fp32 exactly
              as softcap_ce's backward kernel, scales by 1/grad_s, rounds to e5m2 and stores the tile
              twice, g_f8 (T, V) and its transpose g_f8_t (V, T) (tl.trans of the tile);
              grad_x = g_f8 @ w_f8,  grad_w = g_f8_t @ x_f8  (two _scaled_mm calls, as fp8_mm's)

so no bf16 gradient is written and no quantize/transpose pass exists. The gradient is also rounded
once (fp32 -> e5m2) instead of three times (fp32 -> bf16, / grad_s in bf16, -> e5m2).

The forward and backward are `torch.library` custom ops (`speedrun::fp8_head_softcap_ce` and
`speedrun::fp8_head_softcap_ce_backward`), so the fullgraph-compiled loss region treats both as opaque
calls. Where they run:
* CUDA: the Triton kernels and real FP8 tensor-core matmuls (needs compute capability >= 8.9);
* CPU under the Triton interpreter (TRITON_INTERPRET=1, the tests): the same Triton kernels, small
  tiles, matmuls emulated on the exact fp8 values (fp8.py's `_scaled_mm`);
* CPU otherwise: the same tile maths in plain torch (`_ce_forward_torch`, `_grad_fp8_torch`), so the
  op and its autograd wiring work everywhere (used by `kernel="fused"` on CPU, never by "auto").

`fp8_head_softcap_ce_reference` is the twin: exactly the unfused pipeline the model runs otherwise.
`fp8_head_softcap_ce(..., kernel="auto")` picks the fused op for CUDA tensors when Triton imports.

Fixed scales as in fp8.py: |dL/dz| <= |g| (softmax - one-hot is in [-1, 1], the softcap's slope is at
most 1), so with grad_s = 1/448 the scaled gradient stays below e5m2's 57344 for an incoming loss
gradient |g| < 128 (training passes 1 / grad_accum). With multi-token / prefix terms (softcap_ce.py)
|dL/ds| <= S_w (at most 2 in record 89) and the slope cap/tau * 1/4 (0.77 for 23 / 7.5): the same
bound with room to spare. Their target columns are written by a second, small kernel after the
dense tiles (S_w p): comparing every element with K + 1 targets made the tile kernel spill.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speedrun.kernels.fp8 import E4M3, E5M2, _scaled_mm, fp8_linear, head_scales
from speedrun.kernels.softcap_ce import (
    _interpreting,
    check_extra_terms,
    rescale_constants,
    softcap,
    softcapped_cross_entropy,
    weighted_kernel_args,
)
from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:
    # the row-streaming CE forward is reused as is: it writes exactly the per-row loss and lse we need;
    # the weighted terms' helpers (MTP / prefix) are shared with its backward
    from speedrun.kernels.softcap_ce import _prefix_target, _term_target, _total_weight, forward_rows

__all__ = [
    "fp8_head_softcap_ce",
    "fp8_head_softcap_ce_fused",
    "fp8_head_softcap_ce_reference",
    "softcap_ce_grad_fp8",
    "transpose_fp8",
]

_KERNELS = ("auto", "fused", "reference")
_GRAD_KERNELS = ("auto", "triton", "torch")


def _tile_config() -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_V, num_warps, num_stages, V tiles per program) of the backward tile kernel;
    fixed, no autotuning (cold start).

    32 x 128 tiles, 4 warps, each program looping over 8 V tiles of its rows with 3-stage pipelined
    loads: 2.69 ms at 32768 x 50304 on the H100 (2.45 TB/s), the fastest of 25 configs swept by
    `benchmarks/bench_kernels.py --sweep-fp8-ce` (7a81d2d); one 64 x 128 tile per program, the best of
    the earlier one-tile sweep, takes 3.44 ms: without a loop a program's load, maths and stores run
    back to back and only other programs hide the memory latency. Tiles above 64 x 128 keep too
    many fp32 temporaries per thread (several spill and run 20x slower). Interpreter: small tiles so
    that ragged T and V edges are masked in tests, and a loop of two tiles.
    """
    if _interpreting():
        return 16, 64, 1, 1, 2
    return 32, 128, 4, 3, 8


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _round_to_e5m2(y):
        """fp32 -> the nearest float8 e5m2 value (ties to even), still in fp32, so that the cast that
        follows is exact. Only under the interpreter: its fp32 -> fp8 cast (triton 3.6) loses the carry
        when rounding up the mantissa overflows into the exponent; the GPU cast (cvt.rn) is correct."""
        y_bits = y.to(tl.int32, bitcast=True)
        sign = (y_bits >> 31) << 31  # the sign bit alone, so that -0.0 stays -0.0 as in torch
        a = tl.abs(y)
        bits = a.to(tl.int32, bitcast=True)
        # |y| >= 2^-14 (e5m2 normals): round the 23-bit mantissa to 2 bits, ties to even; the integer
        # add carries into the exponent when the mantissa overflows
        bits = (bits + 0xFFFFF + ((bits >> 21) & 1)) & -2097152  # -2097152 = ~0x1FFFFF
        normal = bits.to(tl.float32, bitcast=True)
        # |y| < 2^-14 (e5m2 subnormals): the nearest multiple of 2^-16, ties to even
        t = tl.minimum(a, 6.103515625e-05) * 65536.0
        whole = t.to(tl.int32)  # floor: t >= 0
        frac = t - whole.to(tl.float32)  # exact
        up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
        sub = (whole + up.to(tl.int32)).to(tl.float32) * (1.0 / 65536.0)
        r = tl.where(a < 6.103515625e-05, sub, normal)
        return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)

    @triton.jit
    def _fp8_softcap_ce_grad_kernel(
        logits_ptr,
        targets_ptr,
        lse_ptr,
        grad_loss_ptr,  # 0-d fp32: the incoming gradient of the summed loss, read here (no host sync)
        g_ptr,  # (T, V) e5m2 out
        gt_ptr,  # (V, T) e5m2 out: the transpose of the same values
        n_rows,
        n_cols,
        logits_row_stride,
        g_row_stride,
        gt_row_stride,
        cap,
        neg_inv_tau_log2e,  # -log2(e) / tau: sigmoid((z + b)/tau) = 1 / (1 + 2^(z * this + shift))
        shift,  # -b log2(e) / tau (0 for the symmetric softcap)
        scale,  # (cap / tau) / grad_s: the softcap's slope factor and the fp8 scale in one
        ignore_index,
        weights_ptr,  # (NUM_MTP,) fp32 MTP weights (softcap_ce.py's weighted terms; NUM_MTP > 0)
        prefix_ptr,  # (T,) int prefix targets, < 0 = none (HAS_PREFIX)
        prefix_weight_ptr,  # 0-d fp32 (HAS_PREFIX)
        BLOCK_T: tl.constexpr,
        BLOCK_V: tl.constexpr,
        SOFTWARE_ROUNDING: tl.constexpr,
        TILES_PER_PROGRAM: tl.constexpr,
        NUM_STAGES: tl.constexpr,
        NUM_MTP: tl.constexpr,  # 0: one target per row (plain CE)
        HAS_PREFIX: tl.constexpr,
    ):
        # program (i, j): rows block j, V tiles [i * TILES_PER_PROGRAM, (i + 1) * TILES_PER_PROGRAM);
        # i varies fastest: with one tile per program neighbours read neighbouring pieces of a row
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)  # int64 offsets: T * V exceeds 2^31 above T = 42690 at V = 50304
        # torch.compile may hand Python floats over as fp64; keep the maths in fp32
        cap = tl.cast(cap, tl.float32)
        neg_inv_tau_log2e = tl.cast(neg_inv_tau_log2e, tl.float32)
        shift = tl.cast(shift, tl.float32)
        scale = tl.cast(scale, tl.float32)
        cap_log2e = cap * 1.4426950408889634

        target = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index).to(tl.int32)
        lse_log2e = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        g = tl.load(grad_loss_ptr).to(tl.float32) * scale
        if NUM_MTP == 0:
            g_row = tl.where(target == ignore_index, 0.0, g)
            total = g_row  # unused
        else:  # rows without any term get total weight 0 (softcap_ce.py: _total_weight)
            g_row = tl.where(row_ok, g, 0.0)
            total = _total_weight(targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr, rows, row_ok, n_rows,
                                  ignore_index, NUM_MTP, HAS_PREFIX)

        first_tile = tl.program_id(0) * TILES_PER_PROGRAM
        for k in tl.range(0, TILES_PER_PROGRAM, num_stages=NUM_STAGES):
            cols = (first_tile + k) * BLOCK_V + tl.arange(0, BLOCK_V)
            _grad_tile(logits_ptr, g_ptr, gt_ptr, rows, rows64, row_ok, cols, n_cols, target, lse_log2e,
                       g_row, logits_row_stride, g_row_stride, gt_row_stride, cap_log2e,
                       neg_inv_tau_log2e, shift, total, SOFTWARE_ROUNDING, NUM_MTP)

    @triton.jit
    def _softmax_and_slope(z, lse_log2e, cap_log2e, neg_inv_tau_log2e, shift, SOFTWARE_ROUNDING: tl.constexpr):
        """(softmax(s)_j, ds/dz_j * tau / cap) of raw logits z, s = cap sigmoid((z + b)/tau).

        sigmoid((z + b)/tau) = r = 1 / (1 + e), e = exp(-(z + b)/tau); its slope r(1 - r) = e r^2 has no
        cancellation where r -> 1. The reciprocal is the hardware one (rcp.approx, 1 ulp): Triton's
        fp32 "/" is the IEEE division, a dozen instructions per element, and the result is rounded
        to e5m2 (2 mantissa bits) anyway. (SOFTWARE_ROUNDING doubles as "interpreted".)
        (clamped: e = inf would make e r^2 = inf * 0; at 2^126 the slope is 2^-126, i.e. 0 in e5m2)"""
        e = tl.exp2(tl.minimum(z * neg_inv_tau_log2e + shift, 126.0))
        if SOFTWARE_ROUNDING:  # the interpreter runs no PTX
            sig = 1.0 / (1.0 + e)
        else:
            sig = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e],
                                            dtype=tl.float32, is_pure=True, pack=1)
        p = tl.exp2(cap_log2e * sig - lse_log2e)  # softmax(s)_j = exp(s_j - lse)
        return p, e * sig * sig

    @triton.jit
    def _grad_tile(logits_ptr, g_ptr, gt_ptr, rows, rows64, row_ok, cols, n_cols, target, lse_log2e,
                   g_row, logits_row_stride, g_row_stride, gt_row_stride, cap_log2e, neg_inv_tau_log2e,
                   shift, total, SOFTWARE_ROUNDING: tl.constexpr, NUM_MTP: tl.constexpr):
        """One (BLOCK_T x BLOCK_V) tile of the gradient: load z, store e5m2 g and its transpose. With
        weighted terms (NUM_MTP > 0) only the dense part S_w p: the target columns are rewritten
        afterwards by _fp8_target_fixup_kernel (no per-element compares against K + 1 targets here,
        which made this tile spill registers)."""
        col_ok = cols < n_cols
        cols64 = cols.to(tl.int64)
        mask = row_ok[:, None] & col_ok[None, :]
        z = tl.load(logits_ptr + rows64[:, None] * logits_row_stride + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        # the maths of softcap_ce's _softcap_ce_backward_kernel, on a 2-D tile
        p, slope = _softmax_and_slope(z, lse_log2e[:, None], cap_log2e, neg_inv_tau_log2e, shift,
                                      SOFTWARE_ROUNDING)
        if NUM_MTP == 0:
            dlds = tl.where(cols[None, :] == target[:, None], p - 1.0, p)
        else:
            dlds = total[:, None] * p
        y = g_row[:, None] * dlds * slope  # dL/dz / grad_s
        if SOFTWARE_ROUNDING:
            y = _round_to_e5m2(y)
        q = y.to(g_ptr.dtype.element_ty)

        tl.store(g_ptr + rows64[:, None] * g_row_stride + cols[None, :], q, mask=mask)
        tl.store(gt_ptr + cols64[:, None] * gt_row_stride + rows[None, :], tl.trans(q),
                 mask=col_ok[:, None] & row_ok[None, :])

    @triton.jit
    def _fp8_target_fixup_kernel(
        logits_ptr, targets_ptr, lse_ptr, grad_loss_ptr, g_ptr, gt_ptr, n_rows, n_cols, logits_row_stride,
        g_row_stride, gt_row_stride, cap, neg_inv_tau_log2e, shift, scale, ignore_index, weights_ptr, prefix_ptr,
        prefix_weight_ptr, BLOCK_T: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr, NUM_MTP: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
    ):
        """The weighted terms' target columns, after the dense tiles: g[i, c] = e5m2(g (S_w p_ic - W_ic)
        slope) with W_ic the summed weights of row i's terms whose target is c (duplicates collect all
        their weights and write the same value). One program per BLOCK_T rows, the K + 1 terms each."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        rows64 = rows.to(tl.int64)
        cap = tl.cast(cap, tl.float32)
        neg_inv_tau_log2e = tl.cast(neg_inv_tau_log2e, tl.float32)
        shift = tl.cast(shift, tl.float32)
        g = tl.load(grad_loss_ptr).to(tl.float32) * tl.cast(scale, tl.float32)
        lse_log2e = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        total = _total_weight(targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr, rows, row_ok, n_rows,
                              ignore_index, NUM_MTP, HAS_PREFIX)
        for j in tl.static_range(NUM_MTP + HAS_PREFIX):
            if j < NUM_MTP:
                col = _term_target(targets_ptr, rows + j, n_rows, ignore_index, tl.load(weights_ptr + j))
            else:
                col = _prefix_target(prefix_ptr, rows, row_ok, tl.load(prefix_weight_ptr))
            ok = row_ok & (col >= 0) & (col < n_cols)
            weight_sum = (rows * 0).to(tl.float32)
            for k in tl.static_range(NUM_MTP):
                w = tl.load(weights_ptr + k)
                other = _term_target(targets_ptr, rows + k, n_rows, ignore_index, w)
                weight_sum += tl.where(other == col, w, 0.0)
            if HAS_PREFIX:
                w = tl.load(prefix_weight_ptr)
                weight_sum += tl.where(_prefix_target(prefix_ptr, rows, row_ok, w) == col, w, 0.0)
            z = tl.load(logits_ptr + rows64 * logits_row_stride + col, mask=ok, other=0.0).to(tl.float32)
            p, slope = _softmax_and_slope(z, lse_log2e, cap * 1.4426950408889634, neg_inv_tau_log2e, shift,
                                          SOFTWARE_ROUNDING)
            y = g * (total * p - weight_sum) * slope
            if SOFTWARE_ROUNDING:
                y = _round_to_e5m2(y)
            q = y.to(g_ptr.dtype.element_ty)
            tl.store(g_ptr + rows64 * g_row_stride + col, q, mask=ok)
            tl.store(gt_ptr + col.to(tl.int64) * gt_row_stride + rows, q, mask=ok)


def _launch_grad_kernel(logits: Tensor, lse: Tensor, targets: Tensor, grad_loss: Tensor, cap: float,
                        grad_s: float, ignore_index: int, g_f8: Tensor, g_f8_t: Tensor,
                        temperature: float | None = None, offset: float = 0.0, mtp_weights: Tensor | None = None,
                        prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> None:
    """Fill g_f8 (T, V) and g_f8_t (V, T) (unit column stride, any row stride) from the logits."""
    n_rows, n_cols = logits.shape
    if n_rows == 0 or n_cols == 0:
        return
    block_t, block_v, num_warps, num_stages, tiles = _tile_config()
    tau, neg_inv_tau_log2e, shift = rescale_constants(cap, temperature, offset)
    weights, prefix, prefix_w, num_mtp, has_prefix = weighted_kernel_args(targets, mtp_weights,
                                                                          prefix_targets, prefix_weight)
    grid = (triton.cdiv(triton.cdiv(n_cols, block_v), tiles), triton.cdiv(n_rows, block_t))
    _fp8_softcap_ce_grad_kernel[grid](
        logits, targets, lse, grad_loss, g_f8, g_f8_t, n_rows, n_cols,
        logits.stride(0), g_f8.stride(0), g_f8_t.stride(0),
        float(cap), neg_inv_tau_log2e, shift, (cap / tau) / grad_s, int(ignore_index), weights, prefix, prefix_w,
        BLOCK_T=block_t, BLOCK_V=block_v, SOFTWARE_ROUNDING=_interpreting(), TILES_PER_PROGRAM=tiles,
        NUM_STAGES=num_stages, NUM_MTP=num_mtp, HAS_PREFIX=has_prefix, num_warps=num_warps,
    )
    if num_mtp:   # stream order: runs after the dense tiles, so its values are the ones kept
        block = 16 if _interpreting() else 128
        _fp8_target_fixup_kernel[(triton.cdiv(n_rows, block),)](
            logits, targets, lse, grad_loss, g_f8, g_f8_t, n_rows, n_cols, logits.stride(0), g_f8.stride(0),
            g_f8_t.stride(0), float(cap), neg_inv_tau_log2e, shift, (cap / tau) / grad_s, int(ignore_index),
            weights, prefix, prefix_w, BLOCK_T=block, SOFTWARE_ROUNDING=_interpreting(), NUM_MTP=num_mtp,
            HAS_PREFIX=has_prefix, num_warps=4,
        )


if HAS_TRITON:

    @triton.jit
    def _transpose_bytes_kernel(src_ptr, dst_ptr, n_rows, n_cols, src_row_stride, dst_row_stride,
                                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok, col_ok = rows < n_rows, cols < n_cols
        tile = tl.load(src_ptr + rows.to(tl.int64)[:, None] * src_row_stride + cols[None, :],
                       mask=row_ok[:, None] & col_ok[None, :])
        tl.store(dst_ptr + cols.to(tl.int64)[:, None] * dst_row_stride + rows[None, :], tl.trans(tile),
                 mask=col_ok[:, None] & row_ok[None, :])


def transpose_fp8(t: Tensor) -> Tensor:
    """t.T.contiguous() for a 2-D one-byte tensor (the fp8 operands' column-major copies). On CUDA a
    tiled Triton copy: torch's generic strided copy moves single bytes uncoalesced (240 us for the
    25 MB x_f8 on an H100, against tens for this). Bytes are moved, never converted: exact."""
    if t.dim() != 2 or t.element_size() != 1:
        raise ValueError(f"transpose_fp8: expected a 2-D one-byte tensor, got {tuple(t.shape)} {t.dtype}")
    if not (HAS_TRITON and (t.is_cuda or _interpreting())) or t.stride(1) != 1:
        return t.T.contiguous()
    n_rows, n_cols = t.shape
    out = torch.empty(n_cols, n_rows, device=t.device, dtype=t.dtype)
    if t.numel():
        block = 16 if _interpreting() else 64
        grid = (triton.cdiv(n_cols, block), triton.cdiv(n_rows, block))
        _transpose_bytes_kernel[grid](t.view(torch.uint8), out.view(torch.uint8), n_rows, n_cols,
                                      t.stride(0), out.stride(0), BLOCK_R=block, BLOCK_C=block,
                                      num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# The same tile maths in plain torch (CPU without the interpreter)
# --------------------------------------------------------------------------------------------------
def _term_targets_torch(targets: Tensor, ignore_index: int, mtp_weights: Tensor | None,
                        prefix_targets: Tensor | None, prefix_weight: Tensor | None) -> list[tuple[Tensor, Tensor]]:
    """The weighted terms as the kernels see them: (target column per row (-1 where the term does not
    count), weight) for the MTP targets k ahead and the prefix target."""
    n = targets.shape[0]
    terms = []
    for k in range(mtp_weights.shape[0] if mtp_weights is not None else 1):
        w = mtp_weights[k].float() if mtp_weights is not None else targets.new_ones((), dtype=torch.float32)
        t = torch.full_like(targets, -1)
        ahead = targets[k:]
        t[:max(n - k, 0)] = torch.where((ahead != ignore_index) & (w != 0), ahead, -1)
        terms.append((t, w))
    if prefix_targets is not None:
        w = prefix_weight.float()
        terms.append((torch.where((prefix_targets >= 0) & (w != 0), prefix_targets.long(), -1), w))
    return terms


def _ce_forward_torch(logits: Tensor, targets: Tensor, cap: float, ignore_index: int,
                      temperature: float | None = None, offset: float = 0.0, mtp_weights: Tensor | None = None,
                      prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
    """Per-row loss and lse in fp32, as the forward kernel (an out-of-range target gives NaN)."""
    n_cols = logits.shape[1]
    s = softcap(logits, cap, temperature, offset).float()
    lse = torch.logsumexp(s, dim=1)

    def term(t: Tensor) -> Tensor:
        s_t = s.gather(1, t.clamp(0, max(n_cols - 1, 0))[:, None]).squeeze(1)
        return torch.where((t >= 0) & (t < n_cols), lse - s_t, torch.full_like(lse, float("nan")))

    if mtp_weights is None and prefix_targets is None:
        loss = term(targets)
        return torch.where(targets == ignore_index, torch.zeros_like(loss), loss), lse
    loss = torch.zeros_like(lse)
    for t, w in _term_targets_torch(targets, ignore_index, mtp_weights, prefix_targets, prefix_weight):
        loss = loss + torch.where(t >= 0, w * term(t), 0.0)
    return loss, lse


def _grad_fp8_torch(logits: Tensor, lse: Tensor, targets: Tensor, grad_loss: Tensor, cap: float,
                    grad_s: float, ignore_index: int, temperature: float | None = None,
                    offset: float = 0.0, mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                    prefix_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    tau = rescale_constants(cap, temperature, offset)[0]
    z = logits.float()
    sig = torch.sigmoid((z + offset if offset else z) / tau)
    p = torch.exp(cap * sig - lse[:, None])
    cols = torch.arange(logits.shape[1], device=logits.device)[None, :]
    if mtp_weights is None and prefix_targets is None:
        onehot = cols == targets[:, None]
        g = torch.where(targets == ignore_index, 0.0, grad_loss.float()) * ((cap / tau) / grad_s)
        dlds = p - onehot.float()
    else:  # S_w p - the weights of the terms whose target each column is (softcap_ce._weighted_dlds)
        g = grad_loss.float().expand(logits.shape[0]) * ((cap / tau) / grad_s)
        terms = _term_targets_torch(targets, ignore_index, mtp_weights, prefix_targets, prefix_weight)
        total = sum(torch.where(t >= 0, w, 0.0) for t, w in terms)
        dlds = total[:, None] * p
        for t, w in terms:
            dlds = dlds - torch.where(cols == t[:, None], w, 0.0)
    g_f8 = (g[:, None] * dlds * sig * (1.0 - sig)).to(E5M2)
    return g_f8, g_f8.T.contiguous()


def _use_kernels(t: Tensor) -> bool:
    if t.is_cuda and not HAS_TRITON:
        raise RuntimeError("fp8_head_softcap_ce: CUDA tensors need the triton package, which is not importable")
    return HAS_TRITON and (t.is_cuda or _interpreting())


def softcap_ce_grad_fp8(logits: Tensor, lse: Tensor, targets: Tensor, grad_loss: Tensor, cap: float,
                        grad_s: float, ignore_index: int = -100, kernel: str = "auto",
                        temperature: float | None = None, offset: float = 0.0, mtp_weights: Tensor | None = None,
                        prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None
                        ) -> tuple[Tensor, Tensor]:
    """(g_f8 (T, V), g_f8_t (V, T)) float8 e5m2: e5m2(grad_loss * dL/dz / grad_s) of the summed
    softcapped cross-entropy, L = sum_rows lse(s) - s_target, s = cap sigmoid((z + offset) /
    temperature) (temperature None = cap/4), and its transpose; with MTP weights / prefix targets L
    is the summed ``softcap_ce.multi_token_losses`` (its exact gradient: S_w p - the weights of each
    row's targets, S_w the weights of the terms present in the row).

    logits (T, V) raw head outputs; lse (T,) fp32 from the forward; grad_loss 0-d (any float dtype).
    kernel: "auto" (Triton on CUDA or under the interpreter, else torch) | "triton" | "torch".
    """
    if kernel not in _GRAD_KERNELS:
        raise ValueError(f"softcap_ce_grad_fp8: kernel must be one of {_GRAD_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "triton" if _use_kernels(logits) else "torch"
    targets = targets.contiguous()
    terms = (mtp_weights, prefix_targets, prefix_weight)
    if kernel == "torch":
        return _grad_fp8_torch(logits, lse, targets, grad_loss, cap, grad_s, ignore_index, temperature, offset,
                               *terms)
    if not _use_kernels(logits):
        raise RuntimeError("softcap_ce_grad_fp8: kernel='triton' needs triton and CUDA tensors "
                           "(or TRITON_INTERPRET=1 on CPU)")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    g_f8 = torch.empty(n_rows, n_cols, device=logits.device, dtype=E5M2)
    g_f8_t = torch.empty(n_cols, n_rows, device=logits.device, dtype=E5M2)
    _launch_grad_kernel(logits, lse.float().contiguous(), targets, grad_loss.float().contiguous(), cap,
                        grad_s, ignore_index, g_f8, g_f8_t, temperature, offset, *terms)
    return g_f8, g_f8_t


# --------------------------------------------------------------------------------------------------
# Custom ops
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("speedrun::fp8_head_softcap_ce", mutates_args=())
def _fp8_head_softcap_ce_op(x: Tensor, w: Tensor, targets: Tensor, cap: float, temperature: float,
                            offset: float, ignore_index: int, x_s: float, w_s: float, grad_s: float,
                            mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                            prefix_weight: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss_sum fp32 0-d, logits (T, V) in x.dtype, lse (T,) fp32, x_f8, w_f8). Everything after the
    loss is an output only so that the backward can have it (setup_context sees inputs and outputs).
    mtp_weights / prefix_targets / prefix_weight: the weighted terms of softcap_ce.multi_token_losses."""
    x_f8 = x.div(x_s).to(E4M3)  # as fp8_mm: same quantization, same fast-accumulation matmul
    w_f8 = w.div(w_s).to(E4M3)
    logits = _scaled_mm(x_f8, w_f8.T, x_s, w_s, x.dtype, fast_accum=True)
    targets = targets.contiguous()
    terms = (mtp_weights, prefix_targets, prefix_weight)
    if _use_kernels(logits):
        loss, lse = forward_rows(logits, targets, cap, ignore_index, temperature, offset, *terms)
    else:
        loss, lse = _ce_forward_torch(logits, targets, cap, ignore_index, temperature, offset, *terms)
    return loss.sum(), logits, lse, x_f8, w_f8


@_fp8_head_softcap_ce_op.register_fake
def _fp8_head_softcap_ce_fake(x, w, targets, cap, temperature, offset, ignore_index, x_s, w_s, grad_s,
                              mtp_weights=None, prefix_targets=None, prefix_weight=None):
    return (x.new_empty((), dtype=torch.float32), x.new_empty(x.shape[0], w.shape[0]),
            x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape, dtype=E4M3),
            w.new_empty(w.shape, dtype=E4M3))


@torch.library.custom_op("speedrun::fp8_head_softcap_ce_backward", mutates_args=())
def _fp8_head_softcap_ce_backward_op(grad_loss: Tensor, logits: Tensor, lse: Tensor, targets: Tensor,
                                     x_f8: Tensor, w_f8: Tensor, cap: float, temperature: float, offset: float,
                                     ignore_index: int, x_s: float, w_s: float, grad_s: float,
                                     x_dtype: torch.dtype, w_dtype: torch.dtype, mtp_weights: Tensor | None = None,
                                     prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None
                                     ) -> tuple[Tensor, Tensor]:
    """(grad_x in x_dtype, grad_w in w_dtype): fp8_mm's backward with g from the tile kernel."""
    g_f8, g_f8_t = softcap_ce_grad_fp8(logits, lse, targets, grad_loss, cap, grad_s, ignore_index,
                                       temperature=temperature, offset=offset, mtp_weights=mtp_weights,
                                       prefix_targets=prefix_targets, prefix_weight=prefix_weight)
    # _scaled_mm wants its second operand column-major: the transposed copy, viewed back (.T)
    grad_x = _scaled_mm(g_f8, transpose_fp8(w_f8).T, grad_s, w_s, x_dtype, fast_accum=False)
    # grad_w = g^T x computed as (V, T) @ (T, d): g_f8_t is already the row-major g^T, and the result
    # comes out (V, d) row-major in w's dtype (fp8_mm computes (x^T g)^T: same sums, a transposed view)
    grad_w = _scaled_mm(g_f8_t, transpose_fp8(x_f8).T, grad_s, x_s, w_dtype, fast_accum=False)
    return grad_x, grad_w


@_fp8_head_softcap_ce_backward_op.register_fake
def _fp8_head_softcap_ce_backward_fake(grad_loss, logits, lse, targets, x_f8, w_f8, cap, temperature, offset,
                                       ignore_index, x_s, w_s, grad_s, x_dtype, w_dtype, mtp_weights=None,
                                       prefix_targets=None, prefix_weight=None):
    return x_f8.new_empty(x_f8.shape, dtype=x_dtype), w_f8.new_empty(w_f8.shape, dtype=w_dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, w, targets, cap, temperature, offset, ignore_index, x_s, w_s, grad_s, *terms = inputs   # defaults filled in
    _, logits, lse, x_f8, w_f8 = output
    ctx.save_for_backward(logits, lse, targets, x_f8, w_f8, *terms)
    ctx.args = (cap, temperature, offset, ignore_index, x_s, w_s, grad_s, x.dtype, w.dtype)
    ctx.mark_non_differentiable(logits, lse, x_f8, w_f8)


def _backward(ctx, grad_loss: Tensor, _grad_logits, _grad_lse, _grad_x_f8, _grad_w_f8):
    # The loss is the op's first output, a sum over rows: its upstream gradient (grad_loss, 0-d) scales
    # every row alike, so any caller's reduction of it (the trainer's 1 / grad_accum) is honoured.
    logits, lse, targets, x_f8, w_f8, *terms = ctx.saved_tensors
    grad_x, grad_w = torch.ops.speedrun.fp8_head_softcap_ce_backward(
        grad_loss.float(), logits, lse, targets, x_f8, w_f8, *ctx.args, *terms)
    return grad_x, grad_w, None, None, None, None, None, None, None, None, None, None, None


_fp8_head_softcap_ce_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def _check_args(x: Tensor, w: Tensor, targets: Tensor, cap: float, temperature: float | None = None,
                mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                prefix_weight: Tensor | None = None) -> None:
    name = "fp8_head_softcap_ce"
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"{name}: x (T, d) and w (V, d) must be 2-D, got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"{name}: x (T, d) and w (V, d) must share d, got {tuple(x.shape)} and {tuple(w.shape)}")
    if targets.shape != x.shape[:1]:
        raise ValueError(f"{name}: targets must have shape ({x.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{name}: targets must be integer class indices, got {targets.dtype}")
    if not cap > 0:
        raise ValueError(f"{name}: cap must be > 0 (the fused loss is the softcapped one), got {cap}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0 (or None = cap/4), got {temperature}")
    if x.is_cuda and any(n % 16 for n in (*x.shape, w.shape[0])):
        # cuBLAS FP8 matmuls (torch._scaled_mm) need every dimension, T included, a multiple of 16
        raise ValueError(f"{name}: on CUDA T, d and V must be multiples of 16, got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}")
    check_extra_terms(name, x.shape[0], mtp_weights, prefix_targets, prefix_weight)


def fp8_head_softcap_ce_fused(x: Tensor, w: Tensor, targets: Tensor, cap: float = 30.0, *,
                              scales: tuple[float, float, float] | None = None, ignore_index: int = -100,
                              temperature: float | None = None, offset: float = 0.0,
                              mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                              prefix_weight: Tensor | None = None) -> Tensor:
    """The fused op (no dispatch): see `fp8_head_softcap_ce`."""
    _check_args(x, w, targets, cap, temperature, mtp_weights, prefix_targets, prefix_weight)
    x_s, w_s, grad_s = scales if scales is not None else head_scales(x.shape[1])
    tau = rescale_constants(cap, temperature, offset)[0]
    # absent terms stay None: weighted_kernel_args (Triton) and the torch tiles read None as the
    # plain next-token term, and convert the weights to fp32 themselves
    return torch.ops.speedrun.fp8_head_softcap_ce(x, w, targets, float(cap), tau, float(offset), int(ignore_index),
                                                  float(x_s), float(w_s), float(grad_s),
                                                  mtp_weights, prefix_targets, prefix_weight)[0]


def fp8_head_softcap_ce_reference(x: Tensor, w: Tensor, targets: Tensor, cap: float = 30.0, *,
                                  scales: tuple[float, float, float] | None = None, ignore_index: int = -100,
                                  temperature: float | None = None, offset: float = 0.0,
                                  mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                                  prefix_weight: Tensor | None = None) -> Tensor:
    """The twin: the unfused pipeline, `speedrun::fp8_mm` then `softcapped_cross_entropy` (Triton on
    CUDA, plain torch elsewhere), exactly what the model runs without this op."""
    _check_args(x, w, targets, cap, temperature, mtp_weights, prefix_targets, prefix_weight)
    logits = fp8_linear(x, w, scales)
    return softcapped_cross_entropy(logits, targets, cap, "sum", ignore_index=ignore_index, kernel="auto",
                                    temperature=temperature, offset=offset, mtp_weights=mtp_weights,
                                    prefix_targets=prefix_targets, prefix_weight=prefix_weight)


def fp8_head_softcap_ce(x: Tensor, w: Tensor, targets: Tensor, cap: float = 30.0, *,
                        scales: tuple[float, float, float] | None = None, ignore_index: int = -100,
                        kernel: str = "auto", temperature: float | None = None, offset: float = 0.0,
                        mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None,
                        prefix_weight: Tensor | None = None) -> Tensor:
    """Summed softcapped cross-entropy (fp32 0-d) of the FP8 head's logits x @ w^T.

    x (T, d) normed hidden states, w (V, d) the lm_head weight, targets (T,) int (ignore_index rows
    count 0), the softcap cap * sigmoid((z + offset) / temperature) (temperature None = cap/4; record
    89: cap 23, offset 5, temperature 7.5), scales (x_s, w_s, grad_s) default
    fp8.head_scales(d). mtp_weights (K,), prefix_targets (T,) with the 0-d prefix_weight: the
    multi-token and prefix-token terms of softcap_ce.multi_token_losses (records 53, 88), summed.
    kernel: "auto" (fused on CUDA when Triton imports, else the twin) | "fused"
    (the custom op on any device; see the module docstring for what runs where) | "reference" (twin).
    """
    if kernel not in _KERNELS:
        raise ValueError(f"fp8_head_softcap_ce: kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "fused" if HAS_TRITON and x.is_cuda else "reference"
    fn = fp8_head_softcap_ce_fused if kernel == "fused" else fp8_head_softcap_ce_reference
    return fn(x, w, targets, cap, scales=scales, ignore_index=ignore_index, temperature=temperature,
              offset=offset, mtp_weights=mtp_weights, prefix_targets=prefix_targets, prefix_weight=prefix_weight)
