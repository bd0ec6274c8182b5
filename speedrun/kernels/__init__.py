"""speedrun.kernels

Fused GPU kernels (Triton), each behind a dispatcher with a plain-PyTorch twin (DESIGN principle 2).
`kernel="auto"` picks the Triton path on CUDA when triton imports, the twin otherwise; `"triton"`
raises where it cannot run; `"torch"` forces the twin. Tests compare each kernel with its twin
(tests/test_kernels_*.py); benchmarks/bench_kernels.py times them.

| module | fast path | plain twin |
|---|---|---|
| `softcap_ce.py` | `softcapped_cross_entropy` (Triton fwd: streamed softcap + log-sum-exp, writes only per-row loss/lse; Triton bwd: gradient wrt raw logits in their dtype, optionally in place) | `softcapped_cross_entropy_reference` (fp32 softcap + `F.cross_entropy`) |
| `relu2_mlp.py` | `linear_relu_square` (Triton matmul with relu² epilogue; backward keeps only x, W and h and rebuilds relu(pre) = sqrt(h)) | `linear_relu_square_reference` (`relu(x @ W).square()`) |
"""
