"""Fused softcapped cross-entropy: a Triton kernel pair and its plain-PyTorch twin.

Owns the training loss of the head: logits z (T, V) are softcapped to s = cap * sigmoid((z + b) / tau)
(range (0, cap); record 45: 30 * sigmoid(z / 7.5), tau = cap/4 and b = 0 by default; record 89's
asymmetric rescale: 23 * sigmoid((z + 5) / 7.5)) and scored with cross-entropy against the targets. The twin (`softcapped_cross_entropy_reference`) does exactly what the model does in plain
PyTorch: softcap in fp32, then `F.cross_entropy`. The kernels do the same maths without ever writing
fp32 logits to memory:

* forward: one program per row streams the row once in blocks, computes the softcap in fp32
  registers and accumulates the log-sum-exp; it writes only the per-row loss and lse (fp32, T values).
* backward: one program per row re-reads the (bf16) logits, recomputes s, and writes the gradient
  with respect to the *raw* logits in the logits' dtype:

      L = lse(s) - s_t                  dL/ds_j = softmax(s)_j - [j == t]
      s_j = cap * sig((z_j + b) / tau)  ds_j/dz_j = (cap / tau) * sig * (1 - sig)   (= 4 sig (1 - sig), tau = cap/4)
      dL/dz_j = g * (exp(s_j - lse) - [j == t]) * (cap / tau) * sig_j * (1 - sig_j)

  where g is the incoming gradient (a scalar for reduction "sum", one value per row for "none").

Why the log-sum-exp needs no running maximum: s is bounded by cap, so exp(s - cap) lies in
(exp(-cap), 1] and the row sum lies in [V exp(-cap), V]: neither overflows nor underflows in fp32
while cap <= 80, and shifting by a constant bound is as accurate as shifting by the row maximum. For
larger caps the kernel falls back to the classic online (block max + rescale) log-sum-exp.

Multi-token and prefix-token terms (records 53 and 88, ``mtp_weights`` / ``prefix_targets`` /
``prefix_weight``): each row is also scored against targets[i + k] with weight w_k (k < K, i + k < T)
and against a prefix target with weight pw, on the same s and lse (``multi_token_losses`` is the
readable form). The kernels take the targets tensor and index i + k themselves rather than a (T, K)
copy of shifted targets: no extra tensor or pass, and the end of the micro-batch is one compare. The
weights are device tensors read by the kernels (NUM_MTP = K is a constexpr: one kernel per count);
a zero weight is skipped by a branch uniform over the program, so padding costs nothing. The
backward is the exact gradient, dL/ds_j = S_w p_j - (the weights of the terms whose target is j),
S_w the weights of the terms present in the row; a column that is the target of several terms
collects all their weights.

`softcapped_cross_entropy(..., kernel="auto")` picks the Triton path for CUDA tensors when Triton
imports, the twin otherwise; kernel="triton" without CUDA (or Triton) raises. On CPU the Triton path
runs only under the Triton interpreter (TRITON_INTERPRET=1), which the tests use.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

__all__ = [
    "multi_token_losses",
    "softcapped_cross_entropy",
    "softcapped_cross_entropy_reference",
    "softcapped_cross_entropy_triton",
    "softcap",
]

_REDUCTIONS = ("sum", "none")
_KERNELS = ("auto", "triton", "torch")
# Above this cap exp(s - cap) could underflow fp32 for the smallest s; use the online max instead.
_MAX_FIXED_SHIFT_CAP = 80.0
_LOG2E = math.log2(math.e)


# Read once at import, like Triton itself: a constant is also what torch.compile traces best.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests): CPU tensors, small tiles."""
    return _INTERPRET


