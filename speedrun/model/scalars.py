"""The GPT's fp32 ``scalars`` vector (label "scalars"): which scalar sits where, its initial values,
and reading weights saved with the earlier layout.

A section is present exactly when its technique is on; then ones up to a multiple of 8, so the
vector shards evenly over 1/2/4/8 ranks (DistAdam would replicate it otherwise). In order, L =
num_layers:

    attn      2L  (qkv, o) lambdas of each layer (record 47; issue 17's ``attn_lambdas``)  init (0.5, 1)
    skip      1   the U-net skip's gate logit (skip_connection)      init skip_gate_init (sigmoid ~0.18)
    block     2L  (a_i, b_i) of x <- a_i x + b_i x0 (block_lambdas)  init (block_lambda_init, 0)
    value     2L  (l0_i, l1_i) of v <- l0_i v + l1_i ve (value embeddings without their gates)
                                                                      init value_lambda_init
    smear     1   the smear lambda (smear)                             init 0
    backout   1   the backout lambda (backout, without MUDD)           init backout_lambda_init

Record 45: 47 values, padded to 48. Record 89: 24 (attn 22, skip, smear), the public code's
``scalars``.
Until 2026-11 the vector was [skip logits (L, one per layer), block (2L), value (2L), smear,
backout] padded with ones to a multiple of 8 (64 for record 45), every section always present:
``upgrade_legacy_state`` converts weights saved that way.
"""
from __future__ import annotations

import torch
from torch import Tensor

from speedrun.config import ModelConfig


class ScalarLayout:
    """Offsets of each section in the vector (None where absent); ``used`` values, ``size`` with the
    padding."""

    def __init__(self, cfg: ModelConfig):
        L = cfg.num_layers
        sizes = {"attn": 2 * L if cfg.attn_lambdas else 0,
                 "skip": 1 if cfg.skip_connection else 0,
                 "block": 2 * L if cfg.block_lambdas else 0,
                 "value": 2 * L if cfg.value_embeds and not cfg.value_embed_gates else 0,
                 "smear": 1 if cfg.smear else 0,
                 "backout": 1 if cfg.backout and not cfg.mudd else 0}
        offset = 0
        for name, size in sizes.items():
            setattr(self, name, offset if size else None)
            offset += size
        self.used = offset
        self.size = -(-offset // 8) * 8

    def initial(self, cfg: ModelConfig) -> Tensor:
        L = cfg.num_layers
        s = torch.ones(self.size)
        if self.attn is not None:
            s[self.attn:self.attn + 2 * L] = torch.tensor([0.5, 1.0]).repeat(L)
        if self.skip is not None:
            s[self.skip] = cfg.skip_gate_init
        if self.block is not None:
            s[self.block:self.block + 2 * L] = torch.tensor([cfg.block_lambda_init, 0.0]).repeat(L)
        if self.value is not None:
            s[self.value:self.value + 2 * L] = cfg.value_lambda_init
        if self.smear is not None:
            s[self.smear] = 0.0
        if self.backout is not None:
            s[self.backout] = cfg.backout_lambda_init
        return s


def legacy_size(num_layers: int) -> int:
    return -(-(5 * num_layers + 2) // 8) * 8


def upgrade_legacy_state(state: dict, prefix: str, cfg: ModelConfig, layout: ScalarLayout) -> None:
    """In place: weights saved before 2026-11 -> this layout. The old scalars vector (legacy_size
    values) is remapped section by section, and the old value-embedding tables
    ``value_embeds.{k}.weight`` become the one ``value_embeds.weight``. Anything else is left for
    load_state_dict to judge."""
    key = prefix + "scalars"
    old = state.get(key)
    L = cfg.num_layers
    if old is not None and old.dim() == 1 and old.numel() == legacy_size(L) != layout.size:
        new = layout.initial(cfg).to(dtype=old.dtype, device=old.device)
        if layout.skip is not None:
            new[layout.skip] = old[cfg.skip_to_layer]
        for name, start in (("block", L), ("value", 3 * L)):
            if getattr(layout, name) is not None:
                new[getattr(layout, name):getattr(layout, name) + 2 * L] = old[start:start + 2 * L]
        if layout.smear is not None:
            new[layout.smear] = old[5 * L]
        if layout.backout is not None:
            new[layout.backout] = old[5 * L + 1]
        state[key] = new
    head = prefix + "value_embeds."
    tables = {int(k[len(head):-len(".weight")]): k for k in state
              if k.startswith(head) and k.endswith(".weight") and k[len(head):-len(".weight")].isdigit()}
    if tables and head + "weight" not in state:
        state[head + "weight"] = torch.cat([state.pop(tables[i]) for i in sorted(tables)])
