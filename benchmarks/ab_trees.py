"""A/B two source trees of this package on the same machine: the same `speedrun train` command from
each (same seed, same data), then the per-step training losses and the validation losses side by
side, and optionally `speedrun bench` from each, interleaved, so a refactor can show "behaviour
unchanged" and "no slowdown" in one run.

    python3 benchmarks/ab_trees.py --a /path/to/old/tree --b . --out ab.json \
        --bench -- --config record_124m --train.max_steps 20

The data: ``--data-path``/``--val-data-path`` given after ``--`` are used as they are; otherwise both
runs read synthetic documents written once here (speedrun bench's generator, from tree B). Each
tree runs in its own process with PYTHONPATH pointing at it; nothing is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_tree(tree: str, argv: list[str], env_extra: dict | None = None, timeout: float = 900) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONPATH": os.path.abspath(tree), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "speedrun", *argv], cwd=tree, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, proc.stdout, time.perf_counter() - t


def read_metrics(run_dir: str) -> tuple[dict[int, float], dict[int, float]]:
    train, val = {}, {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if "train_loss" in row:
                train[row["step"]] = row["train_loss"]
            if "val_loss" in row:
                val[row["step"]] = row["val_loss"]
    return train, val


def compare(a: dict[int, float], b: dict[int, float]) -> dict:
    steps = sorted(set(a) & set(b))
    diffs = [abs(a[s] - b[s]) for s in steps]
    return {"steps": len(steps), "max_abs_diff": max(diffs) if diffs else None,
            "first_diff_step": next((s for s, d in zip(steps, diffs) if d > 0), None),
            "rows": [[s, a[s], b[s]] for s in steps]}


def synthetic_data(tree: str, directory: str, tokens: int, val_tokens: int) -> tuple[str, str]:
    code = ("import sys; from speedrun.bench import synthetic_shards; "
            f"print('\\n'.join(synthetic_shards({directory!r}, {tokens}, 50304, 50256, "
            f"num_val_tokens={val_tokens})))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.path.abspath(tree)},
                         text=True, capture_output=True, check=True).stdout.split()
    return out[0], out[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", required=True, help="tree A (e.g. the commit before a change)")
    p.add_argument("--b", required=True, help="tree B")
    p.add_argument("--out", required=True, help="JSON result")
    p.add_argument("--repeat", type=int, default=1, help="train runs per tree (noise floor when > 1)")
    p.add_argument("--bench", action="store_true", help="also `speedrun bench` from each tree (A, B, A, B ...)")
    p.add_argument("--bench-rounds", type=int, default=1)
    p.add_argument("--bench-args", default="--config record_124m", help="arguments of speedrun bench")
    p.add_argument("--tokens", type=int, default=40_000_000, help="synthetic train tokens")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the speedrun train arguments")
    args = p.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    work = tempfile.mkdtemp(prefix="ab-trees-")
    result: dict = {"a": os.path.abspath(args.a), "b": os.path.abspath(args.b), "train_args": train_args}
    if "--data-path" not in train_args:
        train, val = synthetic_data(args.b, work, args.tokens, 10_485_760 + 262_144)
        train_args += ["--data-path", train, "--val-data-path", val]
    runs: dict[str, list] = {"a": [], "b": []}
    cache = os.path.join(work, "inductor")   # shared: both trees compile the same graphs mostly
    for k in range(args.repeat):
        for name in ("a", "b"):
            run_dir = os.path.join(work, f"run_{name}{k}")
            rc, log, seconds = run_tree(getattr(args, name), ["train", *train_args, "--save-path", run_dir],
                                        {"TORCHINDUCTOR_CACHE_DIR": cache})
            print(f"--- train {name}{k}: rc={rc} in {seconds:.1f}s\n{log[-1500:]}", flush=True)
            if rc != 0:
                result[f"train_{name}{k}_error"] = log[-4000:]
                continue
            runs[name].append(read_metrics(run_dir))
    if runs["a"] and runs["b"]:
        result["train_loss_a_vs_b"] = compare(runs["a"][0][0], runs["b"][0][0])
        result["val_loss_a_vs_b"] = compare(runs["a"][0][1], runs["b"][0][1])
        for name in ("a", "b"):
            if len(runs[name]) > 1:   # run-to-run noise of one tree
                result[f"train_loss_{name}_repeat"] = compare(runs[name][0][0], runs[name][1][0])
    if args.bench:
        benches: dict[str, list] = {"a": [], "b": []}
        for k in range(args.bench_rounds):
            for name in ("a", "b"):
                out = os.path.join(work, f"bench_{name}{k}.json")
                rc, log, _ = run_tree(getattr(args, name), ["bench", *args.bench_args.split(), "--out", out])
                print(f"--- bench {name}{k}: rc={rc}\n{log[-2500:]}", flush=True)
                if rc == 0:
                    with open(out) as f:
                        r = json.load(f)
                    benches[name].append({key: r.get(key) for key in (
                        "schedule_avg_tokens_per_s", "peak_reserved_gib", "peak_memory_gib",
                        "cold_start_to_first_step_s", "attention", "graphs_compiled_after_warmup")}
                        | {"stages": [(s["window_short"], s["window_long"], s["ms_per_step"], s["train_loss"])
                                      for s in r["stages"]]})
                else:
                    benches[name].append({"error": log[-3000:]})
        result["bench"] = benches
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    for key in ("train_loss_a_vs_b", "val_loss_a_vs_b", "train_loss_a_repeat", "train_loss_b_repeat"):
        if key in result:
            r = result[key]
            print(f"{key}: {r['steps']} steps, max |diff| {r['max_abs_diff']}, first differing step "
                  f"{r['first_diff_step']}")
    for name, rows in result.get("bench", {}).items():
        for r in rows:
            if "error" not in r:
                print(f"bench {name}: {r['schedule_avg_tokens_per_s'] / 1e3:.1f}k tok/s, "
                      f"{r['peak_reserved_gib']:.2f} GiB reserved, cold start {r['cold_start_to_first_step_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
