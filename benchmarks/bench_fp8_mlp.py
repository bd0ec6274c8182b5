"""Benchmark the FP8 MLP (model.fp8_mlp, speedrun/kernels/fp8_mlp.py) against the fused bf16 MLP.

Owns the numbers behind `model.fp8_mlp` and the pinned tile config of the FP8 up-projection kernel
(fp8_mlp.FORWARD_CONFIG). At the record-89 micro-batch sizes (T = 16384 / 32768 / 49152 tokens of
rms-normed bf16 x, d = 768, H = 3072, fp32 master weights cast at use, as in the model) it times:
  * one MLP, forward and forward+backward, each inside torch.compile(fullgraph) as the model's
    compiled blocks run it:
      bf16 fused      the relu2_mlp op (model.fused_mlp, today's path)
      fp8             fp8_relu2_mlp: activation quantisation + the speedrun::fp8_relu2_mlp op
                      (Triton fp8 up projection with relu² / fp8 post / amax epilogue, _scaled_mm down)
                      + the delayed-scale bookkeeping; backward bf16
      fp8 cuBLAS-up   (forward only) the alternative design: _scaled_mm for the up projection too,
                      relu², the fp8 post and its amax as compiled torch (inductor) epilogue
    with 11 layers' worth per micro-batch (x 11) and per one-GPU optimizer step (x 88 = 11 x 8);
  * the weight refresh after an optimizer step, 11 layers (Triton kernels vs the twin);
  * the FP8 up-projection kernel alone over fp8_mlp.CONFIGS (--no-sweep skips).
Times are medians of triton.testing.do_bench; errors are against the eager bf16 twin (FP8's own
error, ~6% on out, is expected: tests/test_kernels_fp8_mlp.py).

    PYTHONPATH=$PWD python3 benchmarks/bench_fp8_mlp.py --out $OUT/bench_fp8_mlp.json
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

from speedrun.kernels import fp8_mlp as F8M  # noqa: E402
from speedrun.kernels import relu2_mlp as R  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import bench as _bench  # noqa: E402
from bench_kernels import rel_err  # noqa: E402

LAYERS, MICRO_STEPS = 11, 8
TOKENS = (16384, 32768, 49152)   # record 89's micro-batch per stage (131072 / 262144 / 393216 over 8)


def bench(fn: Callable[[], object], rep_ms: int = 300) -> tuple[float, float]:
    return _bench(fn, warmup_calls=3, rep_ms=rep_ms, warmup_ms=25)


def inputs(tokens: int, dim: int, hidden: int):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(tokens, dim, device="cuda", generator=gen), (dim,))
    x = x.bfloat16().requires_grad_()
    bound = 3**0.5 * 0.5 * dim**-0.5
    w_fc = ((torch.rand(dim, hidden, device="cuda", generator=gen) * 2 - 1) * bound).requires_grad_()
    w_proj = ((torch.rand(dim, hidden, device="cuda", generator=gen) * 2 - 1) * bound).requires_grad_()
    g = torch.randn(tokens, dim, device="cuda", generator=gen).bfloat16()
    return x, w_fc, w_proj, g


def new_state(w_fc, w_proj, x) -> F8M.FP8MLPState:
    state = F8M.FP8MLPState(w_fc.shape[0], w_fc.shape[1], MICRO_STEPS).cuda()
    state.reset(w_fc, w_proj)
    with torch.no_grad():   # a first forward in every slot: realistic delayed scales
        for _ in range(MICRO_STEPS):
            F8M.fp8_relu2_mlp(x, w_fc, w_proj, state, kernel="triton")
    return state


def cublas_up_forward(state: F8M.FP8MLPState):
    """The alternative up projection: cuBLAS fp8 matmul writing pre, then an inductor epilogue."""

    def forward(x, w_fc, w_proj):
        x8, s_x = F8M.quantize_activation(x)
        pre = torch._scaled_mm(x8, state.w_fc_f8.t(), scale_a=s_x.clone(), scale_b=state.w_fc_scale,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        post = torch.relu(pre).square()
        act = state.act_scales.index_select(0, state.slot)
        post8 = F8M.quantize_e4m3(post.float() * (1.0 / act))
        amax = post.amax().float()
        out = torch._scaled_mm(post8, state.w_proj_f8.t(), scale_a=act, scale_b=state.w_proj_scale,
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        state.record_post_amax(amax.view(1))
        return out
    return forward


def bench_mlp(tokens: int, dim: int, hidden: int) -> list[dict]:
    x, w_fc, w_proj, g = inputs(tokens, dim, hidden)
    leaves = (x, w_fc, w_proj)
    state = new_state(w_fc.detach(), w_proj.detach(), x.detach())
    kw = dict(fullgraph=True, dynamic=False)
    variants = {
        "bf16 fused": torch.compile(lambda a, b, c: R.relu2_mlp(a, b, c, kernel="triton"), **kw),
        "fp8": torch.compile(lambda a, b, c: F8M.fp8_relu2_mlp(a, b, c, state, kernel="triton"), **kw),
        "fp8 cuBLAS-up (fwd only)": torch.compile(cublas_up_forward(state), **kw),
    }
    ref_out = R.relu2_mlp_reference(*leaves)
    ref_grads = torch.autograd.grad(ref_out, leaves, g)
    flops_fwd = 2 * 2 * tokens * dim * hidden
    rows = []
    for name, fn in variants.items():
        start = time.perf_counter()
        forward_only = "fwd only" in name
        if forward_only:
            with torch.no_grad():
                out = fn(*leaves)
            err = rel_err(out, ref_out)
        else:
            out = fn(*leaves)
            grads = torch.autograd.grad(out, leaves, g)
            err = max(rel_err(a, b) for a, b in zip((out, *grads), (ref_out, *ref_grads)))
            del grads
        torch.cuda.synchronize()
        first_s = time.perf_counter() - start
        del out
        with torch.no_grad():
            fwd_ms, _ = bench(lambda: fn(*leaves))
        row = dict(variant=name, tokens=tokens, fwd_ms=fwd_ms, fwd_tflops=flops_fwd / fwd_ms / 1e9,
                   fwd_ms_11_layers=fwd_ms * LAYERS, rel_err_vs_bf16=err, first_call_s=first_s)
        if not forward_only:
            fb_ms, fb_mem = bench(lambda: torch.autograd.grad(fn(*leaves), leaves, g), rep_ms=500)
            row.update(fwd_bwd_ms=fb_ms, fwd_bwd_ms_11_layers=fb_ms * LAYERS,
                       fwd_bwd_ms_per_step=fb_ms * LAYERS * MICRO_STEPS, peak_gib=fb_mem)
        rows.append(row)
    bf16 = rows[0]
    for r in rows:
        r["fwd_speedup_vs_bf16"] = bf16["fwd_ms"] / r["fwd_ms"]
        if "fwd_bwd_ms" in r:
            r["fwd_bwd_speedup_vs_bf16"] = bf16["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            r["saved_ms_per_step"] = (bf16["fwd_bwd_ms"] - r["fwd_bwd_ms"]) * LAYERS * MICRO_STEPS
    return rows


def bench_refresh(dim: int, hidden: int) -> list[dict]:
    _, w_fc, w_proj, _ = inputs(16, dim, hidden)
    states = [F8M.FP8MLPState(dim, hidden, MICRO_STEPS).cuda() for _ in range(LAYERS)]
    rows = []
    for kernel in ("triton", "torch"):
        def refresh():
            for s in states:
                s.refresh(w_fc, w_proj, "delayed", kernel=kernel)
        ms, _ = bench(refresh, rep_ms=200)
        rows.append(dict(kernel=kernel, layers=LAYERS, ms=ms))
    return rows


def sweep(tokens: int, dim: int, hidden: int, deadline: float) -> list[dict]:
    x, w_fc, w_proj, _ = inputs(tokens, dim, hidden)
    state = new_state(w_fc.detach(), w_proj.detach(), x.detach())
    x8, s_x = F8M.quantize_activation(x.detach())
    args = (x8, s_x, state.w_fc_f8, state.w_fc_scale, state.act_scales, state.slot)
    ref = F8M.fp8_up_projection(*args)[0]
    flops = 2 * tokens * dim * hidden
    rows = []
    for cfg in F8M.CONFIGS:
        row = dict(tokens=tokens, config=str(cfg), default=cfg == F8M.FORWARD_CONFIG, smem_kib=cfg.smem_bytes(1) / 1024)
        if time.perf_counter() > deadline:
            rows.append({**row, "status": "skipped (--budget-s)"})
            continue
        try:
            err = rel_err(F8M.fp8_up_projection(*args, config=cfg)[0], ref)
            ms, _ = bench(lambda: F8M.fp8_up_projection(*args, config=cfg), rep_ms=100)
            row.update(status="ok", ms=ms, tflops=flops / ms / 1e9, rel_err=err)
        except Exception as exc:  # noqa: BLE001 - e.g. OutOfResources: report, keep sweeping
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        rows.append(row)
    # the same matmul in cuBLAS (writing bf16 pre only) and the bf16 fused kernel, for scale
    pre_ms, _ = bench(lambda: torch._scaled_mm(x8, state.w_fc_f8.t(), scale_a=s_x, scale_b=state.w_fc_scale,
                                               out_dtype=torch.bfloat16, use_fast_accum=True), rep_ms=100)
    xb, wb = x.detach(), w_fc.detach().bfloat16()
    bf16_ms, _ = bench(lambda: R.matmul_relu2(xb, wb), rep_ms=100)
    rows.append(dict(tokens=tokens, config="cuBLAS _scaled_mm (pre only, no epilogue)", status="ok", ms=pre_ms,
                     tflops=flops / pre_ms / 1e9))
    rows.append(dict(tokens=tokens, config="bf16 relu2 kernel (relu2_mlp.matmul_relu2)", status="ok", ms=bf16_ms,
                     tflops=flops / bf16_ms / 1e9))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_fp8_mlp.json", help="JSON results file")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--no-sweep", action="store_true", help="skip the up-projection tile sweep")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop sweeping after this many seconds")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not F8M.fp8_supported("cuda", 0):
        raise SystemExit("bench_fp8_mlp.py needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is for CPU tests, not for timing")
    import triton

    start = time.perf_counter()
    device = torch.cuda.get_device_name()
    print(f"{device}: x T x {args.dim} bf16, W 2 x {args.dim} x {args.hidden}; x{LAYERS} layers, "
          f"x{LAYERS * MICRO_STEPS} per one-GPU step")
    mlp_rows = []
    header = (f"{'T':>6} {'variant':<26}{'fwd ms':>8}{'fwd+bwd ms':>12}{'x11 fwd+bwd':>12}{'per step':>10}"
              f"{'speedup':>9}{'TFLOP/s fwd':>12}{'rel err':>9}")
    print(header)
    print("-" * len(header))
    for tokens in args.tokens:
        rows = bench_mlp(tokens, args.dim, args.hidden)
        mlp_rows += rows
        for r in rows:
            fb = f"{r['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r else "-"
            fb11 = f"{r['fwd_bwd_ms_11_layers']:.2f}" if "fwd_bwd_ms" in r else "-"
            step = f"{r['fwd_bwd_ms_per_step']:.1f}" if "fwd_bwd_ms" in r else "-"
            sp = r.get("fwd_bwd_speedup_vs_bf16", r["fwd_speedup_vs_bf16"])
            print(f"{tokens:>6} {r['variant']:<26}{r['fwd_ms']:>8.3f}{fb:>12}{fb11:>12}{step:>10}{sp:>9.2f}"
                  f"{r['fwd_tflops']:>12.0f}{r['rel_err_vs_bf16']:>9.3f}")
        torch.cuda.empty_cache()
    refresh_rows = bench_refresh(args.dim, args.hidden)
    for r in refresh_rows:
        print(f"weight refresh, {LAYERS} layers ({r['kernel']}): {r['ms']:.3f} ms per optimizer step")
    sweep_rows = []
    if not args.no_sweep:
        deadline = start + args.budget_s
        for tokens in args.tokens:
            sweep_rows += sweep(tokens, args.dim, args.hidden, deadline)
            torch.cuda.empty_cache()
        print(f"\n{'T':>6} {'up-projection config':<78}{'ms':>8}{'TFLOP/s':>9}  status")
        for r in sweep_rows:
            ms = f"{r['ms']:.3f}" if "ms" in r else "-"
            tf = f"{r['tflops']:.0f}" if "tflops" in r else "-"
            mark = " *" if r.get("default") else ""
            print(f"{r['tokens']:>6} {r['config'] + mark:<78}{ms:>8}{tf:>9}  {r['status']}")
    elapsed = time.perf_counter() - start
    result = dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=device,
        torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
        sizes=dict(tokens=args.tokens, dim=args.dim, hidden=args.hidden, layers=LAYERS, micro_steps=MICRO_STEPS),
        forward_config=str(F8M.FORWARD_CONFIG), mlp=mlp_rows, refresh=refresh_rows, sweep=sweep_rows,
        elapsed_s=elapsed)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"total {elapsed:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
