"""Small labelled fake models and hand-written reference updates for the optimizer tests."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from speedrun.optim.polar_express import polar_express_reference


def labelled(shape, label, dtype=torch.float32, scale=0.1, gen=None) -> nn.Parameter:
    p = nn.Parameter((torch.randn(shape, generator=gen) * scale).to(dtype))
    p.label = label
    return p


class FakeModel(nn.Module):
    """Every label of the real GPT, tiny shapes. n_attn/n_mlp chosen so buckets need padding on 2 ranks.
    Attention weights carry num_heads (as the model's do); matrix_dtype is the block matrices' storage
    (bf16 for optim.muon.bf16_weights)."""

    def __init__(self, d=8, n_attn=3, n_mlp=2, n_gates=3, vocab=16, seed=0, num_heads=4,
                 matrix_dtype=torch.float32, r89=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.attn = nn.ParameterList([labelled((d, 4 * d), "attn", matrix_dtype, gen=g) for _ in range(n_attn)])
        for p in self.attn:
            p.num_heads = num_heads
        self.fc = nn.ParameterList([labelled((d, 4 * d), "mlp_fc", matrix_dtype, gen=g) for _ in range(n_mlp)])
        self.proj = nn.ParameterList([labelled((d, 4 * d), "mlp_proj", matrix_dtype, gen=g) for _ in range(n_mlp)])
        self.smear = labelled((1, 4), "smear_gate", torch.bfloat16, gen=g)
        self.gates = nn.ParameterList([labelled((2, 4), "attn_gate", torch.bfloat16, gen=g)
                                       for _ in range(n_gates)])
        self.embed = labelled((vocab, d), "embed", torch.bfloat16, scale=1.0, gen=g)
        self.value_embed = nn.ParameterList([labelled((vocab, d), "value_embed", torch.bfloat16, scale=1.0, gen=g)
                                             for _ in range(2)])
        self.lm_head = labelled((vocab, d), "lm_head", torch.bfloat16, gen=g)
        self.scalars = labelled((4,), "scalars", scale=1.0, gen=g)
        if r89:   # record 89's Adam labels; 3 rows, (3, 2, 4) and 0-d do not shard over 2 ranks
            self.bigram = labelled((vocab, d), "bigram_embed", torch.bfloat16, gen=g)
            self.resid = labelled((3, 2), "resid_lambdas", scale=1.0, gen=g)
            self.ve_gate = labelled((3, 2, 4), "ve_gate", torch.bfloat16, gen=g)
            self.gate_scale = labelled((), "mudd_gate_bias", scale=1.0, gen=g)


def integer_sources(model: nn.Module, step: int, n: int) -> list[dict[str, torch.Tensor]]:
    """n gradient sources per step with small integer entries: their averages over 2 or 4 are exact
    in bf16, so 1-process and 2-process runs see bitwise equal gradients."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 * step + i)
        out.append({name: torch.randint(-8, 9, p.shape, generator=g).float()
                    for name, p in model.named_parameters()})
    return out


def reference_normuon(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr, wd, mu, beta2=0.95,
                      nesterov=True, normalize=True, cautious=True, lr_mult=1.0, lr_mul=1.0,
                      split=False) -> torch.Tensor:
    """One NorMuon update of a single 2-D param, written out matrix by matrix. Returns the new p."""
    R, C = p.shape
    # m <- mu*m + (1-mu)*g and u = (1-mu)*g + mu*m, written as lerps like the optimizer: Polar
    # Express amplifies one-ulp differences of its bf16 input, so the input must match bitwise.
    m = state.setdefault("m", torch.zeros_like(p, dtype=torch.float32))
    m.lerp_(g.float(), 1 - mu)
    u = g.float().lerp(m, mu) if nesterov else m.clone()
    mats = list(u.reshape(4, R, C // 4)) if split else [u]
    out = []
    for k, X in enumerate(mats):
        O = polar_express_reference(X).float()
        if normalize:
            v = (O ** 2).mean(dim=0) if R < C else (O ** 2).mean(dim=1)   # per column if wide
            s = state.setdefault(f"s{k}", torch.zeros_like(v))
            s.mul_(beta2).add_((1 - beta2) * v)
            O2 = O / (s.clamp_min(1e-10).sqrt()[None, :] if R < C else s.clamp_min(1e-10).sqrt()[:, None])
            O = O2 * (O.norm() / O2.norm().clamp_min(1e-10))
        out.append(O)
    O = torch.stack(out).reshape(R, C) if split else out[0]
    eff_lr = lr * lr_mult * lr_mul * math.sqrt(max(1.0, R / C))
    eff_wd = lr_mult * lr * wd
    p32 = p.float()
    mask = (O * p32 >= 0).float() if cautious else torch.ones_like(p32)
    return (p32 - eff_lr * (O + eff_wd * mask * p32)).to(p.dtype)


def reference_adam(p: torch.Tensor, g: torch.Tensor, state: dict, *, lr, b1=0.65, b2=0.95, eps=1e-8,
                   wd=0.0, cautious=False, state_dtype=torch.bfloat16) -> torch.Tensor:
    """One Adam update written out; moments are rounded to state_dtype after every step."""
    t = state["t"] = state.get("t", 0) + 1
    m = state.get("m", torch.zeros(p.shape))
    v = state.get("v", torch.zeros(p.shape))
    gf = g.float()
    m = (b1 * m + (1 - b1) * gf).to(state_dtype).float()
    v = (b2 * v + (1 - b2) * gf * gf).to(state_dtype).float()
    state["m"], state["v"] = m, v
    upd = m / (v.sqrt() + eps)
    p32 = p.float()
    if wd > 0:
        mask = (upd * p32 >= 0).float() if cautious else 1.0
        p32 = p32 - lr * wd * mask * p32
    p32 = p32 - lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) * upd
    return p32.to(p.dtype)


# ---- record 89's NorMuon, written in the public code's layout (r89-training 5.2) -----------------

def to_public_layout(p: torch.Tensor) -> list[tuple[torch.Tensor, float]]:
    """Our param -> the matrices record 89 stores for it, each with its per-matrix lr factor
    (shape factor sqrt(max(1, R/C)) of the public matrix times the c_proj factor 2):
    attention (d, 4d) = [Wq, Wk, Wv, Wo] (out, in) -> the qk_bank slots (Wq rows of heads 2j, 2j+1,
    then Wk's) and the vo_bank slots Wv, Wo; our c_fc (d, h) used as x @ W -> its c_fc (h, d);
    our c_proj (d, h) used as F.linear -> its c_proj stored (h in, d out); gates as they are."""
    def shape_factor(M):
        return math.sqrt(max(1.0, M.size(0) / M.size(1)))
    label = p.label
    if label == "attn":
        d = p.size(0)
        wq, wk, wv, wo = p.view(4, d, d)
        rows = 2 * d // p.num_heads
        mats = [w[j:j + rows] for w in (wq, wk) for j in range(0, d, rows)] + [wv, wo]
        return [(M, shape_factor(M)) for M in mats]
    if label == "mlp_fc":
        return [(p.mT, shape_factor(p.mT))]
    if label == "mlp_proj":
        return [(p.mT, shape_factor(p.mT) * 2.0)]
    return [(p, shape_factor(p))]


def from_public_layout(label: str, mats: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The inverse of to_public_layout: the public matrices back into our param's shape."""
    if label == "attn":
        n = len(mats) - 2
        wq, wk = torch.cat(mats[:n // 2]), torch.cat(mats[n // 2:n])
        return torch.stack([wq, wk, mats[-2], mats[-1]]).reshape(like.shape)
    if label in ("mlp_fc", "mlp_proj"):
        return mats[0].mT
    return mats[0]


def reference_normuon_r89(master: torch.Tensor, g: torch.Tensor, state: dict, *, lr, wd, mu, beta2,
                          lr_mult, factor) -> torch.Tensor:
    """One record-89 NorMuon update of one public-layout matrix: float64 master (R, C), gradient g.

    As the public code: momentum and the Nesterov mix as fp32 lerps (Polar Express amplifies one-ulp
    differences of its bf16 input, so its input must be bitwise the optimizer's; the lerp weight is
    the Python float 1-mu as ours), Polar Express on bf16; then in float64: the statistic from the
    matrix's own shape (rows >= cols: per row, else per column), the norms as sums of v*n, the
    cautious mask O'*P >= 0, eff_lr = factor*lr*lr_mult, eff_wd = wd*lr*lr_mult. (The public code
    rounds O' to bf16; the float64 formula does not.) Returns the new float64 master."""
    m = state.setdefault("m", torch.zeros(g.shape, dtype=torch.float32))
    g = g.float()
    m.lerp_(g, 1 - mu)
    u = g.lerp(m, mu)
    O = polar_express_reference(u).double()
    R, C = O.shape
    red = -1 if R >= C else -2
    v = (O ** 2).mean(dim=red, keepdim=True)
    n = O.size(red)
    norm = (v * n).sum().sqrt()
    s = state.setdefault("s", torch.zeros_like(v))
    s.mul_(beta2).add_((1 - beta2) * v)
    r = s.clamp_min(1e-10).rsqrt()
    new_norm = (v * n * r ** 2).sum().sqrt()
    O2 = O * r * (norm / new_norm.clamp_min(1e-10))
    eff_lr, eff_wd = factor * lr * lr_mult, wd * lr * lr_mult
    mask = (O2 * master >= 0).double()
    return master - master * mask * eff_wd * eff_lr - O2 * eff_lr


def truncate_to_bf16_bits(master: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(high, low) 16-bit halves of fp32 values, through numpy's views: the bf16 bits by
    truncation and the mantissa bits, as uint16."""
    bits = master.detach().float().contiguous().numpy().view(np.uint32)
    return (bits >> 16).astype(np.uint16), (bits & 0xFFFF).astype(np.uint16)
