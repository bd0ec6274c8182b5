"""Benchmark the fused Triton kernels against their plain twins (eager and torch.compile) on CUDA.

Owns the numbers behind the kernels' speed claims: at the record's sizes it times
  * softcapped cross-entropy, logits 32768 x 50304 bf16, forward and forward+backward;
  * linear + ReLU², x 32768 x 768 bf16 @ W 768 x 3072 (fp32 master weight), forward and forward+backward;
  * the FP8 head + softcapped CE, x 32768 x 768 -> 50304: the fused op (kernels/fp8_head_ce.py) vs the
    unfused pipeline it replaces (fp8_mm + the Triton CE), eager and torch.compile (fullgraph);
each as: the Triton kernel, the eager twin, torch.compile of the twin (and the CE kernel with its
in-place backward). Times are medians of triton.testing.do_bench after a warm-up (which also runs
Triton's autotuning and torch.compile). Prints one table (ms, speedup, achieved TB/s or TFLOP/s, peak
memory, relative error vs the twin) and writes JSON to --out.

    python benchmarks/bench_kernels.py --out bench_kernels.json [--sweep-ce] [--sweep-fp8-ce] [--no-compile]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedrun.kernels import fp8_head_ce, relu2_mlp, softcap_ce  # noqa: E402
from speedrun.kernels.relu2_mlp import linear_relu_square, linear_relu_square_reference  # noqa: E402
from speedrun.kernels.softcap_ce import (  # noqa: E402
    softcapped_cross_entropy,
    softcapped_cross_entropy_reference,
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def bench(fn: Callable[[], object], warmup_calls: int = 3, rep_ms: int = 1000,
          warmup_ms: int = 100) -> tuple[float, float]:
    """(median ms, peak GiB allocated during one call beyond what was allocated before).
    Also used by bench_mlp.py."""
    from triton.testing import do_bench

    for _ in range(warmup_calls):  # autotuning, compilation, allocator warm-up
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return float(ms), float(peak)


# ------------------------------------------------------------------------------------------------
# Cross-entropy
# ------------------------------------------------------------------------------------------------
def bench_ce(tokens: int, vocab: int, compile_twin: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 4).bfloat16()  # never zeros
    t = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    leaf = z.clone().requires_grad_()

    variants: dict[str, Callable] = {
        "triton": lambda zz, tt: softcapped_cross_entropy(zz, tt, kernel="triton"),
        "twin (eager)": softcapped_cross_entropy_reference,
    }
    if compile_twin:
        variants["twin (torch.compile)"] = torch.compile(softcapped_cross_entropy_reference, dynamic=False)

    # Reference outputs of the twin for the error column.
    ref_loss = softcapped_cross_entropy_reference(leaf, t)
    (ref_grad,) = torch.autograd.grad(ref_loss, leaf)

    io_bytes_fwd = tokens * vocab * z.element_size()  # read the logits once
    io_bytes_fwd_bwd = 3 * io_bytes_fwd  # + backward: read the logits again, write the gradient
    rows = []
    for name, fn in variants.items():
        loss = fn(leaf, t)
        (grad,) = torch.autograd.grad(loss, leaf)
        err = max(rel_err(loss, ref_loss), rel_err(grad.float(), ref_grad.float()))
        del loss, grad
        with torch.no_grad():
            fwd_ms, fwd_mem = bench(lambda: fn(leaf, t))
        fb_ms, fb_mem = bench(lambda: torch.autograd.grad(fn(leaf, t), leaf))
        rows.append(dict(kernel="softcap_ce", variant=name, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                         fwd_tbps=io_bytes_fwd / fwd_ms / 1e9, fwd_bwd_tbps=io_bytes_fwd_bwd / fb_ms / 1e9,
                         peak_gib=fb_mem, rel_err=err))

    # In-place backward: the gradient overwrites the logits buffer. The buffer is reused call after
    # call, so from the second call on the "logits" are previous gradients: the kernels' cost does not
    # depend on the values (same loads, exps and stores), only the error column needs fresh inputs.
    buf = z.clone().requires_grad_()
    loss = softcapped_cross_entropy(buf, t, kernel="triton", inplace_backward=True)
    (grad,) = torch.autograd.grad(loss, buf)
    err = max(rel_err(loss, ref_loss), rel_err(grad.float(), ref_grad.float()))
    del loss, grad
    fb_ms, fb_mem = bench(
        lambda: torch.autograd.grad(softcapped_cross_entropy(buf, t, kernel="triton", inplace_backward=True), buf)
    )
    rows.append(dict(kernel="softcap_ce", variant="triton (in-place bwd)", fwd_ms=rows[0]["fwd_ms"],
                     fwd_bwd_ms=fb_ms, fwd_tbps=rows[0]["fwd_tbps"], fwd_bwd_tbps=io_bytes_fwd_bwd / fb_ms / 1e9,
                     peak_gib=fb_mem, rel_err=err))
    return rows


def sweep_ce(tokens: int, vocab: int) -> list[dict]:
    """Time the CE kernels over (BLOCK_V, num_warps) to tune softcap_ce._launch_config."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = (torch.randn(tokens, vocab, device="cuda", generator=gen) * 4).bfloat16().requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    original = softcap_ce._launch_config
    out = []
    try:
        for block_v in (1024, 2048, 4096, 8192):
            for num_warps in (4, 8, 16):
                softcap_ce._launch_config = lambda n, b=block_v, w=num_warps: (b, w)
                with torch.no_grad():
                    fwd_ms, _ = bench(lambda: softcapped_cross_entropy(z, t, kernel="triton"), warmup_calls=1)
                fb_ms, _ = bench(lambda: torch.autograd.grad(softcapped_cross_entropy(z, t, kernel="triton"), z),
                                 warmup_calls=1)
                out.append(dict(block_v=block_v, num_warps=num_warps, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms))
                print(f"  CE sweep BLOCK_V={block_v:5d} warps={num_warps:2d}: fwd {fwd_ms:.3f} ms, "
                      f"fwd+bwd {fb_ms:.3f} ms", flush=True)
    finally:
        softcap_ce._launch_config = original
    return out


