"""Rotary position embedding (half-truncated RoPE) and the YaRN rescaling applied when the
attention window grows (reference-spec 1.4, 1.5).

Owns: the frequency vector (a buffer, rescaled in place by YaRN), the softmax scale
``attn_scale`` (a 0-d buffer, also rescaled by YaRN), the cos/sin tables derived from them and
``apply_rotary``.

Everything that changes during training is a *tensor* buffer, never a Python float: a compiled
region reads the buffers as graph inputs, so a window change (YaRN update) changes values, not
the compiled code, and triggers no recompilation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# YaRN ramp bounds (in rotations over the old window): frequencies that turn fewer than ALPHA
# times over the window are fully interpolated, more than BETA times are left alone.
YARN_ALPHA = 1.0
YARN_BETA = 32.0
# attention-scale growth per e-fold of window growth
YARN_SCALE_SLOPE = 0.2


def base_frequencies(head_dim: int, base: float) -> Tensor:
    """head_dim/4 frequencies (1/base)^(j/(n-1)) spanning 1 ... 1/base rad/token, then head_dim/4
    zeros: half of the rotation pairs are position-independent ("half-truncated" RoPE)."""
    n_real = head_dim // 4
    exponents = torch.linspace(0, 1, steps=n_real, dtype=torch.float32)
    real = (1.0 / base) ** exponents
    return torch.cat([real, real.new_zeros(head_dim // 2 - n_real)])


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (d, d + D/2) of x (T, H, D) by the angles whose cos/sin are (T, D/2) (one
    position per token) or (T, H, D/2) (one per token and head: ``Rotary.paired_cos_sin``).

    Split-halves pairing: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. Pairs D/4 .. D/2-1 have
    frequency 0, so dims [D/4, D/2) and [3D/4, D) are stationary (what the key offset shifts)."""
    x1, x2 = x.chunk(2, dim=-1)
    if cos.dim() == 2:
        cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class Rotary(nn.Module):
    """Frequencies + attention scale, with the YaRN update rule for window changes.

    Buffers (persistent, so a checkpoint carries the YaRN state): ``freqs`` (D/2,) fp32 and
    ``attn_scale`` () fp32. ``base_freqs`` is the un-rescaled copy used by ``reset``.
    """

    def __init__(self, head_dim: int, base: float, attn_scale: float, block_size: int):
        super().__init__()
        self.head_dim = head_dim
        self.block_size = block_size
        self.base_attn_scale = attn_scale
        freqs = base_frequencies(head_dim, base)
        self.register_buffer("base_freqs", freqs.clone(), persistent=False)
        self.register_buffer("freqs", freqs.clone())
        self.register_buffer("attn_scale", torch.tensor(attn_scale, dtype=torch.float32))

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base frequencies and the base softmax scale."""
        self.freqs.copy_(self.base_freqs)
        self.attn_scale.fill_(self.base_attn_scale)

    @torch.no_grad()
    def yarn_update(self, old_blocks: int, new_blocks: int) -> None:
        """Rescale for a window change old -> new (in blocks of block_size tokens).

        r = rotations of each frequency over the old window; s = old/new;
        ramp w = clamp((r - alpha)/(beta - alpha), 0, 1); f <- f * (s + w (1 - s)).
        Fast frequencies (r >= beta) keep their value, slow ones (r <= alpha) are interpolated by
        old/new; zero frequencies stay zero. attn_scale <- attn_scale * (1 + 0.2 ln(new/old)).
        All in-place tensor ops on the buffers' device: no host sync, no recompilation."""
        if old_blocks == new_blocks:
            return
        s = old_blocks / new_blocks
        rotations = self.freqs * (self.block_size * old_blocks / (2 * math.pi))
        ramp = ((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0, 1)
        self.freqs.mul_(s + ramp * (1 - s))
        self.attn_scale.mul_(1 + YARN_SCALE_SLOPE * math.log(new_blocks / old_blocks))

    def cos_sin(self, num_tokens: int, dtype: torch.dtype, start: int = 0) -> tuple[Tensor, Tensor]:
        """cos/sin tables (T, D/2) for positions start..start+T-1 (absolute offsets in the packed
        buffer; start > 0 for the KV-cache decoder), computed in fp32 then cast to the activation
        dtype.

        Computed per forward from the frequency buffer instead of kept as a 262144-row table:
        T x D/2 elements is a few microseconds of work, and there is no derived table to keep in
        sync with the frequencies after a YaRN update or a checkpoint load."""
        positions = torch.arange(start, start + num_tokens, device=self.freqs.device,
                                 dtype=torch.float32)
        angles = torch.outer(positions, self.freqs)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def paired_cos_sin(self, num_tokens: int, num_heads: int, dtype: torch.dtype, start: int = 0
                       ) -> tuple[Tensor, Tensor]:
        """Per-head tables (T, H, D/2) of a paired-head layer (record 89): head h of token t sits at
        position 2t + (h mod 2) (t counted from ``start``). That is what the public code's 2D-wide
        table of positions (2t, 2t+1) over adjacent-head chunks amounts to, although its softmax
        pairs heads h and h+H/2 (attention.to_stream): in slot h mod H/2 of the stream the parity
        of the position and of the stream row can differ (r89-attention.md 2.3); replicated as is.
        Same frequencies and YaRN state as the plain layers (the public code's second Yarn gets
        identical updates). 2t+j in fp32 is exact, as the public table's angles are."""
        cos, sin = self.cos_sin(2 * num_tokens, dtype, start=2 * start)   # row 2t + j
        return tuple(c.view(num_tokens, 2, -1).repeat(1, num_heads // 2, 1) for c in (cos, sin))
