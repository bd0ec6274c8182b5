"""speedrun.kernels

Fused GPU kernels (Triton), each behind a dispatcher with a plain-PyTorch twin (DESIGN principle 2).
`kernel="auto"` picks the Triton path on CUDA when triton imports, the twin otherwise; `"triton"`
raises where it cannot run; `"torch"` forces the twin. Tests compare each kernel with its twin
(tests/test_kernels_*.py); benchmarks/bench_kernels.py times them.

| module | fast path | plain twin |
|---|---|---|
| `softcap_ce.py` | `softcapped_cross_entropy` (Triton fwd: streamed softcap + log-sum-exp, writes only per-row loss/lse; Triton bwd: gradient wrt raw logits in their dtype, optionally in place) | `softcapped_cross_entropy_reference` (fp32 softcap + `F.cross_entropy`) |
| `relu2_mlp.py` | `relu2_mlp` (the whole MLP as a custom op: Triton matmul with relu² epilogue forward; backward matmul with the relu² derivative 2 sqrt(h) in its epilogue, so neither the pre-activation nor its gradient is written); `linear_relu_square` (first half only) | `relu2_mlp_reference`, `linear_relu_square_reference` |
| `fp8_mlp.py` | `fp8_relu2_mlp` (the FP8 MLP's training forward as the op `speedrun::fp8_relu2_mlp`: Triton fp8 up projection whose epilogue writes post in bf16 and e4m3 and its amax, `_scaled_mm` down projection; bf16 backward through relu2_mlp's kernel); `FP8MLPState.refresh` (two Triton launches per layer) | `fp8_relu2_mlp_reference` (the quantisation emulated in torch, same backward), `FP8MLPState._refresh_reference` |
| `fp8_head_ce.py` | `fp8_head_softcap_ce` (FP8 lm_head + softcapped CE as one op; backward tile kernel writes the e5m2 logit gradient and its transpose straight for the two FP8 matmuls) | `fp8_head_softcap_ce_reference` (`fp8_linear` + `softcapped_cross_entropy`) |
| `adam_update.py` | `adam_update_` (one pass over p, g, m, v per shard) | `adam_update_reference` (DistAdam's torch ops) |
| `symmetric_matmul.py` | `xxt`, `ba_plus_caa` for Polar Express (lower-triangle tiles, mirrored) | `xxt_reference`, `ba_plus_caa_reference` |
"""