# ------------------------------------------------------------------------------------------------
# FP8 lm_head + softcapped cross-entropy
# ------------------------------------------------------------------------------------------------
def _fp8_head_inputs(tokens: int, dim: int, vocab: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(tokens, dim, device="cuda", generator=gen), (dim,))
    w = torch.randn(vocab, dim, device="cuda", generator=gen) * 0.02
    t = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
    return x.bfloat16().requires_grad_(), w.bfloat16().requires_grad_(), t


def bench_fp8_head_ce(tokens: int, dim: int, vocab: int, compile_twin: bool) -> list[dict]:
    """Fused op vs the unfused pipeline; "twin (torch.compile)" is what the compiled model ran before."""
    x, w, t = _fp8_head_inputs(tokens, dim, vocab)

    def fused(xx, ww, tt):
        return fp8_head_ce.fp8_head_softcap_ce(xx, ww, tt, kernel="fused")

    variants: dict[str, Callable] = {"fused": fused, "twin (eager)": fp8_head_ce.fp8_head_softcap_ce_reference}
    if compile_twin:
        variants["fused (torch.compile)"] = torch.compile(fused, dynamic=False, fullgraph=True)
        variants["twin (torch.compile)"] = torch.compile(fp8_head_ce.fp8_head_softcap_ce_reference,
                                                         dynamic=False, fullgraph=True)

    ref_loss = fp8_head_ce.fp8_head_softcap_ce_reference(x, w, t)
    ref_gx, ref_gw = torch.autograd.grad(ref_loss, (x, w))

    flops_fwd = 2 * tokens * dim * vocab
    flops_fwd_bwd = 3 * flops_fwd  # + grad_x = g @ W and grad_W = g^T @ x
    rows = []
    for name, fn in variants.items():
        loss = fn(x, w, t)
        gx, gw = torch.autograd.grad(loss, (x, w))
        err = max(rel_err(loss, ref_loss), rel_err(gx, ref_gx), rel_err(gw, ref_gw))
        del loss, gx, gw
        with torch.no_grad():
            fwd_ms, _ = bench(lambda: fn(x, w, t))
        fb_ms, fb_mem = bench(lambda: torch.autograd.grad(fn(x, w, t), (x, w)))
        rows.append(dict(kernel="fp8_head_softcap_ce", variant=name, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                         fwd_tflops=flops_fwd / fwd_ms / 1e9, fwd_bwd_tflops=flops_fwd_bwd / fb_ms / 1e9,
                         peak_gib=fb_mem, rel_err=err))
    return rows


