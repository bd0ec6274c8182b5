"""Rotary (half-truncated RoPE) and YaRN: frequencies, rotation vs an explicit complex rotation,
the YaRN update rule and its numbers (spec 1.4, 1.5)."""
import math

import pytest
import torch

from speedrun.model.rotary import Rotary, apply_rotary, base_frequencies


def test_base_frequencies_record():
    f = base_frequencies(128, 1024.0)
    assert f.shape == (64,) and f.dtype == torch.float32
    expected = torch.tensor([(1 / 1024) ** (j / 31) for j in range(32)])
    torch.testing.assert_close(f[:32], expected)
    assert f[0] == 1.0 and math.isclose(f[31].item(), 1 / 1024, rel_tol=1e-6)
    assert torch.all(f[32:] == 0)


def test_base_frequencies_generalize():
    f = base_frequencies(32, 100.0)   # head_dim/4 real + head_dim/4 zeros
    assert f.shape == (16,) and torch.all(f[8:] == 0) and torch.all(f[:8] > 0)


def test_apply_rotary_matches_explicit_complex_rotation():
    torch.manual_seed(0)
    T, H, D = 37, 3, 32
    x = torch.randn(T, H, D, dtype=torch.float64)
    rot = Rotary(D, 1024.0, 0.1, 128)
    cos, sin = rot.cos_sin(T, torch.float64)
    y = apply_rotary(x, cos, sin)
    # pair (d, d + D/2) as a complex number, rotated by -theta: y1 + i y2 = (x1 + i x2) e^{-i theta}
    theta = torch.arange(T, dtype=torch.float64)[:, None] * rot.freqs.double()[None, :]
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.exp(-1j * theta)[:, None, :]
    # tables are made in fp32 (as the reference), hence the tolerance
    torch.testing.assert_close(y, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-5)
    # stationary half: zero-frequency pairs (dims D/4..D/2 and 3D/4..D) are unchanged
    torch.testing.assert_close(y[..., D // 4:D // 2], x[..., D // 4:D // 2])
    torch.testing.assert_close(y[..., 3 * D // 4:], x[..., 3 * D // 4:])
    # position 0 is the identity
    torch.testing.assert_close(y[0], x[0])


def test_cos_sin_dtype_and_fp32_tables():
    rot = Rotary(128, 1024.0, 0.1, 128)
    cos, sin = rot.cos_sin(1000, torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and cos.shape == (1000, 64)
    ang = torch.outer(torch.arange(1000, dtype=torch.float32), rot.freqs)
    torch.testing.assert_close(cos, ang.cos().bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(sin, ang.sin().bfloat16(), atol=0, rtol=0)


def test_yarn_attn_scale_sequence():
    rot = Rotary(128, 1024.0, 0.1, 128)
    scales = []
    for old, new in [(3, 7), (7, 11), (11, 13)]:
        rot.yarn_update(old, new)
        scales.append(rot.attn_scale.item())
    assert scales == pytest.approx([0.11695, 0.12752, 0.13178], abs=5e-6)
    assert isinstance(rot.attn_scale, torch.Tensor) and rot.attn_scale.ndim == 0


def test_yarn_frequency_rule_direct():
    rot = Rotary(128, 1024.0, 0.1, 128)
    f0 = rot.freqs.clone().double()
    rot.yarn_update(3, 7)
    expected = []
    for f in f0.tolist():
        r = 128 * 3 * f / (2 * math.pi)
        w = min(max((r - 1) / (32 - 1), 0.0), 1.0)
        s = 3 / 7
        expected.append(f * (s + w * (1 - s)))
    torch.testing.assert_close(rot.freqs.double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    assert rot.freqs[0] == f0[0]                    # fast frequency untouched (r >> 32)
    assert torch.all(rot.freqs[32:] == 0)           # zeros stay zero
    torch.testing.assert_close(rot.freqs[31].double(), f0[31] * 3 / 7)   # slowest: fully interpolated


def test_yarn_noop_and_reset():
    rot = Rotary(64, 1024.0, 0.1, 128)
    f0 = rot.freqs.clone()
    rot.yarn_update(5, 5)
    assert torch.equal(rot.freqs, f0) and rot.attn_scale.item() == pytest.approx(0.1)
    rot.yarn_update(3, 11)
    assert not torch.equal(rot.freqs, f0)
    rot.reset()
    assert torch.equal(rot.freqs, f0) and rot.attn_scale.item() == pytest.approx(0.1)


def test_yarn_state_in_state_dict():
    rot = Rotary(64, 1024.0, 0.1, 128)
    rot.yarn_update(3, 7)
    other = Rotary(64, 1024.0, 0.1, 128)
    other.load_state_dict(rot.state_dict())
    assert torch.equal(other.freqs, rot.freqs) and torch.equal(other.attn_scale, rot.attn_scale)


@pytest.mark.parametrize("start", [0, 5])
def test_paired_tables_put_head_h_at_position_2t_plus_h_mod_2(start):
    """Record 89's paired layers: head h of token t is rotated at position 2t + (h mod 2), after a
    YaRN update too; per-head tables rotate each head as the plain rotary at that position."""
    T, H, D = 9, 6, 32
    rot = Rotary(D, 1024.0, 0.1, 16)
    rot.yarn_update(1, 3)
    cos, sin = rot.paired_cos_sin(T, H, torch.float64, start=start)
    assert cos.shape == sin.shape == (T, H, D // 2)
    x = torch.randn(T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = apply_rotary(x, cos, sin)
    for t in range(T):
        for h in range(H):
            p = 2 * (start + t) + h % 2
            theta = p * rot.freqs.double()
            z = torch.complex(x[t, h, :D // 2], x[t, h, D // 2:]) * torch.exp(-1j * theta)
            torch.testing.assert_close(y[t, h], torch.cat([z.real, z.imag]), rtol=1e-5, atol=1e-5)
