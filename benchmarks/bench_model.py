"""Model benchmark (CUDA): the record config in bf16 with regional compilation.

Reports the cold compile time (first forward+backward over every window stage), then for each
window stage (long = 3, 7, 11, 13 blocks; short = long // 2) the forward+backward time of one
262,144-token step (8 micro-batches of 32,768 tokens; no optimizer), tokens/s and peak memory.
Inputs are realistic: random token ids (never zeros) with a BOS every ~700 tokens at random.

    python benchmarks/bench_model.py --out bench_model.json
    python benchmarks/bench_model.py --backend sdpa --no-compile --steps 2   # the eager twin

Timings use CUDA events after warm-up. The inductor cache goes to a fresh temporary folder unless
--cache-dir is given, so the compile time printed is a cold one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--seq", type=int, default=32768, help="tokens per micro-batch")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per step")
    p.add_argument("--windows", default="3,7,11,13", help="long windows (blocks) to time")
    p.add_argument("--steps", type=int, default=5, help="timed steps per window")
    p.add_argument("--doc-len", type=int, default=700, help="mean document length (tokens)")
    p.add_argument("--backend", default="auto", help="attention backend: auto | flex | flash | sdpa")
    p.add_argument("--no-compile", action="store_true", help="run eager (flex still uses its kernel)")
    p.add_argument("--no-fp8", action="store_true", help="bf16 lm_head instead of FP8")
    p.add_argument("--eval", action="store_true", help="also time a 262,144-token eval forward (mean loss)")
    p.add_argument("--cache-dir", default="", help="inductor cache folder (default: fresh temp dir = cold)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test of this script: tiny model, eager, wall-clock timing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="inductor-cold-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache          # before torch compiles anything
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    sys.path.insert(0, ROOT)
    import torch

    from speedrun.config import ModelConfig, Window
    from speedrun.model import GPT

    if args.smoke:
        dev, dtype = torch.device("cpu"), torch.float32
        cfg = ModelConfig(vocab_size=1000, num_layers=4, model_dim=64, num_heads=2, head_dim=32,
                          no_attention_layers=[2], long_window_layers=[3], value_embed_layers=[0, -1, -1, 0],
                          skip_from_layer=0, skip_to_layer=2, backout_layer=2, block_size=16,
                          attention_backend="sdpa")
        args.seq, args.micro, args.steps, args.no_compile, args.doc_len = 256, 2, 1, True, 60
    else:
        if not torch.cuda.is_available():
            print("bench_model: needs a CUDA GPU (or --smoke)", file=sys.stderr)
            return 2
        dev, dtype = torch.device("cuda"), torch.bfloat16
        cfg = ModelConfig(attention_backend=args.backend, fp8_head=not args.no_fp8)
    torch.manual_seed(0)
    model = GPT(cfg, dtype).to(dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    model.train()
    with torch.no_grad():   # trained-like non-zero outputs (zero init would make the head trivial)
        for p in model.parameters():
            if p.label in ("lm_head", "mlp_proj", "attn_gate", "smear_gate"):
                p.normal_(0, 0.02)
            if p.label == "attn":
                p.view(4, cfg.model_dim, cfg.model_dim)[3].normal_(0, 0.02)
    windows = [int(w) for w in args.windows.split(",")]
    T, M = args.seq, args.micro
    vocab = cfg.vocab_size
    bos = vocab - 1         # 50256 for GPT-2

    # realistic micro-batches: random ids in [0, 50256) (never zeros-only), BOS at random gaps
    g = torch.Generator().manual_seed(1)
    batches = []
    max_docs = 128
    for _ in range(M):
        ids = torch.randint(1, vocab - 1, (T,), generator=g, dtype=torch.int32)
        gaps = (torch.empty(max_docs).exponential_(1 / args.doc_len, generator=g).long() + 1).clamp(max=2048)
        starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), gaps]), 0)
        starts = starts[starts < T][:max_docs - 1]
        ids[starts] = bos
        cu = torch.cat([starts, torch.full((max_docs - starts.numel(),), T)]).to(torch.int32)
        targets = torch.cat([ids[1:].long(), torch.tensor([bos])])
        batches.append((ids.to(dev), targets.to(dev), cu.to(dev)))

    def step() -> None:
        for ids, targets, cu in batches:
            (model(ids, targets, cu, reduction="sum") / M).backward()
        for p in model.parameters():
            p.grad = None

    def timed(fn, n: int) -> float:
        """Mean milliseconds per call: CUDA events on the GPU (peak memory counter reset first)."""
        sync()
        if dev.type != "cuda":
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t) * 1000 / n
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        sync()
        return start.elapsed_time(end) / n

    def peak_gib() -> float:
        return torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else 0.0

    # ---- cold compile: the first step at each window (YaRN updates between) ----
    if not args.no_compile:
        model.compile_regions()
    model.set_window(Window(max(1, windows[0] // 2), windows[0]))
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - t0
    for w in windows[1:]:
        model.set_window(Window(max(1, w // 2), w))
        step()
    sync()
    all_windows_s = time.perf_counter() - t0

    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]

    # ---- timed steps per window ----
    rows = []
    model.reset_window()
    model.set_window(Window(max(1, windows[0] // 2), windows[0]))
    for w in windows:
        model.set_window(Window(max(1, w // 2), w))
        step()                                  # warm-up at this window
        sync()
        ms = timed(step, args.steps)
        rows.append({"long_blocks": w, "short_blocks": max(1, w // 2), "ms_per_step": ms,
                     "tokens_per_s": T * M / (ms / 1000), "peak_mem_gib": peak_gib()})
    recompiled = counters["stats"]["unique_graphs"] - graphs

    eval_row = None
    if args.eval:
        model.eval()
        ids = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        cu = torch.cat([b[2][b[2] < T] + i * T for i, b in enumerate(batches)]
                       + [torch.tensor([T * M], dtype=torch.int32).to(dev)])
        model.set_window(Window(max(1, windows[-1] // 2), windows[-1]), update_yarn=False)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            model(ids, targets, cu, reduction="mean")
            sync()
            eval_compile_s = time.perf_counter() - t0
            eval_ms = timed(lambda: model(ids, targets, cu, reduction="mean"), 3)
        eval_row = {"tokens": T * M, "first_call_s": eval_compile_s, "ms": eval_ms,
                    "peak_mem_gib": peak_gib()}
        model.train()

    steady_first = rows[0]["ms_per_step"] / 1000
    result = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (smoke)", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "backend": args.backend,
        "compiled": not args.no_compile, "fp8_head": model.fp8_head_active(dev),
        "tokens_per_step": T * M, "micro_batch_tokens": T,
        "first_step_s": first_step_s, "cold_compile_s": first_step_s - steady_first,
        "first_steps_all_windows_s": all_windows_s, "graphs": graphs,
        "recompiles_after_warmup": recompiled, "windows": rows, "eval": eval_row,
        "params": model.num_params(),
    }
    print(f"{result['device']} | torch {result['torch']} | backend {args.backend} | "
          f"{'compiled regions' if result['compiled'] else 'eager'} | fp8 head {result['fp8_head']}")
    print(f"first step {first_step_s:.1f} s (cold compile ~{result['cold_compile_s']:.1f} s), "
          f"first steps over all windows {all_windows_s:.1f} s, {graphs} graphs, "
          f"{recompiled} recompiles after warm-up")
    print(f"{'window (long/short)':>20} {'ms / step':>14} {'tokens/s':>12} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['long_blocks']:>12}/{r['short_blocks']:<7} {r['ms_per_step']:>14.1f} "
              f"{r['tokens_per_s']:>12,.0f} {r['peak_mem_gib']:>9.1f}")
    if eval_row:
        print(f"eval forward {eval_row['tokens']:,} tokens: {eval_row['ms']:.1f} ms "
              f"(first call {eval_row['first_call_s']:.1f} s)")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
