"""Time record 89's attention pieces at the record's shapes (T=32768 packed tokens per micro-batch,
6 heads of 128, bf16, bench_flex's synthetic documents), forward and forward+backward each:

- paired vs plain attention per backend (flex, flash when importable; sdpa on request) at each
  stage's short window (paired layers are short-window layers), through ``attention.attend`` on
  the 2T-row stream exactly as the model calls it (the stream's documents built once, outside);
- the partial key offset, XSA and the linear output gate, eager and torch.compile'd alone (inside
  the model they are compiled into the block with their neighbours, so the compiled figure is an
  upper bound of their cost there);
- the attention lambdas (scaling [Wq;Wk;Wv] and Wo before the matmuls) as the extra time over the
  same projections without them;
- DC-MHA (window 112): the Triton kernels at T=32768 and at the twin's size, the twin (dense, so
  O(H T^2) memory) at --twin-tokens (8192), and the largest differences between the two there.

    PYTHONPATH=$PWD python3 benchmarks/bench_attention_r89.py --out bench_attention_r89.json \
        [--backends flex,flash] [--tokens 32768] [--twin-tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_attention import cu_seqlens  # noqa: E402
from bench_flex import MAX_DOC_LEN, STAGES, print_row  # noqa: E402

from speedrun.kernels.dc_mha import dc_mha  # noqa: E402
from speedrun.model import attention as A  # noqa: E402

H, D = 6, 128


def fwd_bwd_ms(fn, leaves: list[torch.Tensor], grad: torch.Tensor) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of fn() by triton.testing.do_bench."""
    import triton.testing
    with torch.no_grad():
        f = triton.testing.do_bench(fn, warmup=5, rep=40)
    fb = triton.testing.do_bench(lambda: torch.autograd.grad(fn(), leaves, grad), warmup=5, rep=40)
    return f, fb


def normed(T, dev, scale=1.0):
    return (F.rms_norm(torch.randn(T, H, D, device=dev), (D,)) * scale).bfloat16().requires_grad_()


def paired_rows(backends: list[str], T: int, dev) -> list[dict]:
    cu = cu_seqlens(T, dev)
    q, k, v = (normed(T, dev) for _ in range(3))
    grad = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    rows = []
    for backend in backends:
        row: dict = {"piece": "attention plain vs paired", "backend": backend}
        if backend == "flash" and A.flash_attn_impl() is None:
            row["error"] = "no FlashAttention importable"
            rows.append(row)
            print_row(row)
            continue
        try:
            doc = A.build_doc_info(cu, T, dev, backend, MAX_DOC_LEN)
            stream = A.stream_doc_info(doc)
            for short, _ in STAGES:
                w = short * 128
                for name, layer_doc in (("plain", doc), ("paired", stream)):
                    win = A.build_window(layer_doc, torch.tensor(w, dtype=torch.int32, device=dev), w)
                    if name == "plain":
                        fn = lambda: A.attend(q, k, v, layer_doc, win, 0.12, backend)  # noqa: E731
                    else:
                        fn = lambda: A.attend(A.to_stream(q), A.to_stream(k), A.to_stream(v),  # noqa: E731
                                              layer_doc, win, 0.12, backend).reshape(T, H, D)
                    f, fb = fwd_bwd_ms(fn, [q, k, v], grad)
                    row[f"{name}_w{short}_fwd_ms"], row[f"{name}_w{short}_fwdbwd_ms"] = f, fb
        except Exception as e:  # a backend that fails here is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print_row(row)
        rows.append(row)
    return rows


