"""DC-MHA's Triton kernels on their first call: the JIT compile a cold start pays, and what the
warm-up helper's ``warm_kernels`` leaves of it in the next process.

1. In a fresh Triton cache, per dtype (bf16 = the recipe, fp32 = the tests): the first forward and
   backward at T tokens (6 heads of 128, window 112: the record's DC layer), then a second call.
2. In another fresh cache: ``warm_kernels`` in a child process (as the helper runs it), then this
   process's first call with q/k/v as views of a fused (T, 3, H, D) projection (row stride 3 H D,
   not the helper's H D): a cache hit shows as a near-zero backward.

    PYTHONPATH=$PWD python3 benchmarks/bench_dc_compile.py [--tokens 16384] [--dtypes bfloat16,float32]
        [--out dc_compile.json]

CUDA only. Each part runs in its own child process so that every first call really is one.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import fresh_process


def first_calls(dtype_name: str, tokens: int, fused_views: bool) -> dict:
    """Seconds of the first and second forward / backward in this process."""
    import torch

    from speedrun.kernels.dc_mha import dc_mha
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(0)
    T, H, D = tokens, 6, 128
    doc = (torch.arange(T, device="cuda") // 700).to(torch.int32)
    out = {}
    for attempt in ("first", "second"):
        qkv = (torch.randn(T, 3, H, D, device="cuda", generator=gen) * 0.1).to(dtype)
        if not fused_views:
            qkv = qkv.transpose(0, 1).contiguous().transpose(0, 1)     # each of q/k/v contiguous
        qkv.requires_grad_()
        y = torch.randn(T, H, D, device="cuda", generator=gen).to(dtype).requires_grad_()
        w1, w2 = (torch.randn(1, H, device="cuda", generator=gen).to(dtype).requires_grad_() for _ in range(2))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        o = dc_mha(y, qkv[:, 0], qkv[:, 1], qkv[:, 2], w1, w2, doc, 112, kernel="triton")
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        torch.autograd.grad(o.float().sum(), (qkv, y, w1, w2))
        torch.cuda.synchronize()
        out[attempt] = {"forward_s": round(t1 - t0, 3), "backward_s": round(time.perf_counter() - t1, 3)}
    return out


def warm_here() -> bool:
    """What the warm-up helper does for record 89's DC layer (bf16, 6 heads of 128, window 112)."""
    import torch

    from speedrun.kernels.dc_mha import warm_kernels
    return warm_kernels(6, 128, 112, torch.bfloat16, "cuda")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="dtypes of part 1, comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"tokens": args.tokens, "cold": {}}
    for dtype in args.dtypes.split(","):
        cold = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="dc-cold-")}
        result["cold"][dtype] = fresh_process.call("bench_dc_compile", "first_calls", dtype, args.tokens, False,
                                                   env=cold)
        print(dtype, "cold:", result["cold"][dtype], flush=True)
    warmed = {"TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="dc-warmed-")}
    t0 = time.perf_counter()
    if not fresh_process.call("bench_dc_compile", "warm_here", env=warmed):
        raise SystemExit("bench_dc_compile: warm_kernels ran nothing (no CUDA or Triton in the child)")
    result["helper_process_s"] = round(time.perf_counter() - t0, 1)
    result["after_helper"] = fresh_process.call("bench_dc_compile", "first_calls", "bfloat16", args.tokens, True,
                                                env=warmed)
    print("helper process (imports + warm_kernels):", result["helper_process_s"], "s; then bf16 with fused "
          "q/k/v views:", result["after_helper"], flush=True)
    if args.out:
        sys.path.insert(0, fresh_process.ROOT)
        from speedrun.utils import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
