"""Sweep FlexAttention kernel options for the record's attention (T=32768 packed tokens, 6 heads of
128, documents + causal + sliding window) and time forward and forward+backward of each.

Owns the numbers behind ``attention.FLEX_KERNEL_OPTIONS``: each candidate is compiled once (the
window is a tensor, so one compile serves every window), then timed with triton.testing.do_bench at
a short and a long window of each schedule stage. Documents are synthetic, geometric lengths with
mean 800 tokens capped at 2,048 (the recipe's max_doc_len), like ``speedrun bench``'s data.

    python benchmarks/bench_flex.py --out bench_flex.json [--configs default,rows_safe,...]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedrun.model import attention  # noqa: E402

# name -> kernel_options (None: torch's defaults)
CANDIDATES: dict[str, dict | None] = {"default": None}
for _bm, _bn, _w, _s in [(128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 4)]:
    CANDIDATES[f"fwd{_bm}x{_bn}w{_w}s{_s}"] = {"fwd_BLOCK_M": _bm, "fwd_BLOCK_N": _bn, "fwd_num_warps": _w,
                                              "fwd_num_stages": _s}
for _m1, _n1, _w, _s in [(64, 64, 4, 3), (64, 64, 8, 3), (64, 128, 8, 2), (64, 128, 4, 3), (32, 128, 4, 3)]:
    CANDIDATES[f"bwd{_m1}x{_n1}w{_w}s{_s}"] = {"bwd_BLOCK_M1": _m1, "bwd_BLOCK_N1": _n1, "bwd_BLOCK_M2": _n1,
                                              "bwd_BLOCK_N2": _m1, "bwd_num_warps": _w, "bwd_num_stages": _s}
CANDIDATES.update({
    "prescale": {"PRESCALE_QK": True},
    "tma": {"USE_TMA": True},
    "write_dq_off": {"WRITE_DQ": False},
    # every row has its diagonal key, but this produced NaN outputs on H100 (torch 2.11): kept to show it
    "rows_safe": {"ROWS_GUARANTEED_SAFE": True},
})
STAGES = [(1, 3), (3, 7), (5, 11), (6, 13)]   # (short, long) windows in 128-token blocks


MAX_DOC_LEN = 2048                            # the recipe's data.max_doc_len


def document_starts(T: int, seed: int = 0) -> torch.Tensor:
    """(n,) int64 starts of synthetic documents in T tokens, the first 0: geometric lengths with
    mean 800 capped at MAX_DOC_LEN (also bench_attention.py's documents)."""
    torch.manual_seed(seed)
    lengths = torch.distributions.Geometric(probs=torch.tensor(1 / 800)).sample((T // 50,)).long() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths.clamp_max(MAX_DOC_LEN), 0)])
    return starts[starts < T]


def doc_ids(T: int, device, seed: int = 0) -> torch.Tensor:
    ids = torch.zeros(T, dtype=torch.int32)
    ids[document_starts(T, seed)[1:]] = 1
    return torch.cumsum(ids, 0).to(torch.int32).to(device)


def time_stages(call, params: list[torch.Tensor], grad_out: torch.Tensor, row: dict) -> None:
    """Times ``call(blocks)()`` (attention at a window of that many 128-token blocks) forward and
    forward+backward at each stage's short and long window into ``row``, and ms per 32768-token
    micro-batch of the 10 attention layers (8 short-window, 2 long-window) averaged over STAGES."""
    import triton.testing
    fwd = bwd = 0.0
    for short, long in STAGES:
        for blocks, layers in ((short, 8), (long, 2)):
            fn = call(blocks)
            with torch.no_grad():
                f = triton.testing.do_bench(fn, warmup=5, rep=40)
            fb = triton.testing.do_bench(lambda: fn().backward(grad_out), warmup=5, rep=40, grad_to_none=params)
            row[f"{short}/{long}:{blocks}:fwd_ms"] = f
            row[f"{short}/{long}:{blocks}:fwdbwd_ms"] = fb
            fwd += layers * f / len(STAGES)
            bwd += layers * (fb - f) / len(STAGES)
    row["fwd_ms_per_microbatch"], row["bwd_ms_per_microbatch"] = fwd, bwd


def print_row(row: dict) -> None:
    """One JSON line per candidate, without the per-window timings."""
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                      if ":" not in k}), flush=True)


def run(names: list[str], T: int, H: int, D: int) -> list[dict]:
    dev = torch.device("cuda")
    docs = doc_ids(T, dev)
    torch.manual_seed(0)
    q, k, v = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    rows, reference = [], None
    for name in names:
        attention.FLEX_KERNEL_OPTIONS = CANDIDATES[name]
        torch._dynamo.reset()
        fn = torch.compile(attention._flex_attend, dynamic=False, fullgraph=True)
        row = {"name": name, "options": CANDIDATES[name]}
        try:
            t0 = time.perf_counter()
            w = torch.tensor(3 * 128, dtype=torch.int32, device=dev)
            win = attention.build_window(attention.DocInfo(docs, None, T, "flex"), w, -1)
            fn(q, k, v, docs, win).backward(grad_out)
            torch.cuda.synchronize()
            q.grad = k.grad = v.grad = None
            row["compile_s"] = time.perf_counter() - t0

            def call(blocks: int):
                w.fill_(blocks * 128)
                win = attention.build_window(attention.DocInfo(docs, None, T, "flex"), w, -1)
                return lambda: fn(q, k, v, docs, win)

            time_stages(call, [q, k, v], grad_out, row)
            q.grad = k.grad = v.grad = None
            out = call(STAGES[-1][1])()   # the last stage's long window
            out.backward(grad_out)
            got = (out.detach().float(), q.grad.float())
            q.grad = k.grad = v.grad = None
            if reference is None:
                reference = got
            # max abs difference from the default config's output and dq (same window)
            row["max_diff_out"] = float((got[0] - reference[0]).abs().max())
            row["max_diff_dq"] = float((got[1] - reference[1]).abs().max())
        except Exception as e:  # a config the kernel rejects (shared memory, divisibility)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        print_row(row)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CANDIDATES))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = run(a.configs.split(","), a.tokens, 6, 128)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