def softcap(logits: Tensor, cap: float = 30.0, temperature: float | None = None, offset: float = 0.0) -> Tensor:
    """cap * sigmoid((z + offset) / temperature) in fp32 (float64 stays float64, for gradient checks);
    temperature None = cap/4.

    Record 45 (cap/4, no offset): cap/2 * (tanh(2z/cap) + 1), range (0, cap), slope 1 at z = 0.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    if offset:
        z = z + offset
    return cap * torch.sigmoid(z / (cap / 4.0 if temperature is None else temperature))


def multi_token_losses(s: Tensor, targets: Tensor, mtp_weights: Tensor, prefix_targets: Tensor | None = None,
                       prefix_weight: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Per-row weighted losses of rescaled logits s (T, V) (records 53 / 88, r89-training.md 3-4), the
    readable form every fused path is checked against:

        L_i = sum_k [i + k < T] w_k (lse_i - s_i[y_{i+k}]) + [prefix_i >= 0] pw (lse_i - s_i[prefix_i])

    one row's logits scored against the targets k = 0, 1, .. positions ahead (k = 0: the next token;
    targets cross document boundaries, only the micro-batch's end stops them), and against the prefix
    token of its next token. Terms whose target is ignore_index count zero. No normalisation.
    Autograd gives the exact gradient of this loss (in the last rows it counts only the weights of
    the terms present; record 89's kernel counts all of them there)."""
    lse = torch.logsumexp(s, dim=1)
    n = s.shape[0]
    loss = torch.zeros_like(lse)
    for k in range(mtp_weights.shape[0]):
        rows = n - k
        if rows <= 0:
            break
        t = targets[k:]
        keep = t != ignore_index
        picked = s[:rows].gather(1, torch.where(keep, t, 0)[:, None]).squeeze(1)
        term = torch.where(keep, lse[:rows] - picked, 0.0) * mtp_weights[k]
        loss = loss + F.pad(term, (0, k))
    if prefix_targets is not None:
        keep = prefix_targets >= 0
        picked = s.gather(1, torch.where(keep, prefix_targets, 0)[:, None].long()).squeeze(1)
        loss = loss + torch.where(keep, lse - picked, 0.0) * prefix_weight
    return loss


def softcapped_cross_entropy_reference(
    logits: Tensor, targets: Tensor, cap: float = 30.0, reduction: str = "sum", ignore_index: int = -100,
    temperature: float | None = None, offset: float = 0.0, mtp_weights: Tensor | None = None,
    prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None,
) -> Tensor:
    """The plain twin: softcap in fp32 with torch ops, then F.cross_entropy (or, with MTP / prefix
    terms, ``multi_token_losses``). Returns fp32 (float64 for float64)."""
    _check_args(logits, targets, cap, reduction, temperature, mtp_weights, prefix_targets, prefix_weight)
    s = softcap(logits, cap, temperature, offset)
    if mtp_weights is None and prefix_targets is None:
        return F.cross_entropy(s, targets, reduction=reduction, ignore_index=ignore_index)
    if mtp_weights is None:
        mtp_weights = s.new_ones(1)
    loss = multi_token_losses(s, targets, mtp_weights.to(s.dtype), prefix_targets,
                              None if prefix_weight is None else prefix_weight.to(s.dtype), ignore_index)
    return loss.sum() if reduction == "sum" else loss


def rescale_constants(cap: float, temperature: float | None, offset: float) -> tuple[float, float, float]:
    """(tau, -log2(e)/tau, -offset log2(e)/tau): sigmoid((z + offset)/tau) = 1 / (1 + 2^(z a + b))
    with a, b the last two (b = 0 without an offset, so record 45's arithmetic is unchanged)."""
    tau = cap / 4.0 if temperature is None else float(temperature)
    return tau, -_LOG2E / tau, -offset * _LOG2E / tau


def _check_args(logits: Tensor, targets: Tensor, cap: float, reduction: str,
                temperature: float | None = None, mtp_weights: Tensor | None = None,
                prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None) -> None:
    if logits.dim() != 2:
        raise ValueError(f"softcapped_cross_entropy: logits must be 2-D (T, V), got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(
            f"softcapped_cross_entropy: targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}"
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"softcapped_cross_entropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not cap > 0:
        raise ValueError(f"softcapped_cross_entropy: cap must be > 0, got {cap}")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"softcapped_cross_entropy: temperature must be > 0 (or None = cap/4), got {temperature}")
    check_extra_terms("softcapped_cross_entropy", logits.shape[0], mtp_weights, prefix_targets, prefix_weight)


