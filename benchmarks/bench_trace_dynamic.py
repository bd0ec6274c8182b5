"""What symbolic sizes cost in tracing: dynamo + AOTAutograd time of the regionally compiled model,
with every input size symbolic (``compile_regions(dynamic=True)``, what the trainer uses when the
stage table has several micro-batch lengths) against static graphs and torch's automatic dynamic (a
first static compile; at the next length only the sizes that changed become symbols). Compare the
first lengths (both cold); the automatic mode's second compile runs with the first's caches warm.

Each mode runs in its own child process (fresh dynamo state): the model of --config, compiled with
--backend (aot_eager by default: tracing only, no code generation, so the figure is the tracing
that a warm inductor cache cannot skip), one training forward+backward at each of --tokens; per
length it reports the seconds dynamo spent compiling frames and the graph count.

    PYTHONPATH=$PWD python3 benchmarks/bench_trace_dynamic.py [--config record_89] \
        [--tokens 256,512] [--device cpu] [--backend aot_eager] [--out trace_dynamic.json]

On the CPU the attention backend is sdpa (flex has no CPU backward) and DC-MHA runs its twin.
"""
from __future__ import annotations

import argparse
import json
import sys

import fresh_process


def run_mode(config: str, mode: str, tokens: list[int], device: str, backend: str) -> list[dict]:
    """In this process: compile the model's regions (mode "dynamic" or "automatic") and time each
    length's first forward+backward's frame compiles."""
    import torch
    from torch._dynamo.utils import compilation_time_metrics, counters

    from speedrun.config import Config, Window
    from speedrun.model import GPT
    from speedrun.train.cli import config_path

    cfg = Config.load(config_path(config)).model
    if device == "cpu":
        cfg.attention_backend = "sdpa"
    dev = torch.device(device)
    torch.manual_seed(0)
    with dev:
        model = GPT(cfg, torch.float32 if device == "cpu" else torch.bfloat16).train()
    model.set_window(Window(1, 3))
    model.compile_regions(dynamic=mode == "dynamic", backend=backend)
    rows = []
    for T in tokens:
        ids = torch.randint(0, cfg.vocab_size, (T,), device=dev, dtype=torch.int32)
        targets = torch.randint(0, cfg.vocab_size, (T,), device=dev)
        starts = torch.arange(0, T, 70, device=dev, dtype=torch.int32)
        cu = torch.cat([starts, torch.full((4,), T, device=dev, dtype=torch.int32)])
        before = sum(compilation_time_metrics.get("_compile.compile_inner", []))
        model(ids, targets, cu).backward()
        model.zero_grad(set_to_none=True)
        rows.append({"tokens": T, "compile_s": round(sum(compilation_time_metrics["_compile.compile_inner"]) - before, 2),
                     "graphs": counters["stats"]["unique_graphs"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="record_89")
    ap.add_argument("--tokens", default="256,512", help="comma-separated micro-batch lengths, in order")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="aot_eager")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"config": args.config, "device": args.device, "backend": args.backend}
    for mode in ("dynamic", "automatic"):
        result[mode] = fresh_process.call("bench_trace_dynamic", "run_mode", args.config, mode, tokens,
                                          args.device, args.backend)
        print(mode, result[mode], flush=True)
    if args.out:
        sys.path.insert(0, fresh_process.ROOT)
        from speedrun.utils import atomic_write_text
        atomic_write_text(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