def sweep_fp8_head_ce(tokens: int, dim: int, vocab: int) -> list[dict]:
    """Time the backward tile kernel alone over (BLOCK_T, BLOCK_V, num_warps), to tune
    fp8_head_ce._tile_config. Traffic: read the bf16 logits, write g_f8 and g_f8_t (4 bytes/element)."""
    x, w, t = _fp8_head_inputs(tokens, dim, vocab)
    with torch.no_grad():
        _, logits, lse, _, _ = torch.ops.speedrun.fp8_head_softcap_ce(x, w, t, 30.0, 7.5, 0.0, -100,
                                                                      *fp8_head_ce.head_scales(dim))
    grad_loss = torch.ones((), device="cuda")
    original = fp8_head_ce._tile_config
    out = []
    try:
        # (BLOCK_T, BLOCK_V, num_warps) tiles that did not spill in the first sweep, each with one tile
        # per program and with a pipelined loop over 8 / 64 V tiles per program
        for block_t, block_v, num_warps in ((64, 128, 4), (64, 128, 8), (32, 256, 8), (128, 64, 4), (32, 128, 4)):
            for num_stages, tiles in ((1, 1), (2, 8), (3, 8), (2, 64), (3, 64)):
                cfg = (block_t, block_v, num_warps, num_stages, tiles)
                fp8_head_ce._tile_config = lambda c=cfg: c
                ms, _ = bench(lambda: fp8_head_ce.softcap_ce_grad_fp8(logits, lse, t, grad_loss, 30.0, 1 / 448,
                                                                      kernel="triton"), warmup_calls=1)
                tbps = 4 * tokens * vocab / ms / 1e9
                out.append(dict(block_t=block_t, block_v=block_v, num_warps=num_warps, num_stages=num_stages,
                                tiles_per_program=tiles, bwd_kernel_ms=ms, tbps=tbps))
                print(f"  FP8 CE grad sweep BLOCK_T={block_t:4d} BLOCK_V={block_v:4d} warps={num_warps:2d} "
                      f"stages={num_stages} tiles/program={tiles:3d}: {ms:.3f} ms, {tbps:.2f} TB/s", flush=True)
    finally:
        fp8_head_ce._tile_config = original
    return out


# ------------------------------------------------------------------------------------------------
# MLP up-projection + ReLU²
# ------------------------------------------------------------------------------------------------
def bench_mlp(tokens: int, dim: int, hidden: int, compile_twin: bool) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16().requires_grad_()
    bound = 3**0.5 * 0.5 * dim**-0.5  # the record's c_fc init, fp32 master weight
    w = ((torch.rand(dim, hidden, device="cuda", generator=gen) * 2 - 1) * bound).requires_grad_()
    g = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()

    variants: dict[str, Callable] = {
        "triton": lambda xx, ww: linear_relu_square(xx, ww, kernel="triton"),
        "twin (eager)": linear_relu_square_reference,
    }
    if compile_twin:
        variants["twin (torch.compile)"] = torch.compile(linear_relu_square_reference, dynamic=False)

    ref_h = linear_relu_square_reference(x, w)
    ref_gx, ref_gw = torch.autograd.grad(ref_h, (x, w), g)

    flops_fwd = 2 * tokens * dim * hidden
    flops_fwd_bwd = 3 * flops_fwd  # + dX = dPre W^T and dW = X^T dPre
    rows = []
    for name, fn in variants.items():
        h = fn(x, w)
        gx, gw = torch.autograd.grad(h, (x, w), g)
        err = max(rel_err(h, ref_h), rel_err(gx, ref_gx), rel_err(gw, ref_gw))
        del h, gx, gw
        with torch.no_grad():
            fwd_ms, _ = bench(lambda: fn(x, w))
        fb_ms, fb_mem = bench(lambda: torch.autograd.grad(fn(x, w), (x, w), g))
        rows.append(dict(kernel="linear_relu_square", variant=name, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms,
                         fwd_tflops=flops_fwd / fwd_ms / 1e9, fwd_bwd_tflops=flops_fwd_bwd / fb_ms / 1e9,
                         peak_gib=fb_mem, rel_err=err))
    best = getattr(relu2_mlp._linear_relu_square_autotuned, "best_config", None)
    if best is not None:
        rows[0]["autotuned_config"] = str(best)
    return rows


