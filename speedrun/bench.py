"""``speedrun bench``: measure a recipe's training step on this machine.

For each stage of the schedule (its batch and attention windows; record 45's shorthand: one per
window stage) it runs a short timed window of real optimizer steps (synthetic documents unless
``--data-path`` is given) and prints one table: batch, ms/step, tokens/s, MFU, peak memory, and the
split of a step into forward / backward / optimizer / data wait (with record 89's DC-MHA on, also
DC's own forward+backward per step, timed alone: ``dc_step_ms``). The schedule-weighted tokens/s is
the whole schedule's tokens over its time: each stage's steps times its batch, over its steps times
its ms/step. It also reports
the cold start (process start to first timed step, empty compile cache) and, with ``--warm-start``,
the start of a second process that finds the compile cache on disk. ``--profile`` writes a torch
profiler trace and a CUDA memory snapshot into the run directory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from speedrun.utils import HelpFormatter

PROCESS_START = time.perf_counter()


def register(subparsers) -> None:
    from speedrun.train.cli import add_train_arguments
    p = subparsers.add_parser(
        "bench", help="time the training step of a recipe at every stage",
        description="Time a recipe's training step at every stage of its schedule (its batch and "
                    "attention windows) "
                    "(ms/step, tokens/s, MFU, memory, the forward / backward / optimizer split) and its "
                    "start-up. Any config field can be overridden with a dotted flag, as for train.",
        formatter_class=HelpFormatter)
    add_train_arguments(p, bench=True)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per stage")
    p.add_argument("--skip-steps", type=int, default=2, help="untimed steps per stage before timing")
    p.add_argument("--profile", action="store_true",
                   help="write a torch profiler trace (trace.json) and a CUDA memory snapshot "
                        "(memory_snapshot.pickle, open in pytorch.org/memory_viz) into the run directory")
    p.add_argument("--warm-start", action="store_true",
                   help="afterwards, time the start of a second process that reuses the compile cache")
    p.add_argument("--cache-dir", help="inductor compile cache (default: a fresh one, so the start is cold)")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument("--start-only", action="store_true", help=argparse.SUPPRESS)  # used by --warm-start
    p.set_defaults(func=run_bench, accepts_overrides=True)


def synthetic_shards(directory: str, num_tokens: int, vocab: int, bos_id: int, seed: int = 0,
                     num_val_tokens: int | None = None) -> tuple[str, str]:
    """Random documents (Zipf-like token ids, geometric lengths, mean ~800 tokens) as train/val shards.
    Never zeros: timing on constant data can flatter the kernels."""
    import numpy as np

    from speedrun.data.shards import write_shard
    num_val = num_val_tokens or num_tokens // 4
    num_tokens += num_val  # the val shard is a separate stretch of the same stream
    rng = np.random.default_rng(seed)
    tokens = np.minimum(rng.zipf(1.2, size=num_tokens), vocab - 1).astype(np.int64)
    tokens = (tokens * 7919) % (bos_id - 1) + 1 if bos_id < vocab else tokens
    doc_starts = np.cumsum(rng.geometric(1 / 800, size=num_tokens // 200))
    tokens[doc_starts[doc_starts < num_tokens]] = bos_id
    tokens[0] = bos_id
    train = os.path.join(directory, "synthetic_train_000001.bin")
    val = os.path.join(directory, "synthetic_val_000000.bin")
    tokens[num_val] = bos_id
    write_shard(train, tokens[num_val:].astype(np.uint16))
    write_shard(val, tokens[:num_val].astype(np.uint16))
    return train, val


def bench_config(args):
    """The recipe to time: --config, else the record on a GPU and the tiny recipe on a CPU (the record
    needs about 24 GiB for one micro-batch and hours there); ``args.config`` is set to the choice."""
    from speedrun.config import ConfigError
    from speedrun.train.cli import build_config
    from speedrun.train.trainer import resolve_device
    if args.steps < 1 or args.skip_steps < 0:
        raise ConfigError(f"--steps {args.steps} --skip-steps {args.skip_steps}: expected --steps >= 1 "
                          f"and --skip-steps >= 0")
    explicit = args.config is not None
    args.config = args.config or "record_124m"
    cfg = build_config(args)
    if not explicit and resolve_device(cfg) == "cpu":
        args.config = "tiny"
        cfg = build_config(args)
        print("no GPU in use: timing the tiny recipe (pass --config record_124m to time the record on "
              "the CPU anyway; it needs about 24 GiB of memory)", file=sys.stderr)
    return cfg


def run_bench(args) -> int:
    import torch
    import_s = time.perf_counter() - PROCESS_START
    cfg = bench_config(args)
    if cfg.train.memory_pool:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cache = args.cache_dir or tempfile.mkdtemp(prefix="speedrun-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    # FlashAttention-4's JIT cache lives with inductor's: a fresh one is a cold start for it too
    os.environ["FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"] = os.path.join(cache, "flash_attn_cute")
    run_dir = cfg.train.save_path or tempfile.mkdtemp(prefix="speedrun-bench-")
    os.makedirs(run_dir, exist_ok=True)
    data_s = 0.0  # making synthetic shards is the bench's own work, not part of a start
    from speedrun.optim.schedules import batch_shape, stage_spans
    spans = [span for span in stage_spans(cfg.schedule) if span.end > span.start]
    if not cfg.data.train_path:
        t_data = time.perf_counter()
        # every stage's timed, untimed, split and profiled steps, the warm-up's and the first step
        per_stage = args.steps + args.skip_steps + 5 + 2
        n = sum(batch_shape(span.start, cfg).tokens_per_step * (per_stage + 2) for span in spans) \
            + 16 * batch_shape(0, cfg).tokens_per_step
        cfg.data.train_path, cfg.data.val_path = synthetic_shards(
            run_dir, int(n * 1.1), cfg.model.padded_vocab_size, cfg.data.bos_id,
            num_val_tokens=cfg.train.val_tokens + cfg.train.val_sequence_tokens)
        data_s = time.perf_counter() - t_data
    cfg.data.wrap = True

    from speedrun.distributed import init_world
    from speedrun.train.trainer import Trainer, resolve_device
    t_setup = time.perf_counter()
    world = init_world(resolve_device(cfg), cfg.train.collective_timeout_s)
    trainer = Trainer(cfg, world, run_dir)
    setup_s = time.perf_counter() - t_setup  # process group, model, optimizers, loader
    device = trainer.device
    warmup_s = trainer.warmup()
    from torch._dynamo.utils import counters
    graphs_after_warmup = counters["stats"]["unique_graphs"]
    batches = trainer.next_batches(0)
    trainer.apply_window(0)
    trainer.train_step(0, batches)
    _sync(device)
    start = {"start_to_first_step_s": time.perf_counter() - PROCESS_START - data_s,
             "compile_warmup_s": warmup_s, "import_s": import_s, "setup_s": setup_s,
             "setup_phases_s": trainer.setup_phases, "warmup_phases_s": trainer.warmup_phases,
             "warmup_helper": trainer.warmup_helper, "compile_cache": _cache_counters()}
    if args.start_only:
        print(json.dumps(start))
        return 0
    start["cold_start_to_first_step_s"] = start.pop("start_to_first_step_s")

    rows = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for span in spans:
        first, shape = span.start, batch_shape(span.start, cfg)
        trainer.apply_window(first)
        # every step of a row takes the stage's batch (next_batches(first)), also where the row runs
        # past the stage's last step: the row times that stage
        for k in range(args.skip_steps):
            trainer.train_step(first + k, trainer.next_batches(first))
        # ms/step from free-running steps (no syncs inside, as in training) ...
        _sync(device)
        t0 = time.perf_counter()
        for k in range(args.steps):
            step = first + args.skip_steps + k
            batches = trainer.next_batches(first)
            loss = trainer.train_step(step, batches)
        _sync(device)
        ms = 1e3 * (time.perf_counter() - t0) / args.steps
        # the last timed step's training loss (read after the timing): same seed and data give the
        # same losses whichever kernels run, so two benches of one config check each other
        train_loss = float(loss)
        # ... then the phase split from a few more steps with a sync after each phase
        split = {"data": 0.0, "forward": 0.0, "backward": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
        split_steps = max(1, min(3, args.steps))
        for k in range(split_steps):
            _timed_step(trainer, first + args.skip_steps + args.steps + k, first, split)
        tokens_per_s = shape.tokens_per_step / (ms / 1e3)
        dc = dc_step_ms(trainer, batches[0])   # the documents of the last timed step
        rows.append({"stage": span.index, "first_step": first, "steps": span.end - span.start,
                     "tokens_per_step": shape.tokens_per_step, "micro_batch_tokens": shape.micro_batch_tokens,
                     "grad_accum": trainer.grad_accum, "max_doc_len": shape.max_doc_len,
                     "window_long": trainer.window.long, "window_short": trainer.window.short,
                     "ms_per_step": ms, "tokens_per_s": tokens_per_s, "mfu": trainer.mfu(tokens_per_s),
                     "train_loss": train_loss, **({"dc_ms": dc} if dc is not None else {}),
                     **{f"{k}_ms": v / split_steps for k, v in split.items()}})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    # reserved counts the CUDA graph's private pool and the allocator's cache too
    peak_reserved = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    mean_tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
    result = {"config": args.config, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "world_size": world.world_size, "grad_accum": rows[0]["grad_accum"],
              "tokens_per_step": rows[0]["tokens_per_step"], "stages": rows,
              "schedule_avg_tokens_per_s": schedule_tokens_per_s(rows),
              "mean_stage_tokens_per_s": mean_tps, "peak_memory_gib": peak, "peak_reserved_gib": peak_reserved,
              "cuda_graphs": trainer.micro_graph is not None, "attention": _attention_name(trainer.model, device),
              **start,
              # graphs compiled after the warm-up (0 = the warm-up covered every stage)
              "graphs_compiled_after_warmup": counters["stats"]["unique_graphs"] - graphs_after_warmup,
              "torch": torch.__version__}
    if args.profile:
        result.update(_profile(trainer, spans[-1].start + args.skip_steps + args.steps, spans[-1].start,
                               run_dir))
    try:  # where the compile time went (dynamo tracing, AOT autograd, inductor), per phase
        from torch._dynamo.utils import compile_times
        result["compile_times"] = compile_times(repr="str", aggregate=True)
    except Exception:  # private API: its shape changes between releases
        pass
    if args.warm_start:
        # give the GPU and the compile workers back first: the second process starts like a restart
        trainer.close()
        del trainer
        import gc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["warm_start"] = _warm_start(args, cache)
        result["warm_start_to_first_step_s"] = result["warm_start"]["start_to_first_step_s"]
    if world.is_main:
        _print_table(result)
        if args.out:
            from speedrun.utils import atomic_write_text
            atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


def _attention_name(model, device) -> str:
    """The attention backend that ran ("flex", "sdpa", "flash (fa4)"...)."""
    from speedrun.model.flash import flash_attn_impl
    backend = model.attention_backend(device)
    return f"flash ({flash_attn_impl()})" if backend == "flash" else backend


def dc_step_ms(trainer, batch, repeats: int | None = None) -> float | None:
    """DC-MHA's forward+backward per optimizer step at this run's shapes (None without DC layers):
    the op timed alone on random q, k, v, y, weights and ``batch``'s documents, with the kernel
    the model uses (model.fused_dc), times the DC layers and the micro-steps per step. Measured in
    isolation, so it is DC's share of the fwd + bwd columns as far as it runs apart from the rest
    (in the compiled model it is an opaque custom op: nothing fuses into it)."""
    import torch

    from speedrun.kernels.dc_mha import dc_mha
    from speedrun.model.attention import build_doc_info
    cfg, device = trainer.cfg.model, trainer.device
    if not cfg.dc_layers:
        return None
    T, H, D, dtype = batch.inputs.numel(), cfg.num_heads, cfg.head_dim, trainer.model.dtype
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, y, g = (torch.randn(T, H, D, device=device, generator=gen).to(dtype) for _ in range(5))
    q = (q * 0.1).requires_grad_()
    w1, w2 = (torch.randn(T, H, device=device, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    k, v, y = (t.requires_grad_() for t in (k, v, y))
    doc_ids = build_doc_info(batch.cu_seqlens, T, device, "sdpa").doc_ids
    kernel = "auto" if cfg.fused_dc else "torch"

    def once():
        out = dc_mha(y, q, k, v, w1, w2, doc_ids, cfg.dc_window, kernel=kernel)
        torch.autograd.grad(out, (y, q, k, v, w1, w2), g)

    once()   # compiles / warms the kernels
    repeats = repeats or (10 if device.type == "cuda" else 2)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(device)
    per_call = 1e3 * (time.perf_counter() - t0) / repeats
    return per_call * len(cfg.dc_layers) * trainer.grad_accum


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def schedule_tokens_per_s(rows: list[dict]) -> float:
    """The whole schedule's throughput from the per-stage rows: its tokens (each stage's steps times
    its batch) over its time (each stage's steps times its ms/step)."""
    tokens = sum(r["steps"] * r["tokens_per_step"] for r in rows)
    seconds = sum(r["steps"] * r["ms_per_step"] / 1e3 for r in rows)
    return tokens / seconds


def _timed_step(trainer, step: int, batch_step: int, split: dict) -> None:
    """The trainer's own step with the phases timed by host clock around device syncs.

    Syncing between phases costs a little throughput, so these steps only give the split; ms/step
    comes from free-running steps (the trainer never syncs inside a step).
    """
    last = time.perf_counter()

    def mark(phase: str) -> None:
        nonlocal last
        _sync(trainer.device)
        now = time.perf_counter()
        split[phase] += 1e3 * (now - last)
        last = now

    batches = trainer.next_batches(batch_step)
    mark("data")
    trainer.train_step(step, batches, mark=mark)


def _profile(trainer, step: int, batch_step: int, run_dir: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    out = {}
    if trainer.device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200000)
    with profile(activities=activities) as prof:
        for k in range(2):
            trainer.train_step(step + k, trainer.next_batches(batch_step))
        _sync(trainer.device)
    trace = os.path.join(run_dir, "trace.json")
    prof.export_chrome_trace(trace)
    out["profile_trace"] = trace
    # the kernels that eat the time, readable without a trace viewer
    sort_key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=80, max_name_column_width=90)
    top = os.path.join(run_dir, "profile_top.txt")
    with open(top, "w") as f:
        f.write(table)
    out["profile_top"] = top
    if trainer.device.type == "cuda":
        out.update(idle_gaps(_device_intervals(prof), steps=2))
        snap = os.path.join(run_dir, "memory_snapshot.pickle")
        torch.cuda.memory._dump_snapshot(snap)
        torch.cuda.memory._record_memory_history(enabled=None)
        out["memory_snapshot"] = snap
    return out


