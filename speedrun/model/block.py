"""One layer of the GPT: the MLP and the block that adds attention and MLP to the residual stream.

Owns the residual-stream algebra of a layer, record 45's and record 89's:

    record 45   [x += sigmoid(s) skip]; x <- a x + b x0; x += attn(norm x); x += mlp(norm x)
    record 89   [x += sigmoid(s) g skip]; x <- r_a x + p_a attn(norm u) + g0 x0 + gb beta;
                x <- r_m x + p_m mlp(norm x)

where u is x or a cached activation (record 77), g, g0, gb are per-token gates, and r, p are the
residual/post lambdas (per token at the MUDD layer). Each term is present exactly when its technique
is on (``LayerInputs`` for record 45's and attention's inputs, ``StreamInputs`` for record 89's
residual inputs); the value injection handed to attention (gated value embedding, MUDD value
sources) is assembled here because its gate reads the normed attention input.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speedrun.config import ModelConfig
from speedrun.kernels.fp8_mlp import FP8MLPState, fp8_mlp_runs_on, fp8_relu2_mlp
from speedrun.kernels.relu2_mlp import relu2_mlp
from speedrun.model.attention import CausalSelfAttention, LayerInputs, rms_norm


class MLP(nn.Module):
    """relu(x W_fc)^2 W_proj^T (GELU when relu_squared is off). Both weights are fp32 (dim, hidden):
    ``c_fc`` is used as x @ c_fc (stored (in, out)), ``c_proj`` as an nn.Linear weight (out, in).
    With ``fused_mlp`` the relu² MLP on bf16/fp16 CUDA activations runs as one fused op
    (kernels/relu2_mlp.py: relu² and its derivative in Triton matmul epilogues); same parameters.
    With an ``fp8`` state (model.fp8_mlp) the training forward runs both matmuls in FP8 on FP8 GPUs
    (kernels/fp8_mlp.py; its emulating twin on the CPU); evaluation stays bf16/fp32."""

    def __init__(self, dim: int, hidden: int, relu_squared: bool, fused_mlp: bool = False,
                 fp8: FP8MLPState | None = None):
        super().__init__()
        self.relu_squared = relu_squared
        self.fused_mlp = fused_mlp
        self.c_fc = nn.Parameter(torch.empty(dim, hidden))
        self.c_proj = nn.Parameter(torch.empty(dim, hidden))
        self.c_fc.label, self.c_proj.label = "mlp_fc", "mlp_proj"
        self.fp8 = fp8
        if fp8 is not None:
            # the fp8 weight copies are not saved: rebuilt with the loaded scales after any load
            self.register_load_state_dict_post_hook(MLP._requantize_after_load)

    @staticmethod
    def _requantize_after_load(module: "MLP", incompatible_keys) -> None:
        module.fp8.refresh(module.c_fc, module.c_proj, "keep")

    def reset_fp8(self) -> None:
        """The FP8 state of freshly initialised weights (exact scales, activation scales 1.0)."""
        if self.fp8 is not None:
            self.fp8.reset(self.c_fc, self.c_proj)

    def after_optimizer_step(self, step: int) -> None:
        """Re-quantise the FP8 weight copies from the weights optimizer step ``step`` wrote."""
        if self.fp8 is not None:
            self.fp8.after_optimizer_step(self.c_fc, self.c_proj, step)

    def forward(self, x: Tensor) -> Tensor:
        if self.fp8 is not None and self.training and fp8_mlp_runs_on(x):
            return fp8_relu2_mlp(x, self.c_fc, self.c_proj, self.fp8)
        if self.fused_mlp and self.relu_squared and x.is_cuda:
            # the fused op for 16-bit activations, its twin (this method's math) otherwise
            return relu2_mlp(x, self.c_fc, self.c_proj, kernel="auto")
        h = x @ self.c_fc.to(x.dtype)
        h = F.relu(h).square() if self.relu_squared else F.gelu(h)
        return F.linear(h, self.c_proj.to(x.dtype))


class StreamInputs(NamedTuple):
    """A layer's record-89 residual-stream inputs, built per layer by ``GPT.forward``; None where the
    technique is off at this layer (tensors only, as LayerInputs):

    lambdas: (r_attn, p_attn, r_mlp, p_mlp), 0-d (per layer) or (T, 1) (MUDD layer);
    x0_gate / x0_source: g0 and what it scales (x0; the stack input at the MUDD layer);
    bigram / bigram_gate: beta (T, D) and gb; skip_gate: the extra per-token skip factor (MUDD gates);
    attn_source: the activation whose norm attention reads instead of norm(x) (record 77, and the
    residual before the MUDD rewrite at the MUDD layer);
    value_embed: this layer's value-embedding rows (T, D), gated by either ve_gate (H, 2k), a weight
    read as 2 sigmoid(W [u[:k], ve[:k]]) per head, or ve_head_gate (T, H) (MUDD);
    v_extra: (T, D) added to the value injection (MUDD value sources)."""
    lambdas: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    x0_gate: Tensor | None = None
    x0_source: Tensor | None = None
    bigram: Tensor | None = None
    bigram_gate: Tensor | None = None
    skip_gate: Tensor | None = None
    attn_source: Tensor | None = None
    value_embed: Tensor | None = None
    ve_gate: Tensor | None = None
    ve_head_gate: Tensor | None = None
    v_extra: Tensor | None = None


NO_STREAM = StreamInputs()


class Block(nn.Module):
    """One layer (see the module docstring for its algebra).

    One class for all layers; everything layer-specific (lambdas, gates, value embedding, window,
    skip) comes in through ``LayerInputs`` / ``StreamInputs`` as *tensors*, never as Python numbers
    read from the module. That keeps the compiled code identical across layers, so regional
    compilation compiles it once per variant (which inputs are present) and reuses it for every layer
    of that variant."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, micro_steps: int = 1):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.ve_gate_dim = cfg.value_embed_gate_dim   # the same for every layer: no specialization
        self.attn = None
        if cfg.has_attention(layer):
            self.attn = CausalSelfAttention(cfg.model_dim, cfg.num_heads, cfg.head_dim,
                                            qk_norm=cfg.qk_norm, rotary=cfg.rotary,
                                            attn_gate=cfg.attn_gate, gate_dim=cfg.gate_dim,
                                            dtype=dtype, paired=layer in cfg.paired_head_layers,
                                            key_offset=cfg.key_offset and layer in cfg.long_window_layers,
                                            dc_window=cfg.dc_window,
                                            dc_kernel="auto" if cfg.fused_dc else "torch")
        fp8 = FP8MLPState(cfg.model_dim, cfg.mlp_dim, micro_steps, cfg.fp8_mlp_act_headroom,
                          cfg.fp8_mlp_weight_headroom, cfg.fp8_mlp_exact_steps) if cfg.fp8_mlp else None
        self.mlp = MLP(cfg.model_dim, cfg.mlp_dim, cfg.relu_squared, cfg.fused_mlp, fp8)

    def forward(self, x: Tensor, inp: LayerInputs, res: StreamInputs = NO_STREAM) -> Tensor:
        if inp.skip is not None:
            gate = torch.sigmoid(inp.skip_gate)
            if res.skip_gate is not None:
                gate = gate * res.skip_gate
            x = x + gate * inp.skip
        if inp.lambdas is not None:
            x = inp.lambdas[0] * x + inp.lambdas[1] * inp.x0
        lam = res.lambdas
        if self.attn is not None:
            u = rms_norm(x if res.attn_source is None else res.attn_source)
            if res.value_embed is not None or res.v_extra is not None:
                inp = inp._replace(ve=self.value_injection(u, res), value_lambdas=None)
            y = self.attn(u, inp)
            x = x + y if lam is None else lam[0] * x + lam[1] * y
            if res.x0_gate is not None:
                x = x + res.x0_gate * res.x0_source
            if res.bigram_gate is not None:
                x = x + res.bigram_gate * res.bigram
        m = self.mlp(rms_norm(x))
        return x + m if lam is None else lam[2] * x + lam[3] * m

    def value_injection(self, u: Tensor, res: StreamInputs) -> Tensor:
        """What attention adds to v (T, dim): the gated value embedding plus the MUDD sources."""
        out = None
        ve = res.value_embed
        if ve is not None:
            if res.ve_gate is not None:   # record 55/70: the gate reads u's and ve's first k dims
                k = self.ve_gate_dim
                gate_in = torch.cat([u[:, :k], ve[:, :k].to(u.dtype)], dim=-1)
                gate = 2 * torch.sigmoid(F.linear(gate_in, res.ve_gate.to(u.dtype)))
            else:
                gate = res.ve_head_gate
            T, H = ve.shape[0], self.num_heads
            out = (gate.unsqueeze(-1) * ve.view(T, H, -1)).view(T, -1)
        if res.v_extra is not None:
            out = res.v_extra if out is None else out + res.v_extra
        return out