def check_extra_terms(name: str, num_rows: int, mtp_weights: Tensor | None, prefix_targets: Tensor | None,
                      prefix_weight: Tensor | None) -> None:
    """The MTP / prefix arguments: weights a non-empty float vector, prefix targets one integer per
    row with a 0-d float weight (both or neither)."""
    if mtp_weights is not None and (mtp_weights.dim() != 1 or mtp_weights.numel() < 1
                                    or not mtp_weights.dtype.is_floating_point):
        raise ValueError(f"{name}: mtp_weights must be a non-empty 1-D float tensor (the weight of the "
                         f"target k positions ahead), got {tuple(mtp_weights.shape)} {mtp_weights.dtype}")
    if (prefix_targets is None) != (prefix_weight is None):
        raise ValueError(f"{name}: prefix_targets and prefix_weight go together")
    if prefix_targets is not None:
        if prefix_targets.shape != (num_rows,) or prefix_targets.dtype.is_floating_point:
            raise ValueError(f"{name}: prefix_targets must be ({num_rows},) integers (< 0 = none), got "
                             f"{tuple(prefix_targets.shape)} {prefix_targets.dtype}")
        if prefix_weight.dim() != 0 or not prefix_weight.dtype.is_floating_point:
            raise ValueError(f"{name}: prefix_weight must be a 0-d float tensor, got {tuple(prefix_weight.shape)}")