def _cache_counters() -> dict:
    """Inductor / AOTAutograd compile-cache hits and misses of this process (a warm start should
    show hits only)."""
    from torch._dynamo.utils import counters
    return {f"{group}.{k}": v for group in ("inductor", "aot_autograd") for k, v in counters[group].items()
            if "cache" in k or "bypass" in k}


def _device_intervals(prof) -> list[tuple[int, int, str]]:
    """(start, end, name) of every GPU kernel / copy / memset in the profile, in start order (us)."""
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                  if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA"
                  and e.time_range.end > e.time_range.start)


def idle_gaps(spans: list[tuple[int, int, str]], steps: int, top: int = 8,
              min_gap_us: float = 5.0) -> dict:
    """Where the GPU waits for the host: the union of the device intervals gives the busy time per
    step; every hole of at least ``min_gap_us`` between them is an idle gap, grouped by the kernels on
    either side ("after -> before") so that the biggest waits name their place in the step."""
    if not spans:
        return {}
    busy, idle, groups = 0.0, 0.0, {}
    cur_s, cur_e, cur_name = spans[0]
    for s, e, name in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gap = s - cur_e
            if gap >= min_gap_us:
                idle += gap
                key = f"{cur_name[:60]} -> {name[:60]}"
                total, count = groups.get(key, (0.0, 0))
                groups[key] = (total + gap, count + 1)
            cur_s, cur_e, cur_name = s, e, name
        elif e >= cur_e:
            cur_e, cur_name = e, name
    busy += cur_e - cur_s
    span = spans[-1][1] - spans[0][0]
    worst = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_busy_fraction": busy / span,
            "gpu_busy_ms_per_step": busy / 1e3 / steps,
            "gpu_idle_ms_per_step": idle / 1e3 / steps,
            "gpu_idle_gaps": [{"where": k, "ms_per_step": t / 1e3 / steps, "count_per_step": n / steps}
                              for k, (t, n) in worst]}


