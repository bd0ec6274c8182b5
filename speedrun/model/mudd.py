"""MUDD connections and MUDD gates (records 81 and 85, arXiv 2502.12170; r89-model.md sections 4-5):
the per-token coefficients of the record-89 residual stream, and where each one goes.

Owns:
- the lane layouts: which coefficient (a "lane", one value per token, or one per head) feeds which
  consumer at which layer, and its initial value. One layout rule serves every config:
    gates (``gate_lanes``), per group of layers, in this order: XSA alphas (H each), attention output
      gates (H each), per attention layer its x0 gate and bigram gate (the bigram gate of layer 0 is
      the injection before layer 0), the skip gate, the DC weights w1 and w2 (H each);
      for record 89 that is exactly the public pre gate (26 lanes, layers 0-3) and post gate (41
      lanes, layers 4-10);
    connections (``mudd_lanes``): at mudd_layer the value sources, the residual sources, the
      residual's own coefficient, the value-embedding gate (one per half of the heads), the attention
      residual/post lambdas, the x0 and bigram gates, the MLP residual/post lambdas (14 in record 89);
      after the last layer the final sources and the value embedding (5 in record 89; the backout is
      the lane of backout_layer, starting at -backout_lambda_init);
- ``CoefficientMLPs``: scale * (W2 gelu(W1 x) + b) per block (W1 of all blocks in one (B, h, D)
  parameter as in the record, W2 and b per block without the record's padding lanes);
- ``Coefficients``: one block's output for a batch, handed out by lane.

The attention consumers (XSA, output gates, DC) are issue 17's: their layer lists are config fields
(``consumer_layers``), their coefficients travel to attention in LayerInputs.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig

# initial (effective) value of each gate lane kind (r89-model.md 5.2, 5.3)
GATE_INIT = {"xsa": 0.0, "out_gate": 0.25, "x0": 0.0, "bigram": 0.05, "skip": 0.5, "dc_w1": 1.0,
             "dc_w2": 0.0}
# the attention-side consumers and the (issue-17) config lists naming their layers
ATTENTION_CONSUMERS = {"xsa": "xsa_layers", "out_gate": "attn_out_gate_layers", "dc": "dc_layers"}


class Lane(NamedTuple):
    kind: str        # what consumes it
    layer: int       # at which layer (or source layer, for MUDD sources)
    start: int       # first row of the block's output
    width: int       # 1 (per token) or num_heads (per head)
    init: float      # effective initial value (scale * bias)


def consumer_layers(cfg: ModelConfig, kind: str) -> list[int]:
    """The layers of an attention consumer ("xsa", "out_gate", "dc"), from its config list."""
    return sorted(getattr(cfg, ATTENTION_CONSUMERS[kind]))


class _Lanes:
    def __init__(self):
        self.lanes: list[Lane] = []

    def add(self, kind: str, layer: int, width: int, init: float) -> None:
        start = self.lanes[-1].start + self.lanes[-1].width if self.lanes else 0
        self.lanes.append(Lane(kind, layer, start, width, init))


def gate_groups(cfg: ModelConfig) -> list[range]:
    """The layers each gate block serves: with mudd_gates the pre gate (on x0) serves layers before
    mudd_gate_layer and the post gate the rest; without, one group of constants serves all."""
    L = cfg.num_layers
    if cfg.mudd_gates:
        return [range(0, cfg.mudd_gate_layer), range(cfg.mudd_gate_layer, L)]
    return [range(0, L)]


def gate_lanes(cfg: ModelConfig, layers: range) -> list[Lane]:
    """The gate lanes of one group of layers (see the module docstring for the order)."""
    H, out = cfg.num_heads, _Lanes()
    for kind in ("xsa", "out_gate"):
        for i in consumer_layers(cfg, kind):
            if i in layers:
                out.add(kind, i, H, GATE_INIT[kind])
    for i in layers:
        residual_by_mudd = cfg.mudd and i == cfg.mudd_layer
        if cfg.x0_gates and cfg.has_attention(i) and not residual_by_mudd:
            out.add("x0", i, 1, GATE_INIT["x0"])
        # layer 0's bigram gate is the injection before layer 0 (the stack input), whatever layer 0 is
        if cfg.bigram_embed and (i == 0 or cfg.has_attention(i) and not residual_by_mudd):
            out.add("bigram", i, 1, GATE_INIT["bigram"])
    if cfg.mudd_gates and cfg.skip_connection and cfg.skip_to_layer in layers:
        out.add("skip", cfg.skip_to_layer, 1, GATE_INIT["skip"])
    for i in consumer_layers(cfg, "dc"):
        if i in layers:
            out.add("dc_w1", i, H, GATE_INIT["dc_w1"])
            out.add("dc_w2", i, H, GATE_INIT["dc_w2"])
    return out.lanes


def mudd_lanes(cfg: ModelConfig) -> list[list[Lane]]:
    """[lanes at mudd_layer, lanes after the last layer] of the MUDD connections."""
    at, final = _Lanes(), _Lanes()
    for j in cfg.mudd_value_sources:
        at.add("value_source", j, 1, 0.0)
    for j in cfg.mudd_residual_sources:
        at.add("residual_source", j, 1, 0.0)
    at.add("self", cfg.mudd_layer, 1, 0.0)                 # x <- (1 + c) x + ...
    if has_gated_value_embed(cfg, cfg.mudd_layer):
        at.add("ve_gate", cfg.mudd_layer, 2, 2.0)          # 2 = the top of 2 sigmoid elsewhere
    sub = math.sqrt(cfg.block_lambda_init)
    if cfg.residual_lambdas:
        at.add("resid_attn", cfg.mudd_layer, 1, sub)
        at.add("post_attn", cfg.mudd_layer, 1, 1.0)
    if cfg.x0_gates:
        at.add("x0", cfg.mudd_layer, 1, GATE_INIT["x0"])    # its source there is the stack input
    if cfg.bigram_embed:
        at.add("bigram", cfg.mudd_layer, 1, GATE_INIT["bigram"])
    if cfg.residual_lambdas:
        at.add("resid_mlp", cfg.mudd_layer, 1, sub)
        at.add("post_mlp", cfg.mudd_layer, 1, 1.0)
    for j in cfg.mudd_final_sources:
        backout = cfg.backout and j == cfg.backout_layer
        final.add("final_source", j, 1, -cfg.backout_lambda_init if backout else 0.0)
    if cfg.mudd_final_value_embed >= 0:
        final.add("final_value_embed", cfg.mudd_final_value_embed, 1, 0.0)
    return [at.lanes, final.lanes]


def has_gated_value_embed(cfg: ModelConfig, layer: int) -> bool:
    return cfg.value_embeds and cfg.value_embed_gates and cfg.value_embed_layers[layer] >= 0


class CoefficientMLPs(nn.Module):
    """B small MLPs, block b: c = scale * (W2_b gelu(W1_b x) + b_b), x (T, D) -> c (n_b, T).

    ``w1`` (B, hidden, D) kaiming-uniform (nn.Linear's default), ``w2.b`` (n_b, hidden) zero,
    ``b2.b`` (n_b,) = lane init / scale. ``learned_scale``: the scale is a 0-d fp32 parameter (the
    gates' ``_mudd_gate_scale``), else the constant ``scale``. Labels: ``label`` for w1 and w2,
    ``label + "_bias"`` for b2 and the scale (not weight-decayed in record 89)."""

    def __init__(self, blocks: list[list[Lane]], dim: int, hidden: int, scale: float, learned_scale: bool,
                 label: str):
        super().__init__()
        self.blocks = blocks
        self.w1 = nn.Parameter(torch.empty(len(blocks), hidden, dim))
        self.w2 = nn.ParameterList(nn.Parameter(torch.zeros(_rows(b), hidden)) for b in blocks)
        self.b2 = nn.ParameterList(nn.Parameter(torch.zeros(_rows(b))) for b in blocks)
        self.learned_scale = learned_scale
        self.init_scale = scale
        if learned_scale:
            self.scale = nn.Parameter(torch.tensor(scale, dtype=torch.float32))
            self.scale.label = label + "_bias"
        else:
            self.scale = scale
        self.w1.label = label
        for w2, b2 in zip(self.w2, self.b2):
            w2.label, b2.label = label, label + "_bias"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for j in range(len(self.blocks)):
            nn.init.kaiming_uniform_(self.w1[j], a=math.sqrt(5))
        for lanes, w2, b2 in zip(self.blocks, self.w2, self.b2):
            w2.zero_()
            b2.copy_(_initial(lanes) / self.init_scale)
        if self.learned_scale:
            self.scale.fill_(self.init_scale)

    def cast_weights_(self, dtype: torch.dtype) -> None:
        """W1, W2 and the biases to ``dtype`` (the model's); a learned scale stays fp32, as the record's."""
        for p in (self.w1, *self.w2, *self.b2):
            p.data = p.data.to(dtype)

    def forward(self, x: Tensor, block: int) -> Tensor:
        h = F.gelu(F.linear(x, self.w1[block].to(x.dtype)))
        c = F.linear(h, self.w2[block].to(x.dtype), self.b2[block].to(x.dtype))
        scale = self.scale.to(x.dtype) if self.learned_scale else self.scale
        # (n, T) contiguous: each lane is a contiguous row, so every layer's slice has one layout
        return (c * scale).t().contiguous()


class GateConstants(nn.Module):
    """The gates without mudd_gates: one learned value per lane (fp32, label "gate_constants"),
    starting at the lane's initial value, broadcast over the tokens."""

    def __init__(self, lanes: list[Lane]):
        super().__init__()
        self.lanes = lanes
        self.values = nn.Parameter(_initial(lanes))
        self.values.label = "gate_constants"

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.values.copy_(_initial(self.lanes))


class Coefficients:
    """One block's coefficients for one batch: ``take(kind, layer)`` -> (T, width) or None.

    ``rows`` is the block's (n, T) output, or an (n,) vector of constants expanded over the T tokens."""

    def __init__(self, lanes: list[Lane], rows: Tensor, num_tokens: int):
        self.index = {(lane.kind, lane.layer): lane for lane in lanes}
        self.rows, self.T = rows, num_tokens

    def take(self, kind: str, layer: int) -> Tensor | None:
        lane = self.index.get((kind, layer))
        if lane is None:
            return None
        rows = self.rows[lane.start:lane.start + lane.width]
        if rows.dim() == 1:              # constants: (width,) -> (T, width) without a copy
            return rows.expand(self.T, lane.width)
        return rows.t()                  # (width, T) -> (T, width)

    def has(self, kind: str, layer: int) -> bool:
        return (kind, layer) in self.index


def _rows(lanes: list[Lane]) -> int:
    return sum(lane.width for lane in lanes)


def _initial(lanes: list[Lane]) -> Tensor:
    return torch.tensor([lane.init for lane in lanes for _ in range(lane.width)], dtype=torch.float32)