def weighted_kernel_args(placeholder: Tensor, mtp_weights: Tensor | None, prefix_targets: Tensor | None,
                         prefix_weight: Tensor | None) -> tuple[Tensor, Tensor, Tensor, int, bool]:
    """(weights, prefix targets, prefix weight, NUM_MTP, HAS_PREFIX) as the kernels take them: fp32 /
    contiguous tensors, ``placeholder`` (any tensor on the device, never read) where absent;
    NUM_MTP 0 = the plain one-target CE (nothing allocated: record 45's path is as it was)."""
    if mtp_weights is None and prefix_targets is None:
        return placeholder, placeholder, placeholder, 0, False
    weights = (torch.ones(1, device=placeholder.device, dtype=torch.float32) if mtp_weights is None
               else mtp_weights.to(torch.float32).contiguous())
    if prefix_targets is None:
        return weights, weights, weights, weights.numel(), False
    return (weights, prefix_targets.contiguous(), prefix_weight.to(torch.float32).contiguous(), weights.numel(),
            True)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _softcap_ce_forward_kernel(
        logits_ptr,
        targets_ptr,
        loss_ptr,
        lse_ptr,
        row_stride,
        cap,  # fp32
        neg_inv_tau_log2e,  # -log2(e) / tau: sigmoid((z + b)/tau) = 1 / (1 + 2^(z * this + shift))
        shift,  # -b log2(e) / tau (0 for the symmetric softcap)
        ignore_index,
        weights_ptr,  # (NUM_MTP,) fp32 weights of the targets k = 0.. positions ahead (NUM_MTP > 0)
        prefix_ptr,  # (T,) int prefix target per row, < 0 = none (HAS_PREFIX)
        prefix_weight_ptr,  # 0-d fp32 (HAS_PREFIX)
        n_rows,
        N_COLS: tl.constexpr,  # constexpr: V is fixed for a run, and the loop bound must be static
        BLOCK_V: tl.constexpr,
        FIXED_SHIFT: tl.constexpr,  # cap <= 80: shift by cap instead of tracking the row max
        NUM_MTP: tl.constexpr,  # 0: one target per row (plain CE); K: the weighted terms below
        HAS_PREFIX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: T * V exceeds 2^31 at the record's sizes
        row_ptr = logits_ptr + row * row_stride
        # torch.compile passes Python floats as fp64 scalars; keep the loop-carried sums in fp32
        cap = tl.cast(cap, tl.float32)
        neg_inv_tau_log2e = tl.cast(neg_inv_tau_log2e, tl.float32)
        shift = tl.cast(shift, tl.float32)
        cap_log2e = cap * 1.4426950408889634
        offsets = tl.arange(0, BLOCK_V)
        if FIXED_SHIFT:
            # acc holds sum 2^((s - cap) log2 e) element-wise; one reduction at the end, not per block.
            acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
            for start in range(0, N_COLS, BLOCK_V):
                cols = start + offsets
                mask = cols < N_COLS
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp2(z * neg_inv_tau_log2e + shift))
                e = tl.exp2(cap_log2e * sig - cap_log2e)
                acc += tl.where(mask, e, 0.0)
            lse = cap + tl.log(tl.sum(acc, axis=0))
        else:
            # Online log-sum-exp: running max m and sum of exp(s - m), rescaled when m grows.
            m = -float("inf")
            total = 0.0
            for start in range(0, N_COLS, BLOCK_V):
                cols = start + offsets
                mask = cols < N_COLS
                z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                sig = 1.0 / (1.0 + tl.exp2(z * neg_inv_tau_log2e + shift))
                s = tl.where(mask, cap * sig, -float("inf"))
                m_new = tl.maximum(m, tl.max(s, axis=0))
                total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
                m = m_new
            lse = m + tl.log(total)

        if NUM_MTP == 0:
            target = tl.load(targets_ptr + row).to(tl.int64)
            valid = (target >= 0) & (target < N_COLS)
            # An out-of-range target (other than ignore_index) reads NaN, so the loss says so loudly
            # without a host-side check (which would cost a device sync every step).
            z_t = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32)
            s_t = cap / (1.0 + tl.exp2(z_t * neg_inv_tau_log2e + shift))
            loss = tl.where(target == ignore_index, 0.0, lse - s_t)
        else:
            # sum_k w_k (lse - s[y_{row+k}]) over the targets inside the micro-batch, + pw (lse - s[prefix])
            loss = tl.zeros_like(lse)
            for k in tl.static_range(NUM_MTP):
                w = tl.load(weights_ptr + k)
                target = _term_target(targets_ptr, row + k, n_rows, ignore_index, w)
                s_t = _rescaled_at(row_ptr, target, N_COLS, cap, neg_inv_tau_log2e, shift)
                loss += tl.where(target >= 0, w * (lse - s_t), 0.0)
            if HAS_PREFIX:
                w = tl.load(prefix_weight_ptr)
                target = _prefix_target(prefix_ptr, row, row < n_rows, w)
                s_t = _rescaled_at(row_ptr, target, N_COLS, cap, neg_inv_tau_log2e, shift)
                loss += tl.where(target >= 0, w * (lse - s_t), 0.0)
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _term_target(targets_ptr, index, n_rows, ignore_index, weight):
        """targets[index] as int32 where that term counts (inside the micro-batch, not ignore_index,
        non-zero weight), else -1. index may be a scalar or a block of rows."""
        inside = index < n_rows
        t = tl.load(targets_ptr + index, mask=inside, other=ignore_index).to(tl.int32)
        t = tl.where(inside & (t != ignore_index), t, -1)
        # a where, not `&`: the interpreter cannot `&` a block with the scalar (triton 3.6)
        return tl.where(weight != 0.0, t, -1)

    @triton.jit
    def _prefix_target(prefix_ptr, index, mask, weight):
        """The prefix target where it counts (>= 0 and a non-zero weight), else -1."""
        t = tl.load(prefix_ptr + index, mask=mask, other=-1).to(tl.int32)
        return tl.where(weight != 0.0, tl.where(t >= 0, t, -1), -1)

    @triton.jit
    def _rescaled_at(row_ptr, target, N_COLS: tl.constexpr, cap, neg_inv_tau_log2e, shift):
        """s[target] of one row (fp32); NaN for a target >= N_COLS (flags a bad target in the loss)."""
        z_t = tl.load(row_ptr + target, mask=(target >= 0) & (target < N_COLS), other=float("nan")).to(tl.float32)
        return cap / (1.0 + tl.exp2(z_t * neg_inv_tau_log2e + shift))

    @triton.jit
    def _softcap_ce_backward_kernel(
        logits_ptr,
        grad_ptr,  # may equal logits_ptr (in-place backward): each element is read, then written, by one program
        targets_ptr,
        lse_ptr,
        grad_loss_ptr,
        grad_loss_stride,  # 0 for reduction "sum" (one scalar), 1 for "none"
        logits_row_stride,
        grad_row_stride,
        cap,
        neg_inv_tau_log2e,
        shift,
        dsdz_scale,  # cap / tau
        ignore_index,
        weights_ptr,
        prefix_ptr,
        prefix_weight_ptr,
        n_rows,
        N_COLS: tl.constexpr,
        BLOCK_V: tl.constexpr,
        NUM_MTP: tl.constexpr,
        HAS_PREFIX: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        in_ptr = logits_ptr + row * logits_row_stride
        cap = tl.cast(cap, tl.float32)  # fp64 under torch.compile, as in the forward
        neg_inv_tau_log2e = tl.cast(neg_inv_tau_log2e, tl.float32)
        shift = tl.cast(shift, tl.float32)
        dsdz_scale = tl.cast(dsdz_scale, tl.float32)
        out_ptr = grad_ptr + row * grad_row_stride
        target = tl.load(targets_ptr + row).to(tl.int32)  # int32 compares per element (V < 2^31)
        lse_log2e = tl.load(lse_ptr + row) * 1.4426950408889634
        g = tl.load(grad_loss_ptr + row * grad_loss_stride).to(tl.float32)
        if NUM_MTP == 0:
            g = tl.where(target == ignore_index, 0.0, g) * dsdz_scale
        else:
            g = g * dsdz_scale  # rows without any term get total weight 0 below
            total = _total_weight(targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr, row, row < n_rows,
                                  n_rows, ignore_index, NUM_MTP, HAS_PREFIX)
        cap_log2e = cap * 1.4426950408889634
        offsets = tl.arange(0, BLOCK_V)
        for start in range(0, N_COLS, BLOCK_V):
            cols = start + offsets
            mask = cols < N_COLS
            z = tl.load(in_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            sig = 1.0 / (1.0 + tl.exp2(z * neg_inv_tau_log2e + shift))
            p = tl.exp2(cap_log2e * sig - lse_log2e)  # softmax(s)_j = exp(s_j - lse)
            if NUM_MTP == 0:
                dlds = tl.where(cols == target, p - 1.0, p)
            else:
                dlds = _weighted_dlds(p, total, cols, targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr,
                                      row, row < n_rows, n_rows, ignore_index, NUM_MTP, HAS_PREFIX)
            dz = g * dlds * sig * (1.0 - sig)
            tl.store(out_ptr + cols, dz.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _total_weight(targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr, rows, row_ok, n_rows,
                      ignore_index, NUM_MTP: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """S_w of each row: the sum of the weights of the terms that count in it (the exact gradient's
        softmax factor; rows near the end of the micro-batch have fewer MTP terms)."""
        total = (rows * 0).to(tl.float32)
        for k in tl.static_range(NUM_MTP):
            w = tl.load(weights_ptr + k)
            t = _term_target(targets_ptr, rows + k, n_rows, ignore_index, w)
            total += tl.where(t >= 0, w, 0.0)
        if HAS_PREFIX:
            w = tl.load(prefix_weight_ptr)
            total += tl.where(_prefix_target(prefix_ptr, rows, row_ok, w) >= 0, w, 0.0)
        return total

    @triton.jit
    def _weighted_dlds(p, total, cols, targets_ptr, prefix_ptr, weights_ptr, prefix_weight_ptr, row, row_ok,
                       n_rows, ignore_index, NUM_MTP: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """dL/ds of a block of columns of one row: S_w p - (the weights of the terms whose target is
        that column); a column that is the target of several terms collects all their weights. A zero
        weight (padding, a term scheduled to 0) is skipped by a branch uniform over the program."""
        dlds = total * p
        for k in tl.static_range(NUM_MTP):
            w = tl.load(weights_ptr + k)
            if w != 0.0:
                t = _term_target(targets_ptr, row + k, n_rows, ignore_index, w)
                dlds -= tl.where(cols == t, w, 0.0)
        if HAS_PREFIX:
            w = tl.load(prefix_weight_ptr)
            if w != 0.0:
                t = _prefix_target(prefix_ptr, row, row_ok, w)
                dlds -= tl.where(cols == t, w, 0.0)
        return dlds


def _launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps). Small blocks under the interpreter so the tail mask is exercised."""
    if _interpreting():
        return 128, 1
    # 4096 bf16 = 8 KB per block: 16 elements (two 16-byte loads) per thread at 8 warps, and about a
    # dozen iterations over V = 50304, enough independent loads in flight to stream HBM.
    return min(4096, triton.next_power_of_2(n_cols)), 8


def _require_triton(where: str, tensor: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{where}: kernel='triton' needs the triton package, which is not importable")
    if not (tensor.is_cuda or _interpreting()):
        raise RuntimeError(
            f"{where}: kernel='triton' needs CUDA tensors (got device {tensor.device}); "
            "use kernel='torch' or 'auto' on CPU (or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter)"
        )


def forward_rows(logits: Tensor, targets: Tensor, cap: float, ignore_index: int,
                 temperature: float | None = None, offset: float = 0.0, mtp_weights: Tensor | None = None,
                 prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None
                 ) -> tuple[Tensor, Tensor]:
    """The forward kernel: per-row loss and lse (fp32, (T,) each) of unit-column-stride logits and
    contiguous targets; with MTP weights / prefix targets the weighted per-row loss of
    ``multi_token_losses``. Also the forward of the fused FP8 head (fp8_head_ce.py)."""
    _, neg_inv_tau_log2e, shift = rescale_constants(cap, temperature, offset)
    n_rows, n_cols = logits.shape
    loss = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    lse = torch.empty(n_rows, device=logits.device, dtype=torch.float32)
    block_v, num_warps = _launch_config(n_cols)
    weights, prefix, prefix_w, num_mtp, has_prefix = weighted_kernel_args(targets, mtp_weights,
                                                                          prefix_targets, prefix_weight)
    if n_rows > 0:
        _softcap_ce_forward_kernel[(n_rows,)](
            logits, targets, loss, lse, logits.stride(0), float(cap), neg_inv_tau_log2e, shift, int(ignore_index),
            weights, prefix, prefix_w, n_rows,
            N_COLS=n_cols, BLOCK_V=block_v, FIXED_SHIFT=cap <= _MAX_FIXED_SHIFT_CAP, NUM_MTP=num_mtp,
            HAS_PREFIX=has_prefix, num_warps=num_warps,
        )
    return loss, lse


class _SoftcappedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, cap: float, reduction: str, ignore_index: int,
                inplace_backward: bool, temperature: float | None, offset: float, mtp_weights: Tensor | None,
                prefix_targets: Tensor | None, prefix_weight: Tensor | None) -> Tensor:
        if logits.stride(1) != 1:
            logits = logits.contiguous()  # the kernels stream rows; columns must be unit-stride
        targets = targets.contiguous()
        weights, prefix, prefix_w, num_mtp, has_prefix = weighted_kernel_args(targets, mtp_weights,
                                                                              prefix_targets, prefix_weight)
        loss, lse = forward_rows(logits, targets, cap, ignore_index, temperature, offset,
                                 weights if num_mtp else None, prefix if has_prefix else None,
                                 prefix_w if has_prefix else None)
        ctx.save_for_backward(logits, targets, lse, weights, prefix, prefix_w)
        ctx.cap, ctx.ignore_index, ctx.reduction = float(cap), int(ignore_index), reduction
        ctx.rescale = (temperature, float(offset))
        ctx.terms = (num_mtp, has_prefix)
        ctx.inplace_backward = inplace_backward
        ctx.consumed = False
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets, lse, weights, prefix, prefix_w = ctx.saved_tensors
        if ctx.inplace_backward:
            # The gradient overwrites the logits buffer, so the graph can be walked only once.
            if ctx.consumed:
                raise RuntimeError(
                    "softcapped_cross_entropy(inplace_backward=True): backward ran twice; the first one "
                    "overwrote the logits with their gradient (use inplace_backward=False with retain_graph)"
                )
            ctx.consumed = True
            grad = logits
        else:
            grad = torch.empty_like(logits)
        n_rows, n_cols = logits.shape
        grad_loss = grad_loss.to(torch.float32).contiguous()
        grad_stride = 0 if ctx.reduction == "sum" else 1
        block_v, num_warps = _launch_config(n_cols)
        cap = ctx.cap
        tau, neg_inv_tau_log2e, shift = rescale_constants(cap, *ctx.rescale)
        num_mtp, has_prefix = ctx.terms
        if n_rows > 0:
            _softcap_ce_backward_kernel[(n_rows,)](
                logits, grad, targets, lse, grad_loss, grad_stride, logits.stride(0), grad.stride(0),
                cap, neg_inv_tau_log2e, shift, cap / tau, ctx.ignore_index, weights, prefix, prefix_w, n_rows,
                N_COLS=n_cols, BLOCK_V=block_v, NUM_MTP=num_mtp, HAS_PREFIX=has_prefix, num_warps=num_warps,
            )
        return grad, None, None, None, None, None, None, None, None, None, None


def softcapped_cross_entropy_triton(
    logits: Tensor, targets: Tensor, cap: float = 30.0, reduction: str = "sum", ignore_index: int = -100,
    inplace_backward: bool = False, temperature: float | None = None, offset: float = 0.0,
    mtp_weights: Tensor | None = None, prefix_targets: Tensor | None = None, prefix_weight: Tensor | None = None,
) -> Tensor:
    """The Triton path (no dispatch). See `softcapped_cross_entropy` for the arguments."""
    _check_args(logits, targets, cap, reduction, temperature, mtp_weights, prefix_targets, prefix_weight)
    _require_triton("softcapped_cross_entropy", logits)
    if inplace_backward and not logits.is_contiguous():
        raise ValueError("softcapped_cross_entropy(inplace_backward=True): logits must be contiguous")
    return _SoftcappedCrossEntropy.apply(logits, targets, float(cap), reduction, int(ignore_index),
                                         bool(inplace_backward), temperature, float(offset), mtp_weights,
                                         prefix_targets, prefix_weight)


def softcapped_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    cap: float = 30.0,
    reduction: str = "sum",
    *,
    ignore_index: int = -100,
    kernel: str = "auto",
    inplace_backward: bool = False,
    temperature: float | None = None,
    offset: float = 0.0,
    mtp_weights: Tensor | None = None,
    prefix_targets: Tensor | None = None,
    prefix_weight: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of softcapped logits cap * sigmoid((z + offset) / temperature) against `targets`
    (temperature None = cap/4: the symmetric softcap; record 89: cap 23, offset 5, temperature 7.5).

    logits: (T, V) bf16 / fp16 / fp32 raw head outputs; targets: (T,) int64 (ignore_index rows count 0).
    reduction: "sum" -> fp32 scalar; "none" -> fp32 (T,) per-token losses.
    mtp_weights (K,) fp32 (multi-token prediction, record 53): row i is scored against targets[i + k]
    with weight k for every k with i + k < T; prefix_targets (T,) int (< 0 = none) with the 0-d
    prefix_weight (record 88): one more term per row. Either gives the per-row loss of
    ``multi_token_losses``; weights are device tensors (they change every step: no recompilation).
    kernel: "auto" (Triton on CUDA when importable, else the twin) | "triton" (error if unavailable) |
    "torch" (the twin).
    inplace_backward (Triton path only): the backward writes d loss / d logits into the logits buffer
    and hands that buffer to autograd as the gradient, saving a T x V allocation (about 3.3 GB at the
    record's size). Safe when nothing else reads the logits after this loss: the head's matmul saves
    its inputs (x, W), never its output, so the only reader of the logits in the backward is this
    kernel, and inside it every element is read and then written by the same program. It is opt-in
    because it is not safe if the caller keeps using the logits (logging them, a second loss on the
    same tensor, retain_graph): a second backward raises instead of returning garbage.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"softcapped_cross_entropy: kernel must be one of {_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        kernel = "triton" if HAS_TRITON and logits.is_cuda else "torch"
    if kernel == "triton":
        return softcapped_cross_entropy_triton(logits, targets, cap, reduction, ignore_index, inplace_backward,
                                               temperature, offset, mtp_weights, prefix_targets, prefix_weight)
    return softcapped_cross_entropy_reference(logits, targets, cap, reduction, ignore_index, temperature, offset,
                                              mtp_weights, prefix_targets, prefix_weight)
