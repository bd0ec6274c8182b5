"""Learned per-layer constants of record 89's attention, in one fp32 vector (label "scalars", so
Adam trains it; padded to a multiple of 8 so it shards evenly over 1/2/4/8 ranks).

Owns, per attention layer whose switch is on (``ModelConfig``, "record 89: attention"):
- the attention lambdas (record 47, ``attn_lambdas``): (l_qkv, l_o) scaling [Wq;Wk;Wv] and Wo,
  init (0.5, 1.0) as the public code's ``sa_lambdas``; this is their only source;
- static stand-ins for the per-token coefficients record 89 makes with its MUDD gates (the
  residual side's producer, issue 16): XSA alpha (pre-tanh, init 0: XSA starts off), the linear
  output gate (init 0.25), DC's w1 (before its RMS norm over heads, init 1) and w2 (init 0: the
  correction starts at zero), one value per head, the public code's initial values.

``fill`` gives a layer's ``LayerInputs`` each of these its switches need and its producer left
None, as (1, H) tensors (the same value at every token) or 0-d lambdas. When the producer makes
them all per token, only the lambdas remain here.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from speedrun.config import ModelConfig

XSA_ALPHA_INIT, OUT_GATE_INIT, DC_W1_INIT, DC_W2_INIT = 0.0, 0.25, 1.0, 0.0
LAMBDA_QKV_INIT, LAMBDA_O_INIT = 0.5, 1.0


def needed(cfg: ModelConfig) -> bool:
    """Whether the model has any of these constants."""
    return bool(cfg.attn_lambdas or cfg.xsa_layers or cfg.attn_out_gate_layers or cfg.dc_layers)


class AttentionCoefficients(nn.Module):
    """See the module docstring. ``values`` is the one parameter; ``forward()`` splits it into
    per-layer LayerInputs fields (one autograd node per model forward)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H = cfg.num_heads
        # (layer, field, per-entry inits) in vector order
        self.entries: list[tuple[int, str, list[float]]] = []
        for i in range(cfg.num_layers):
            if not cfg.has_attention(i):
                continue
            if cfg.attn_lambdas:
                self.entries.append((i, "attn_lambdas", [LAMBDA_QKV_INIT, LAMBDA_O_INIT]))
            if i in cfg.xsa_layers:
                self.entries.append((i, "xsa_alpha", [XSA_ALPHA_INIT] * H))
            if i in cfg.attn_out_gate_layers:
                self.entries.append((i, "out_gate", [OUT_GATE_INIT] * H))
            if i in cfg.dc_layers:
                self.entries.append((i, "dc_weights", [DC_W1_INIT] * H + [DC_W2_INIT] * H))
        self.num_heads = H
        self.sizes = [len(init) for *_, init in self.entries]
        used = sum(self.sizes)
        self.padding = -(-used // 8) * 8 - used
        self.values = nn.Parameter(self.initial())
        self.values.label = "scalars"

    def initial(self) -> Tensor:
        inits = [v for *_, init in self.entries for v in init] + [0.0] * self.padding
        return torch.tensor(inits, dtype=torch.float32)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.values.copy_(self.initial())

    def forward(self) -> list[dict[str, Tensor | tuple[Tensor, Tensor]]]:
        """Per layer (index = layer), the LayerInputs fields held here, as views of ``values``."""
        per_layer: list[dict] = [{} for _ in range(1 + max([i for i, *_ in self.entries], default=-1))]
        parts = self.values.split(self.sizes + [self.padding])
        H = self.num_heads
        for (layer, name, _), part in zip(self.entries, parts):
            if name == "attn_lambdas":
                value = (part[0], part[1])
            elif name == "dc_weights":
                value = (part[:H].view(1, H), part[H:].view(1, H))
            else:
                value = part.view(1, H)
            per_layer[layer][name] = value
        return per_layer

    @staticmethod
    def fill(inp, given: dict):
        """``inp`` (a LayerInputs) with the fields of ``given`` that it leaves None."""
        missing = {name: value for name, value in given.items() if getattr(inp, name) is None}
        return inp._replace(**missing) if missing else inp
