"""Benchmark the fused ReLU² MLP (speedrun::relu2_mlp) against its twin, and sweep the kernels' tiles.

Owns the numbers behind `model.fused_mlp` and behind the pinned tile configs of
speedrun/kernels/relu2_mlp.py (FORWARD_CONFIG, BACKWARD_CONFIG). At the record's sizes (x 32768 x 768
bf16, W_fc and W_proj 768 x 3072 fp32 master weights cast at use, as in the model) it times:
  * the whole MLP, forward and forward+backward: the fused op (eager and inside torch.compile, as the
    model's compiled blocks run it), the twin compiled, the twin eager; with the cost per optimizer
    step (x 88 = 11 MLPs x 8 micro-batches), TFLOP/s, peak memory and the error against the eager twin;
  * each fused kernel alone (forward relu(x W_fc)², backward (d out W_proj) 2 sqrt(h)) over every tile
    config in relu2_mlp.CONFIGS, then Triton's autotuner over the same configs, and prints the config
    it picked as a line to paste into relu2_mlp.py.
Times are medians of triton.testing.do_bench after a warm-up (compilation, autotuning). About a minute
on an H100; --budget-s stops the sweep early rather than overrun.

    python benchmarks/bench_mlp.py --out bench_mlp.json [--no-compile] [--no-sweep] [--tokens 32768]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedrun.kernels import relu2_mlp as R  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import bench as _bench  # noqa: E402  (the kernel benchmarks' timing)
from bench_kernels import rel_err

CALLS_PER_STEP = 11 * 8  # MLPs x micro-batches of one optimizer step (record, one GPU)


def bench(fn: Callable[[], object], rep_ms: int, warmup_calls: int = 2) -> tuple[float, float]:
    """Shorter repetitions than the kernel benchmarks (bench_mlp.py keeps under ~90 s)."""
    return _bench(fn, warmup_calls=warmup_calls, rep_ms=rep_ms, warmup_ms=25)


def inputs(tokens: int, dim: int, hidden: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16().requires_grad_()
    bound = 3**0.5 * 0.5 * dim**-0.5  # the record's c_fc init for both (its c_proj starts at zero)
    w_fc = ((torch.rand(dim, hidden, device="cuda", generator=gen) * 2 - 1) * bound).requires_grad_()
    w_proj = ((torch.rand(dim, hidden, device="cuda", generator=gen) * 2 - 1) * bound).requires_grad_()
    g = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16()
    return x, w_fc, w_proj, g


# ------------------------------------------------------------------------------------------------
# The whole MLP
# ------------------------------------------------------------------------------------------------
def bench_mlp(tokens: int, dim: int, hidden: int, compile_variants: bool) -> list[dict]:
    x, w_fc, w_proj, g = inputs(tokens, dim, hidden)
    leaves = (x, w_fc, w_proj)

    def fused(xx, ff, pp):
        return R.relu2_mlp(xx, ff, pp, kernel="triton")

    variants: dict[str, Callable] = {"fused op": fused}
    if compile_variants:
        variants["fused op (torch.compile)"] = torch.compile(fused, fullgraph=True, dynamic=False)
        variants["twin (torch.compile)"] = torch.compile(R.relu2_mlp_reference, fullgraph=True, dynamic=False)
    variants["twin (eager)"] = R.relu2_mlp_reference

    ref_out = R.relu2_mlp_reference(*leaves)
    ref_grads = torch.autograd.grad(ref_out, leaves, g)

    flops_fwd = 2 * 2 * tokens * dim * hidden  # two matmuls
    flops_fwd_bwd = 3 * flops_fwd  # + d h (or d pre), d x, d W_fc, d W_proj
    rows = []
    for name, fn in variants.items():
        start = time.perf_counter()
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, g)
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start  # first call: compile + launch
        err = max(rel_err(a, b) for a, b in zip((out, *grads), (ref_out, *ref_grads)))
        del out, grads
        with torch.no_grad():
            fwd_ms, _ = bench(lambda: fn(*leaves), rep_ms=300)
        fb_ms, fb_mem = bench(lambda: torch.autograd.grad(fn(*leaves), leaves, g), rep_ms=500)
        rows.append(dict(variant=name, fwd_ms=fwd_ms, fwd_bwd_ms=fb_ms, step_ms=fb_ms * CALLS_PER_STEP,
                         fwd_tflops=flops_fwd / fwd_ms / 1e9, fwd_bwd_tflops=flops_fwd_bwd / fb_ms / 1e9,
                         peak_gib=fb_mem, rel_err=err, first_call_s=first_s))
    return rows


def print_mlp_table(rows: list[dict]) -> None:
    eager = next(r for r in rows if r["variant"] == "twin (eager)")
    compiled = next((r for r in rows if r["variant"] == "twin (torch.compile)"), None)
    header = (f"{'MLP variant':<26}{'fwd ms':>9}{'fwd+bwd ms':>12}{'per step ms':>13}{'x eager':>9}"
              f"{'x compiled':>11}{'TFLOP/s':>9}{'peak GiB':>10}{'rel err':>10}{'1st call s':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        r["speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        r["speedup_vs_compiled"] = compiled["fwd_bwd_ms"] / r["fwd_bwd_ms"] if compiled else None
        sp_c = f"{r['speedup_vs_compiled']:.2f}" if compiled else "-"
        print(f"{r['variant']:<26}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>12.3f}{r['step_ms']:>13.1f}"
              f"{r['speedup_vs_eager']:>9.2f}{sp_c:>11}{r['fwd_bwd_tflops']:>9.0f}{r['peak_gib']:>10.2f}"
              f"{r['rel_err']:>10.2e}{r['first_call_s']:>12.2f}")
    print(f"(per step = fwd+bwd x {CALLS_PER_STEP}: 11 MLPs x 8 micro-batches; rel err = max over out, dx, "
          "dW_fc, dW_proj vs the eager twin)")


# ------------------------------------------------------------------------------------------------
# Tile sweep of each kernel + Triton's autotuner
# ------------------------------------------------------------------------------------------------
def sweep(tokens: int, dim: int, hidden: int, deadline: float) -> tuple[list[dict], dict]:
    x, w_fc, w_proj, g = inputs(tokens, dim, hidden)
    x, w_fc, w_proj = x.detach(), w_fc.detach().bfloat16(), w_proj.detach().bfloat16()
    h = R.matmul_relu2(x, w_fc)  # the default config's outputs are the reference of the error column
    kernels = {
        "forward relu2": (lambda cfg, tune=None: R.matmul_relu2(x, w_fc, config=cfg, autotune=tune), h),
        "backward grad": (lambda cfg, tune=None: R.matmul_relu2_grad(g, w_proj, h, config=cfg, autotune=tune),
                          R.matmul_relu2_grad(g, w_proj, h)),
    }
    defaults = {"forward relu2": R.FORWARD_CONFIG, "backward grad": R.BACKWARD_CONFIG}
    flops = 2 * tokens * dim * hidden
    rows = []
    for kernel, (launch, ref) in kernels.items():
        for cfg in R.CONFIGS:
            row = dict(kernel=kernel, config=str(cfg), default=cfg == defaults[kernel],
                       smem_kib=cfg.smem_bytes() / 1024)
            if time.perf_counter() > deadline:
                row["status"] = "skipped (--budget-s)"
                rows.append(row)
                continue
            try:
                err = rel_err(launch(cfg), ref)
                ms, _ = bench(lambda: launch(cfg), rep_ms=100, warmup_calls=1)
                row.update(status="ok", ms=ms, tflops=flops / ms / 1e9, rel_err=err)
            except Exception as exc:  # noqa: BLE001 - e.g. triton OutOfResources: report, keep sweeping
                row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            rows.append(row)
    # Triton's autotuner over the same configs (compiled kernels are cached from the sweep above).
    picks = {}
    tuners = {"forward relu2": R._linear_relu_square_autotuned, "backward grad": R._relu2_grad_autotuned}
    for kernel, (launch, _) in kernels.items():
        if time.perf_counter() > deadline:
            picks[kernel] = None
            continue
        launch(None, True)
        best = tuners[kernel].best_config
        picks[kernel] = R.TileConfig(best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.kwargs["BLOCK_K"],
                                     best.kwargs["GROUP_M"], num_warps=best.num_warps, num_stages=best.num_stages)
    return rows, picks


def print_sweep(rows: list[dict], picks: dict) -> None:
    header = f"{'kernel':<16}{'config':<78}{'ms':>8}{'TFLOP/s':>9}{'smem KiB':>10}{'rel err':>10}  status"
    print(header)
    print("-" * len(header))
    for r in rows:
        mark = " *" if r["default"] else ""
        ms = f"{r['ms']:.3f}" if "ms" in r else "-"
        tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "-"
        print(f"{r['kernel']:<16}{r['config'] + mark:<78}{ms:>8}{tf:>9}{r['smem_kib']:>10.0f}{err:>10}  {r['status']}")
    print("(* = the pinned default; rel err vs the default config's output)")
    names = {"forward relu2": "FORWARD_CONFIG", "backward grad": "BACKWARD_CONFIG"}
    for kernel, cfg in picks.items():
        if cfg is None:
            print(f"autotune {kernel}: skipped (--budget-s)")
            continue
        c = cfg
        print(f"autotune picked for {kernel}: {c}")
        print(f"    pin: {names[kernel]} = TileConfig({c.block_m}, {c.block_n}, {c.block_k}, {c.group_m}, "
              f"num_warps={c.num_warps}, num_stages={c.num_stages})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_mlp.json", help="JSON results file")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep and the autotuner")
    parser.add_argument("--budget-s", type=float, default=70.0,
                        help="stop sweeping (remaining configs reported as skipped) after this many seconds")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        raise SystemExit("bench_mlp.py needs a CUDA GPU (the fused MLP is CUDA-only)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is for CPU tests, not for timing")
    if not R.HAS_TRITON:
        raise SystemExit("bench_mlp.py needs the triton package")
    import triton

    start = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}  x {args.tokens} x {args.dim} bf16, W 2 x {args.dim} x {args.hidden}")
    rows = bench_mlp(args.tokens, args.dim, args.hidden, not args.no_compile)
    print_mlp_table(rows)
    torch.cuda.empty_cache()
    sweep_rows, picks = [], {}
    if not args.no_sweep:
        print()
        sweep_rows, picks = sweep(args.tokens, args.dim, args.hidden, start + args.budget_s)
        print_sweep(sweep_rows, picks)
    elapsed = time.perf_counter() - start
    print(f"total {elapsed:.1f} s")

    result = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(),
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        sizes=dict(tokens=args.tokens, dim=args.dim, hidden=args.hidden, calls_per_step=CALLS_PER_STEP),
        defaults=dict(forward=str(R.FORWARD_CONFIG), backward=str(R.BACKWARD_CONFIG)),
        mlp=rows, sweep=sweep_rows,
        autotune_picks={k: (str(v) if v is not None else None) for k, v in picks.items()},
        elapsed_s=elapsed,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