def elementwise_rows(T: int, dev) -> list[dict]:
    y, v, k = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    alpha = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    gate = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
    pieces = {"key offset": (lambda k: A.offset_keys(k), [k]),
              "xsa": (lambda y, v, a: A.xsa(y, v, a), [y, v, alpha]),
              "output gate": (lambda y, g: y * g[..., None], [y, gate])}
    rows = []
    for name, (fn, leaves) in pieces.items():
        row: dict = {"piece": name}
        for mode, f in (("eager", fn), ("compiled", torch.compile(fn, fullgraph=True, dynamic=False))):
            row[f"{mode}_fwd_ms"], row[f"{mode}_fwdbwd_ms"] = fwd_bwd_ms(lambda: f(*leaves), leaves, grad)
        print_row(row)
        rows.append(row)
    # attention lambdas: the q|k|v and output projections with and without the scalars on the weights
    x = torch.randn(T, H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, H * D, H * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    lam = torch.tensor([0.5, 1.0], device=dev, requires_grad=True)
    g2 = torch.randn(T, H * D, device=dev, dtype=torch.bfloat16)

    def proj(with_lambdas):
        def run():
            wq, wo = w[:3].flatten(0, 1), w[3]
            if with_lambdas:
                wq, wo = lam[0] * wq, lam[1] * wo
            return F.linear(F.linear(x, wq)[:, :H * D], wo)
        return run

    row = {"piece": "attention lambdas"}
    for name in ("without", "with"):
        fn = torch.compile(proj(name == "with"), fullgraph=True, dynamic=False)
        leaves = [x, w] + ([lam] if name == "with" else [])
        row[f"{name}_fwd_ms"], row[f"{name}_fwdbwd_ms"] = fwd_bwd_ms(fn, leaves, g2)
    row["extra_fwdbwd_ms"] = row["with_fwdbwd_ms"] - row["without_fwdbwd_ms"]
    print_row(row)
    rows.append(row)
    return rows


def dc_rows(T: int, twin_T: int, dev) -> list[dict]:
    rows = []
    results = {}
    for kernel, tokens in (("triton", T), ("triton", twin_T), ("torch", twin_T)):
        row: dict = {"piece": "dc-mha", "kernel": kernel, "tokens": tokens, "window": 112}
        gen = torch.Generator(device=dev).manual_seed(0)
        cu = cu_seqlens(tokens, dev)
        doc = A.build_doc_info(cu, tokens, dev, "sdpa").doc_ids
        q, k = normed(tokens, dev, 0.12), normed(tokens, dev)
        y, v = (torch.randn(tokens, H, D, device=dev, generator=gen).bfloat16().requires_grad_() for _ in range(2))
        w1 = F.rms_norm(torch.randn(tokens, H, device=dev, generator=gen), (H,)).bfloat16().requires_grad_()
        w2 = (torch.randn(tokens, H, device=dev, generator=gen) * 0.5).bfloat16().requires_grad_()
        grad = torch.randn(tokens, H, D, device=dev, generator=gen).bfloat16()
        leaves = [y, q, k, v, w1, w2]
        fn = lambda: dc_mha(y, q, k, v, w1, w2, doc, 112, kernel=kernel)  # noqa: E731
        try:
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            row["first_call_s"] = time.perf_counter() - t0
            row["fwd_ms"], row["fwdbwd_ms"] = fwd_bwd_ms(fn, leaves, grad)
            if tokens == twin_T:
                out = fn()
                results[kernel] = [out.detach()] + list(torch.autograd.grad(out, leaves, grad))
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        print_row(row)
        rows.append(row)
    if len(results) == 2:
        diff = {"piece": "dc-mha triton vs twin", "tokens": twin_T}
        for name, a, b in zip(("out", "dy", "dq", "dk", "dv", "dw1", "dw2"), results["triton"], results["torch"]):
            a, b = a.float(), b.float()
            diff[f"max_abs_diff_{name}"] = float((a - b).abs().max())
            diff[f"rel_diff_{name}"] = float((a - b).norm() / b.norm())
        print_row(diff)
        rows.append(diff)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="flex,flash")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--twin-tokens", type=int, default=8192, help="tokens of the DC twin comparison (dense)")
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = paired_rows(a.backends.split(","), a.tokens, dev)
    rows += elementwise_rows(a.tokens, dev)
    rows += dc_rows(a.tokens, a.twin_tokens, dev)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
