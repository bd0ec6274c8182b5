"""Optimizer step time for the record's parameter set on one CUDA GPU: NorMuon (Polar Express via
torch vs Triton symmetric kernels) with record 45's settings and with the record-89 NorMuon switches
(Q/K per head pair, matrix axis, bf16 weights + mantissa), Polar Express alone on the stacked shapes
of both (record 89 adds 60 head-pair blocks of 256 x 768 and 20 V/O matrices of 768 x 768), DistAdam.

    python benchmarks/bench_optim.py --out bench_optim.json [--iters 50] [--warmup 10] [--autotune]

Prints a table (median / min ms over iterations, timed with CUDA events after warm-up) and writes the
numbers, GPU name and versions as JSON. Grads are random normal (never zeros).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedrun.config import OptimConfig  # noqa: E402
from speedrun.optim.build import build_optimizers  # noqa: E402
from speedrun.optim.polar_express import polar_express  # noqa: E402


def _param(shape, label, dtype) -> nn.Parameter:
    p = nn.Parameter(torch.randn(shape, device="cuda", dtype=torch.float32).mul_(0.02).to(dtype))
    p.label = label
    return p


class RecordParams(nn.Module):
    """The record's trainable tensors (reference-spec 1.1): fp32 block matrices, bf16 rest."""

    def __init__(self, dim=768, vocab=50304, layers=11, attn_layers=10, value_embeds=3, heads=6,
                 matrix_dtype=torch.float32):
        super().__init__()
        bf, mat = torch.bfloat16, matrix_dtype
        self.attn = nn.ParameterList([_param((dim, 4 * dim), "attn", mat) for _ in range(attn_layers)])
        for p in self.attn:
            p.num_heads = heads
        self.fc = nn.ParameterList([_param((dim, 4 * dim), "mlp_fc", mat) for _ in range(layers)])
        self.proj = nn.ParameterList([_param((dim, 4 * dim), "mlp_proj", mat) for _ in range(layers)])
        self.smear = _param((1, 12), "smear_gate", bf)
        self.gates = nn.ParameterList([_param((6, 12), "attn_gate", bf) for _ in range(attn_layers)])
        self.embed = _param((vocab, dim), "embed", bf)
        self.value_embed = nn.ParameterList([_param((vocab, dim), "value_embed", bf) for _ in range(value_embeds)])
        self.lm_head = _param((vocab, dim), "lm_head", bf)
        self.scalars = _param((64,), "scalars", torch.float32)


def time_ms(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_optim.json")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--autotune", action="store_true",
                    help="autotune the symmetric kernels over all candidates and print the picks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_optim.py needs a CUDA GPU")
    from speedrun.kernels import symmetric_matmul
    symmetric_matmul.AUTOTUNE = args.autotune
    torch.manual_seed(0)
    rows = []

    def record(name, kernel, times, **extra):
        rows.append({"name": name, "kernel": kernel, "median_ms": statistics.median(times), "min_ms": min(times),
                     **extra})

    # Polar Express alone on the shapes NorMuon sees on one GPU; the first call's wall time includes
    # the kernels' JIT compile (and autotuning with --autotune): part of a cold start
    for shape in [(40, 768, 768), (22, 768, 3072), (10, 6, 12), (60, 256, 768), (20, 768, 768)]:
        G = torch.randn(shape, device="cuda")
        for kernel in ("torch", "triton"):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            polar_express(G, kernel=kernel)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            record(f"polar_express {tuple(shape)}", kernel,
                   time_ms(lambda: polar_express(G, kernel=kernel), args.iters, args.warmup), first_call_s=first)
    if args.autotune:
        picks = {str(k): str(v) for k, v in symmetric_matmul._symmetric_autotuned.cache.items()}
        print("autotune picks (M, K, HAS_ADD, ...):", json.dumps(picks, indent=1))
        rows.append({"name": "autotune picks", "picks": picks})

    # Full optimizer steps
    for kernel in ("torch", "triton"):
        model = RecordParams()
        cfg = OptimConfig()
        cfg.muon.kernel = kernel
        opt = build_optimizers(model, cfg)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        record("NorMuon step (43 params)", kernel,
               time_ms(lambda: opt.muon.step(lr_mult=1.0, momentum=0.95), args.iters, args.warmup))
        opt.adam.kernel = kernel  # fused update kernel vs its torch twin
        record("DistAdam step (6 params, 193M)", kernel,
               time_ms(lambda: opt.adam.step(lr_mult=1.0), args.iters, args.warmup))
        model = opt = None  # free the 193M parameters before the next kernel
        torch.cuda.empty_cache()
        # record 89's NorMuon: bf16 block matrices + mantissa, Q/K per head pair, matrix axis
        model = RecordParams(matrix_dtype=torch.bfloat16)
        cfg = OptimConfig()
        m = cfg.muon
        m.kernel, m.axis, m.qk_head_pairs, m.bf16_weights, m.c_proj_lr_mul = kernel, "matrix", True, True, 4.0
        opt = build_optimizers(model, cfg)
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        record("NorMuon step (r89 switches)", kernel,
               time_ms(lambda: opt.muon.step(lr_mult=1.0, momentum=0.95), args.iters, args.warmup))
        model = opt = None
        torch.cuda.empty_cache()

    import triton
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "iters": args.iters, "warmup": args.warmup, "results": rows}
    print(f"GPU: {info['gpu']}  torch {info['torch']}  CUDA {info['cuda']}  triton {info['triton']}")
    print(f"{'what':<36} {'kernel':<7} {'median ms':>10} {'min ms':>8}")
    for r in rows:
        if "median_ms" in r:
            first = f" first call {r['first_call_s']:.2f} s" if "first_call_s" in r else ""
            print(f"{r['name']:<36} {r['kernel']:<7} {r['median_ms']:>10.3f} {r['min_ms']:>8.3f}{first}")
    with open(args.out, "w") as f:
        json.dump(info, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
