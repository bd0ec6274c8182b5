"""Small labelled fake models and hand-written reference updates for the optimizer tests."""
from __future__ import annotations

import math

import torch
from torch import nn

from speedrun.optim.polar_express import polar_express_reference


def labelled(shape, label, dtype=torch.float32, scale=0.1, gen=None) -> nn.Parameter:
    p = nn.Parameter((torch.randn(shape, generator=gen) * scale).to(dtype))
    p.label = label
    return p


class FakeModel(nn.Module):
    """Every label of the real GPT, tiny shapes. n_attn/n_mlp chosen so buckets need padding on 2 ranks."""

    def __init__(self, d=8, n_attn=3, n_mlp=2, n_gates=3, vocab=16, seed=0, r89=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.attn = nn.ParameterList([labelled((d, 4 * d), "attn", gen=g) for _ in range(n_attn)])
        self.fc = nn.ParameterList([labelled((d, 4 * d), "mlp_fc", gen=g) for _ in range(n_mlp)])
        self.proj = nn.ParameterList([labelled((d, 4 * d), "mlp_proj", gen=g) for _ in range(n_mlp)])
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