def _warm_start(args, cache: str) -> dict:
    """Start a second process on the same compile cache; its start figures (start_to_first_step_s,
    import, setup and warm-up phases) as a dict."""
    argv = [a for a in args._argv if a not in ("--warm-start", "--profile")]
    if "--cache-dir" not in argv:
        argv += ["--cache-dir", cache]
    argv += ["--start-only"]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "speedrun", *argv], capture_output=True, text=True,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
    if proc.returncode != 0:
        raise RuntimeError(f"warm-start run failed:\n{proc.stderr[-2000:]}")
    detail = json.loads(proc.stdout.strip().splitlines()[-1])
    detail["wall_s"] = time.perf_counter() - t
    return detail


def _print_table(r: dict) -> None:
    batches = {s["tokens_per_step"] for s in r["stages"]}
    batch = f"{r['tokens_per_step']} tokens/step" if len(batches) == 1 else "batch by stage"
    print(f"\n{r['config']} on {r['device']} x{r['world_size']} (grad_accum {r['grad_accum']}), "
          f"{batch}, torch {r['torch']}")
    dc = any("dc_ms" in s for s in r["stages"])
    head = (f"{'stage':>5} {'steps':>6} {'batch':>8} {'window':>8} {'ms/step':>9} {'tok/s':>10} {'MFU':>6} "
            f"{'data':>7} {'fwd':>7} {'bwd':>7} {'optim':>7} {'loss':>7}" + (f" {'dc':>7}" if dc else ""))
    print(head)
    for s in r["stages"]:
        mfu = f"{100 * s['mfu']:.1f}%" if s["mfu"] is not None else "-"
        # a CUDA-graph replay is forward and backward at once: shown in the bwd column, fwd "-"
        fwd = f"{s['forward_ms']:7.1f}" if s.get("forward_backward_ms", 0) == 0 else f"{'-':>7}"
        bwd = s["backward_ms"] + s.get("forward_backward_ms", 0)
        print(f"{s['stage']:>5} {s['steps']:>6} {s['tokens_per_step']:>8} "
              f"{s['window_short']:>3}/{s['window_long']:<4} {s['ms_per_step']:9.1f} {s['tokens_per_s'] / 1e3:9.1f}k "
              f"{mfu:>6} {s['data_ms']:7.1f} {fwd} {bwd:7.1f} {s['optimizer_ms']:7.1f} {s['train_loss']:7.4f}"
              + (f" {s['dc_ms']:7.2f}" if dc else ""))
    if dc:
        print("dc: DC-MHA forward+backward per step (all DC layers and micro-steps), timed alone at this "
              "run's shapes; part of fwd + bwd")
    if r["peak_memory_gib"] is None:
        memory = "peak memory - GiB"
    elif r.get("cuda_graphs"):
        # the graph's private pool holds a micro-step's activations all run long but counts as
        # allocated only while it is recorded: the reserved peak is the memory the run uses
        memory = (f"peak memory {r['peak_reserved_gib']:.2f} GiB reserved incl. the CUDA-graph pool "
                  f"({r['peak_memory_gib']:.2f} GiB allocated outside it)")
    else:
        memory = f"peak memory {r['peak_memory_gib']:.2f} GiB"
    print(f"schedule-weighted: {r['schedule_avg_tokens_per_s'] / 1e3:.1f}k tok/s | {memory} | "
          f"compile+warm-up {r['compile_warmup_s']:.1f} s | cold start to first step {r['cold_start_to_first_step_s']:.1f} s"
          + (f" | warm start {r['warm_start_to_first_step_s']:.1f} s" if "warm_start_to_first_step_s" in r else ""))
    extra = [f"attention {r['attention']}", f"graphs compiled after warm-up: {r['graphs_compiled_after_warmup']}",
             f"CUDA-graph micro-steps {'on' if r.get('cuda_graphs') else 'off'}"]
    if r.get("peak_reserved_gib") is not None and not r.get("cuda_graphs"):
        extra.append(f"peak reserved {r['peak_reserved_gib']:.2f} GiB")
    if r.get("gpu_busy_fraction") is not None:
        extra.append(f"GPU busy {100 * r['gpu_busy_fraction']:.1f}% of the profiled steps "
                     f"({r['gpu_busy_ms_per_step']:.1f} ms busy, {r['gpu_idle_ms_per_step']:.1f} ms idle per step)")
    print(" | ".join(extra))
    for g in r.get("gpu_idle_gaps", []):
        print(f"  idle {g['ms_per_step']:6.2f} ms/step ({g['count_per_step']:.0f}x) {g['where']}")
