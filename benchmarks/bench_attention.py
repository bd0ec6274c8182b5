"""Time the attention backends on the record's attention (T=32768 packed tokens, 6 heads of 128,
documents + causal + sliding window): FlexAttention (always) and FlashAttention (FA3 or FA4, when
one is importable), forward and forward+backward at the short and long window of each schedule
stage, through ``attention.attend`` exactly as the model calls it.

Owns the numbers behind the choice of ``model.attention_backend``: per backend the first-call time
(compile / JIT), ms per 32768-token micro-batch for the 10 attention layers averaged over the
stages, and the largest difference of out / dq from flex at one window.

    python benchmarks/bench_attention.py --out bench_attention.json [--backends flex,flash]
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

STAGES = [(1, 3), (3, 7), (5, 11), (6, 13)]   # (short, long) windows in 128-token blocks
LAYERS = ((0, 8), (1, 2))                     # 8 short-window layers, 2 long-window layers
MAX_DOC_LEN = 2048                            # the recipe's data.max_doc_len


def cu_seqlens(T: int, device, seed: int = 0, slots: int = 256) -> torch.Tensor:
    """Document starts (geometric lengths, mean 800, capped at MAX_DOC_LEN), then T, padded with T:
    the loader's format (a fixed number of slots)."""
    torch.manual_seed(seed)
    lengths = torch.distributions.Geometric(probs=torch.tensor(1 / 800)).sample((T // 50,)).long() + 1
    lengths = lengths.clamp_max(MAX_DOC_LEN)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    starts = starts[starts < T][:slots - 1]
    cu = torch.cat([starts, torch.full((slots - starts.numel(),), T)])
    return cu.to(torch.int32).to(device)


def run(backends: list[str], T: int, H: int, D: int, window_check: int) -> list[dict]:
    import triton.testing
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cu = cu_seqlens(T, dev)
    q, k, v = (torch.nn.functional.rms_norm(torch.randn(T, H, D, device=dev), (D,)).bfloat16()
               .requires_grad_() for _ in range(3))
    grad_out = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    scale = 0.12
    rows, reference = [], None
    for backend in backends:
        row: dict = {"backend": backend}
        if backend == "flash":
            impl = attention.flash_attn_impl()
            if impl is None:
                row["error"] = "no FlashAttention importable"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["impl"] = impl
        doc = attention.build_doc_info(cu, T, dev, backend, MAX_DOC_LEN)

        def call(blocks: int):
            w = blocks * 128
            win = attention.build_window(doc, torch.tensor(w, dtype=torch.int32, device=dev), w)
            return lambda: attention.attend(q, k, v, doc, win, scale, backend)

        try:
            t0 = time.perf_counter()
            for short, long in STAGES[:1]:
                for blocks in (short, long):
                    call(blocks)().backward(grad_out)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            q.grad = k.grad = v.grad = None
            fwd = bwd = 0.0
            for short, long in STAGES:
                for which, layers in LAYERS:
                    blocks = (short, long)[which]
                    fn = call(blocks)
                    with torch.no_grad():
                        f = triton.testing.do_bench(fn, warmup=5, rep=40)
                    fb = triton.testing.do_bench(lambda: fn().backward(grad_out), warmup=5, rep=40,
                                                 grad_to_none=[q, k, v])
                    row[f"w{blocks}:fwd_ms"], row[f"w{blocks}:fwdbwd_ms"] = f, fb
                    fwd += layers * f / len(STAGES)
                    bwd += layers * (fb - f) / len(STAGES)
            row["fwd_ms_per_microbatch"], row["bwd_ms_per_microbatch"] = fwd, bwd
            q.grad = k.grad = v.grad = None
            out = call(window_check)()
            out.backward(grad_out)
            got = [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]
            q.grad = k.grad = v.grad = None
            if reference is None:
                reference = got
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, reference):
                row[f"rel_diff_{name}"] = float((a - b).norm() / b.norm())
        except Exception as e:  # a backend that fails here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if ":" not in k}), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="flex,flash")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--window-check", type=int, default=7, help="window (128-token blocks) of the diff check")
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = run(a.backends.split(","), a.tokens, 6, 128, a.window_check)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
