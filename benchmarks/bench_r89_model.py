"""Record 89's embedding / residual-stream switches (issue 16) on one GPU: ms/step of the compiled
record-89-shaped model with the switches on against the same recipe with them off (record 45's
model), measured in one process on the same GPU, and the graphs compiled after the warm-up (0 =
no recompiles across window stages, the untie of the embedding, or the extension stage).

Each variant trains ``--steps`` optimizer steps (262,144 tokens each: 8 micro-batches of 32,768 on
one GPU, synthetic documents) through the trainer (regional compilation, its warm-up, CUDA graphs
where the trainer takes them, the real optimizers) on a schedule compressed to those steps, so the
run crosses every window stage, the extension stage and, with the switches on, the untie (at the
first odd step past the middle). Attention is record 45's for both (issue 17 brings record 89's).

    PYTHONPATH=$PWD python3 benchmarks/bench_r89_model.py --out $OUT/bench_r89_model.json
    PYTHONPATH=$PWD python3 benchmarks/bench_r89_model.py --smoke --out /tmp/x.json   # CPU check

Needs torch with CUDA and Triton, no network. Exit status 1 if a variant compiled a graph after its
warm-up. ``--smoke``: a tiny model on the CPU, compiled with dynamo's eager backend (graph counting
is backend-independent), a few steps: checks this script's logic, times nothing meaningful.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps per variant")
    p.add_argument("--variants", default="on,off", help="which variants to run, in order")
    p.add_argument("--cache-dir", default="", help="inductor cache folder (default: a fresh one)")
    p.add_argument("--smoke", action="store_true", help="CPU check of this script with a tiny model")
    return p.parse_args(argv)


def variant_config(name: str, steps: int, smoke: bool):
    """The Config of variant "on" (record 89's switches) or "off" (record 45), on a schedule
    compressed to ``steps`` steps."""
    from speedrun.config import Config, ModelConfig, OptimConfig
    from speedrun.presets import record89_model, record89_optim
    cfg = Config()
    untie = steps // 2 | 1                      # an odd step (an Adam step) past the middle
    if smoke:
        tiny = dict(vocab_size=512, num_layers=6, model_dim=64, num_heads=2, head_dim=32,
                    no_attention_layers=[3], long_window_layers=[2, 5], skip_from_layer=1, skip_to_layer=3,
                    backout_layer=2, block_size=16, rope_max_positions=4096, attention_backend="sdpa")
        r89 = dict(value_embed_layers=[-1, 0, 1, -1, 2, 3], attn_input_layer=4, mudd_layer=5,
                   mudd_value_sources=[-1, 2, 4], mudd_residual_sources=[-1, 2], mudd_final_sources=[-1, 2, 4, 1],
                   mudd_gate_layer=2, xsa_layers=[1, 2, 4], attn_out_gate_layers=[2, 5], dc_layers=[5],
                   bigram_vocab_size=997, bigram_sign_rows=64, value_embed_gate_dim=4, mudd_hidden=8)
        on = record89_model(**tiny, **r89, untie_after_step=untie)
        off = ModelConfig(**tiny, value_embed_layers=[1, 0, -1, -1, 1, 0])
        cfg.train.tokens_per_step, cfg.train.sequence_tokens = 512, 256
        cfg.train.val_tokens, cfg.train.val_sequence_tokens = 256, 256
        cfg.train.device, cfg.data.max_doc_len, cfg.data.bos_id = "cpu", 256, 511
        cfg.schedule.window_stages, cfg.schedule.extension_window, cfg.schedule.final_val_window = [2, 4, 6], 8, 10
    else:
        on = record89_model(untie_after_step=untie)
        off = ModelConfig()
        cfg.train.device = "cuda"
        cfg.train.val_tokens = cfg.train.val_sequence_tokens      # the warm-up's one eval batch
    cfg.model = on if name == "on" else off
    cfg.optim = record89_optim() if name == "on" else OptimConfig()
    cfg.schedule.num_scheduled_steps, cfg.schedule.num_extension_steps = steps - 2, 2
    cfg.train.parallel_warmup = False          # one process: its compile time is part of the warm-up
    cfg.train.val_every = 0
    return cfg.validate()


def run_variant(name: str, args, work: str) -> dict:
    import torch
    from torch._dynamo.utils import counters

    from speedrun.bench import synthetic_shards
    from speedrun.distributed import World
    from speedrun.model import GPT
    from speedrun.train.trainer import Trainer

    cfg = variant_config(name, args.steps, args.smoke)
    run_dir = os.path.join(work, name)
    os.makedirs(run_dir, exist_ok=True)
    tokens = cfg.train.tokens_per_step * (args.steps + 8)
    cfg.data.train_path, cfg.data.val_path = synthetic_shards(
        run_dir, tokens, cfg.model.padded_vocab_size, cfg.data.bos_id,
        num_val_tokens=cfg.train.val_tokens + cfg.train.val_sequence_tokens)
    cfg.data.wrap = True
    device = torch.device(cfg.train.device, 0) if cfg.train.device == "cuda" else torch.device("cpu")
    torch._dynamo.reset()
    if args.smoke:   # dynamo traces and guards as on the GPU; the eager backend compiles nothing
        real = GPT.compile_regions
        GPT.compile_regions = lambda self, **kw: real(self, backend="eager", **kw)
    try:
        trainer = Trainer(cfg, World(device=device), run_dir)
        warmup_s = trainer.warmup()
        graphs_warm = counters["stats"]["unique_graphs"]
        step_ms, losses, untied_at = [], [], None
        for step in range(args.steps):
            trainer.apply_window(step)
            sync(device)
            t = time.perf_counter()
            loss = trainer.train_step(step, trainer.next_batches(step))
            sync(device)
            step_ms.append(1e3 * (time.perf_counter() - t))
            losses.append(float(loss))
            if untied_at is None and cfg.model.tie_embed and not trainer.model.embed_tied:
                untied_at = step
        graphs_after = counters["stats"]["unique_graphs"] - graphs_warm
        timed = step_ms[2:] if len(step_ms) > 4 else step_ms          # steps 0, 1: first replays
        result = {
            "variant": name, "record": "89 (issue 16 switches on)" if name == "on" else "45",
            "params": trainer.model.num_params(), "warmup_s": warmup_s,
            "ms_per_step_mean": statistics.fmean(timed), "ms_per_step_median": statistics.median(timed),
            "ms_per_step": step_ms, "tokens_per_step": cfg.train.tokens_per_step,
            "train_losses": losses, "untied_after_step": untied_at,
            "graphs_compiled_after_warmup": graphs_after, "graphs_after_warmup_total": graphs_warm,
            "cuda_graphs": trainer.micro_graph is not None,
            "cuda_graph_recordings": trainer.micro_graph.recordings if trainer.micro_graph else 0,
            "attention": trainer.model.attention_backend(device),
            "fp8_head": trainer.model.fp8_head_active(device),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        trainer.close()
    finally:
        if args.smoke:
            GPT.compile_regions = real
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench-r89-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or os.path.join(work, "inductor")
    os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    sys.path.insert(0, ROOT)
    import torch
    if not args.smoke and not torch.cuda.is_available():
        print("bench_r89_model: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    rows = [run_variant(name, args, work) for name in args.variants.split(",")]
    device = torch.cuda.get_device_name(0) if not args.smoke else "cpu (smoke)"
    result = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "steps": args.steps, "variants": rows}
    by_name = {r["variant"]: r for r in rows}
    if "on" in by_name and "off" in by_name:
        result["on_over_off_ms"] = by_name["on"]["ms_per_step_median"] / by_name["off"]["ms_per_step_median"]
    print(f"{device} | torch {torch.__version__} | {args.steps} steps per variant")
    print(f"{'variant':>8} {'params':>13} {'ms/step med':>12} {'mean':>9} {'warm-up s':>10} "
          f"{'graphs after warm-up':>21} {'first/last loss':>17}")
    for r in rows:
        print(f"{r['variant']:>8} {r['params']:>13,} {r['ms_per_step_median']:>12.1f} {r['ms_per_step_mean']:>9.1f} "
              f"{r['warmup_s']:>10.1f} {r['graphs_compiled_after_warmup']:>21} "
              f"{r['train_losses'][0]:>8.3f}/{r['train_losses'][-1]:.3f}")
    if "on_over_off_ms" in result:
        print(f"on / off (median ms/step): {result['on_over_off_ms']:.3f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 1 if any(r["graphs_compiled_after_warmup"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
