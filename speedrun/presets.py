"""Record-89-shaped configs in code, for tests and benchmarks (the recipe itself is
``configs/record_89.json``; tests/test_config_r89.py checks that the two agree).

``record89_model`` is the model of record 89 (head-spec.md) with every embedding / residual-stream
switch of issue 16 on, and the attention-coefficient lists that the model produces for (issue 17's
consumers); ``record89_optim`` its Adam groups (r89-model.md section 10). The attention internals
(paired heads, key offset), the FP8 MLP and head scales, the untie by stage, NorMuon's and Adam's
other record-89 settings and the stage table are the json's (``record89_model(paired_head_layers=...)``
adds them).
"""
from __future__ import annotations

import dataclasses

from speedrun.config import AdamGroup, ModelConfig, OptimConfig


def record89_model(**overrides) -> ModelConfig:
    """Record 89's model config (11 layers, 768 wide, vocabulary 50304), ``overrides`` applied."""
    cfg = ModelConfig(
        attn_gate=False,                          # record 89 has output gates on 2 layers instead
        block_lambdas=False,                      # -> residual / post lambdas and x0 gates
        value_embed_layers=[-1, 0, 1, -1, -1, -1, -1, -1, 2, 3, 4],   # 5 untied tables
        value_embed_gates=True, value_embed_gate_dim=6, value_embed_init_std=0.01,
        bigram_embed=True, bigram_vocab_size=50304 * 15 // 2, bigram_sign_rows=8192,
        residual_lambdas=True, x0_gates=True, attn_input_layer=7,
        mudd=True, mudd_layer=10, mudd_value_sources=[-1, 7, 9], mudd_residual_sources=[-1, 7],
        mudd_final_sources=[-1, 7, 9, 3], mudd_final_value_embed=0,
        mudd_gates=True, mudd_gate_layer=4, mudd_hidden=64, mudd_scale=0.1,
        logit_softcap=23.0, logit_softcap_offset=5.0, logit_softcap_temperature=7.5,
        tie_embed=True, untie_after_step=847, head_init_std=0.005,
        attn_out_init_nonzero=True,
        xsa_layers=[1, 3, 4, 7], attn_out_gate_layers=[3, 10], dc_layers=[10], attn_lambdas=True)
    return dataclasses.replace(cfg, **overrides)


def record89_optim() -> OptimConfig:
    """Record 89's Adam groups (betas, lr multipliers, weight-decay multipliers, eps 1e-10) and its
    smear gate on Adam. Its weight decay (decay_form lr_squared, 0.005), fp32 state and NorMuon
    settings are configs/record_89.json's."""
    cfg = OptimConfig(smear_gate_optimizer="adam")
    adam = cfg.adam
    adam.eps = 1e-10
    adam.embed = AdamGroup(1.0, [0.5, 0.95], 150.0)
    adam.lm_head = AdamGroup(1.0, [0.5, 0.95], 150.0)
    adam.value_embed = AdamGroup(75.0, [0.75, 0.95], 5.0)
    adam.scalars = AdamGroup(5.0, [0.9, 0.99], 0.0)
    # the record-89-only labels default to record 89's values (config.AdamConfig)
    return cfg
