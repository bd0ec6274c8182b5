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
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def child(code: str, cache: str) -> str:
    env = dict(os.environ, TRITON_CACHE_DIR=cache, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                          text=True).stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--dtypes", default="bfloat16,float32", help="dtypes of part 1, comma-separated")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    here = f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); " \
           "from bench_dc_compile import first_calls; "
    result = {"tokens": args.tokens, "cold": {}}
    for dtype in args.dtypes.split(","):
        cache = tempfile.mkdtemp(prefix="dc-cold-")
        result["cold"][dtype] = json.loads(child(here + f"print(json.dumps(first_calls({dtype!r}, "
                                                        f"{args.tokens}, False)))", cache))
        print(dtype, "cold:", result["cold"][dtype], flush=True)
    cache = tempfile.mkdtemp(prefix="dc-warmed-")
    t0 = time.perf_counter()
    child("import torch; from speedrun.kernels.dc_mha import warm_kernels; "
          "print(warm_kernels(6, 128, 112, torch.bfloat16, 'cuda'))", cache)
    result["helper_process_s"] = round(time.perf_counter() - t0, 1)
    result["after_helper"] = json.loads(child(here + f"print(json.dumps(first_calls('bfloat16', "
                                                     f"{args.tokens}, True)))", cache))
    print("helper process (imports + warm_kernels):", result["helper_process_s"], "s; then bf16 with fused "
          "q/k/v views:", result["after_helper"], flush=True)
    if args.out:
        sys.path.insert(0, ROOT)
        from speedrun.utils import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
