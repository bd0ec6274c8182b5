"""One fused Adam update per parameter shard (DistAdam's math) and its plain twin.

Owns ``adam_update_(p, g, m, v, ...)``, which updates p, m and v in place:

    m <- lerp(m, g, 1-b1) ; v <- lerp(v, g^2, 1-b2)       fp32 math, stored in the state dtype
    u  = m / (sqrt(v) + eps)                              from the *stored* m, v (as the twin)
    decay_form "lr" (record 45's):
      p <- p - lr_wd * [u*p >= 0 if cautious] * p         only when lr_wd = eff_lr * weight_decay > 0
      p <- p - step_size * u                              step_size = eff_lr * sqrt(1-b2^t)/(1-b1^t)
    decay_form "lr_squared" (record 89's; the caller passes lr_wd = eff_lr^2 * weight_decay * wd_mul):
      p <- p - (step_size * u + lr_wd * [u*p > 0 if cautious] * p)     strict mask, one subtraction

Why a kernel: the twin (``adam_update_reference``, plain torch) makes about a dozen passes over a
38.6M-element shard with fp32 temporaries (the record's embeddings and head are five such shards:
~10 ms per Adam step on an H100); the kernel reads p, g, m, v once and writes p, m, v once.
Scalars are fp32 kernel arguments (not constexpr), so a new step or lr compiles nothing.
``kernel="auto"``: Triton for contiguous CUDA tensors when Triton imports, the twin otherwise.
"""
from __future__ import annotations

import os

from torch import Tensor

from speedrun.config import AdamDecay, KernelChoice, choices
from speedrun.kernels.triton_import import HAS_TRITON, tl, triton

_KERNELS = choices(KernelChoice)   # optim.adam.kernel
_DECAY_FORMS = choices(AdamDecay)  # optim.adam.decay_form
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def adam_update_reference(p: Tensor, g: Tensor, m: Tensor, v: Tensor, b1: float, b2: float, eps: float,
                          step_size: float, lr_wd: float, cautious: bool, decay_form: str = "lr") -> None:
    """The plain twin: DistAdam's update in torch ops (fp32 math)."""
    g = g.float()
    m.copy_(m.float().lerp_(g, 1 - b1))
    v.copy_(v.float().lerp_(g.square(), 1 - b2))
    update = m.float() / (v.float().sqrt() + eps)
    p32 = p.float()
    if decay_form == "lr_squared":
        # record 89: the decayed fraction of p joins the step, one subtraction; strict cautious mask
        step = update * step_size
        if lr_wd > 0:
            decay = p32 * lr_wd
            if cautious:  # decay only where the Adam step moves p towards zero (not where it is 0)
                decay = decay * (update * p32 > 0)
            step = step + decay
        p.copy_(p32 - step)
        return
    if lr_wd > 0:
        decay = lr_wd * p32
        if cautious:  # decay only where the Adam step also moves p towards zero
            decay = decay * (update * p32 >= 0)
        p32.sub_(decay)
    p32.sub_(update, alpha=step_size)
    p.copy_(p32)


if HAS_TRITON:

    @triton.jit
    def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, n, w1, w2, eps, step_size, lr_wd,
                     HAS_WD: tl.constexpr, CAUTIOUS: tl.constexpr, BLOCK: tl.constexpr,
                     LR_SQUARED: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # lerp(a, b, w) = a + w (b - a), as torch computes it for w < 0.5 (w1 = 1-b1 = 0.35,
        # w2 = 1-b2 = 0.05, both rounded from doubles as torch rounds its lerp weight)
        m = m + w1 * (g - m)
        v = v + w2 * (g * g - v)
        m = m.to(m_ptr.dtype.element_ty)
        v = v.to(v_ptr.dtype.element_ty)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        # IEEE-rounded sqrt and division, as torch's (Triton's plain `/` is an approximate division)
        u = tl.div_rn(m.to(tl.float32), tl.sqrt_rn(v.to(tl.float32)) + eps)
        if LR_SQUARED:  # record 89: step + decay in one subtraction, strict mask (the twin's order)
            step = u * step_size
            if HAS_WD:
                decay = p * lr_wd
                if CAUTIOUS:
                    decay = tl.where(u * p > 0, decay, 0.0)
                step = step + decay
            p = p - step
        else:
            if HAS_WD:
                decay = lr_wd * p
                if CAUTIOUS:
                    decay = tl.where(u * p >= 0, decay, 0.0)
                p = p - decay
            p = p - step_size * u
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _usable(*ts: Tensor) -> bool:
    return HAS_TRITON and all((t.is_cuda or _INTERPRET) and t.is_contiguous() for t in ts)


def adam_update_(p: Tensor, g: Tensor, m: Tensor, v: Tensor, *, b1: float, b2: float, eps: float,
                 step_size: float, lr_wd: float = 0.0, cautious: bool = False, kernel: str = "auto",
                 decay_form: str = "lr") -> None:
    """In-place Adam update of p, m, v (same shapes) from gradient g; see the module docstring."""
    if kernel not in _KERNELS:
        raise ValueError(f"adam_update_: kernel must be one of {_KERNELS}, got {kernel!r}")
    if decay_form not in _DECAY_FORMS:
        raise ValueError(f"adam_update_: decay_form must be one of {_DECAY_FORMS}, got {decay_form!r}")
    if not (p.shape == g.shape == m.shape == v.shape):
        raise ValueError(f"adam_update_: p, g, m, v must have one shape, got {tuple(p.shape)}, "
                         f"{tuple(g.shape)}, {tuple(m.shape)}, {tuple(v.shape)}")
    if kernel == "auto":
        kernel = "triton" if _usable(p, g, m, v) else "torch"
    if kernel == "torch":
        adam_update_reference(p, g, m, v, b1, b2, eps, step_size, lr_wd, cautious, decay_form)
        return
    if not _usable(p, g, m, v):
        raise RuntimeError("adam_update_(kernel='triton') needs triton and contiguous CUDA tensors "
                           f"(got {p.device}); use kernel='torch' or 'auto'")
    n = p.numel()
    block = 256 if _INTERPRET else 2048
    if n:
        _adam_kernel[(triton.cdiv(n, block),)](p, g, m, v, n, 1.0 - b1, 1.0 - b2, float(eps),
                                               float(step_size), float(lr_wd), HAS_WD=lr_wd > 0,
                                               CAUTIOUS=bool(cautious), BLOCK=block,
                                               LR_SQUARED=decay_form == "lr_squared", num_warps=8)
