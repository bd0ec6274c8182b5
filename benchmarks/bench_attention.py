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

from bench_flex import MAX_DOC_LEN, STAGES, document_starts, print_row, time_stages  # noqa: E402

from speedrun.model import attention  # noqa: E402


def cu_seqlens(T: int, device, seed: int = 0, slots: int = 256) -> torch.Tensor:
    """bench_flex's synthetic document starts, then T, padded with T: the loader's format (a fixed
    number of slots)."""
    starts = document_starts(T, seed)[:slots - 1]
    cu = torch.cat([starts, torch.full((slots - starts.numel(),), T)])
    return cu.to(torch.int32).to(device)


def run(backends: list[str], T: int, H: int, D: int, window_check: int) -> list[dict]:
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
                print_row(row)
                continue
            row["impl"] = impl
        doc = attention.build_doc_info(cu, T, dev, backend, MAX_DOC_LEN)

        def call(blocks: int):
            w = blocks * 128
            win = attention.build_window(doc, torch.tensor(w, dtype=torch.int32, device=dev), w)
            return lambda: attention.attend(q, k, v, doc, win, scale, backend)

        try:
            t0 = time.perf_counter()
            for blocks in STAGES[0]:   # the first stage's short and long window
                call(blocks)().backward(grad_out)
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            q.grad = k.grad = v.grad = None
            time_stages(call, [q, k, v], grad_out, row)
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
        print_row(row)
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