# ------------------------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    header = (f"{'kernel':<20}{'variant':<24}{'fwd ms':>9}{'fwd+bwd ms':>12}{'x eager':>9}{'x compiled':>11}"
              f"{'rate (fwd+bwd)':>17}{'peak GiB':>10}{'rel err':>10}")
    print(header)
    print("-" * len(header))
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        group = [r for r in rows if r["kernel"] == kernel]
        eager = next((r for r in group if r["variant"] == "twin (eager)"), None)
        compiled = next((r for r in group if r["variant"] == "twin (torch.compile)"), None)
        for r in group:
            r["speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"] if eager else None
            r["speedup_vs_compiled"] = compiled["fwd_bwd_ms"] / r["fwd_bwd_ms"] if compiled else None
            rate = (f"{r['fwd_bwd_tbps']:.2f} TB/s" if "fwd_bwd_tbps" in r else f"{r['fwd_bwd_tflops']:.0f} TFLOP/s")
            sp_e = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] else "-"
            sp_c = f"{r['speedup_vs_compiled']:.2f}" if r["speedup_vs_compiled"] else "-"
            print(f"{kernel:<20}{r['variant']:<24}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{sp_e:>9}{sp_c:>11}"
                  f"{rate:>17}{r['peak_gib']:>10.2f}{r['rel_err']:>10.2e}")
    errs = {f"{r['kernel']}/{r['variant']}": r["rel_err"] for r in rows if not r["variant"].startswith("twin (eager)")}
    print(f"max relative error vs the eager twin: {max(errs.values()):.2e} ({max(errs, key=errs.get)})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_kernels.json", help="JSON results file")
    parser.add_argument("--ce-tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--mlp-tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile twins")
    parser.add_argument("--sweep-ce", action="store_true", help="also sweep the CE kernels' BLOCK_V / num_warps")
    parser.add_argument("--sweep-fp8-ce", action="store_true",
                        help="also sweep the FP8 head CE backward tile kernel's BLOCK_T / BLOCK_V / num_warps")
    parser.add_argument("--only", choices=("ce", "mlp", "fp8-ce"), default=None)
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU (the kernels' fast path is CUDA-only)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is for CPU tests, not for timing")

    import triton

    rows: list[dict] = []
    if args.only in (None, "ce"):
        rows += bench_ce(args.ce_tokens, args.vocab, not args.no_compile)
        torch.cuda.empty_cache()
    if args.only in (None, "mlp"):
        rows += bench_mlp(args.mlp_tokens, args.dim, args.hidden, not args.no_compile)
        torch.cuda.empty_cache()
    if args.only in (None, "fp8-ce"):
        rows += bench_fp8_head_ce(args.ce_tokens, args.dim, args.vocab, not args.no_compile)
        torch.cuda.empty_cache()
    print_table(rows)
    sweep = sweep_ce(args.ce_tokens, args.vocab) if args.sweep_ce else None
    fp8_sweep = sweep_fp8_head_ce(args.ce_tokens, args.dim, args.vocab) if args.sweep_fp8_ce else None

    result = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        sizes=dict(ce_tokens=args.ce_tokens, vocab=args.vocab, mlp_tokens=args.mlp_tokens, dim=args.dim,
                   hidden=args.hidden),
        results=rows, ce_sweep=sweep, fp8_ce_sweep=fp8_sweep,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
