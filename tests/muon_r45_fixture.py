"""The record-45 NorMuon fixture: what NorMuon computes on the CPU for a small labelled model over
a few steps, captured once before the record-89 NorMuon switches (axis rule, Q/K head pairs, bf16
weights with mantissa tracking, c_proj lr) went in, and compared bitwise ever after
(tests/test_optim_muon_r89.py). The switches' off state must reproduce it exactly.

``compute()`` builds the optimizer through ``build_optimizers`` from the default ``OptimConfig``
(record 45) and from a variant with plain momentum, no normalization and no cautious decay, and
steps each with a varying lr multiplier and momentum. ``python tests/muon_r45_fixture.py``
rewrites the fixture; only do that when a change of record 45's numbers is intended.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from optim_helpers import FakeModel  # noqa: E402

from speedrun.config import OptimConfig  # noqa: E402
from speedrun.optim.build import build_optimizers  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "muon_r45.pt")
STEPS = 4


def _variants() -> dict[str, OptimConfig]:
    default = OptimConfig()
    default.muon.kernel = "torch"
    plain = OptimConfig()
    plain.muon.kernel = "torch"
    plain.muon.nesterov = plain.muon.normalize = plain.muon.cautious_weight_decay = False
    return {"default": default, "plain": plain}


def run(cfg: OptimConfig) -> dict[str, torch.Tensor]:
    """NorMuon params after every step and the final NorMuon state, flat name -> tensor."""
    model = FakeModel(d=16, n_attn=3, n_mlp=2, n_gates=3, seed=3)
    opt = build_optimizers(model, cfg)
    muon = [(n, p) for n, p in model.named_parameters() if p.label in ("attn", "mlp_fc", "mlp_proj",
                                                                          "attn_gate", "smear_gate")]
    g = torch.Generator().manual_seed(7)
    out = {}
    for step in range(STEPS):
        for _, p in muon:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.muon.step(lr_mult=1.0 - 0.2 * step, momentum=0.85 + 0.03 * step)
        for n, p in muon:
            out[f"step{step}.{n}"] = p.detach().clone()
    for i, b in enumerate(opt.muon.state_dict()["buckets"]):
        for k, v in b.items():
            out[f"state{i}.{k}"] = v
    return out


def compute() -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v for name, cfg in _variants().items() for k, v in run(cfg).items()}


if __name__ == "__main__":
    torch.set_num_threads(2)
    values = compute()
    torch.save(values, FIXTURE)
    print(f"wrote {FIXTURE}: {len(values)} tensors")
