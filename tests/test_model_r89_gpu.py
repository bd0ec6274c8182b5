"""GPU tests of record 89's embedding / residual-stream switches (skipped without CUDA): the
regionally compiled record-89-shaped model agrees with its eager twin and compiles nothing new over
the window stages and the untie; the fused losses (Triton CE, FP8 head + CE) with record 89's
asymmetric rescale agree with the plain softcap + F.cross_entropy.

Run on the GPU machine: python -m pytest tests/test_model_r89_gpu.py -m gpu -q
"""
import time

import pytest
import torch
from r89_helpers import randomized89
from test_model_gpu import fused_and_plain, packed_docs, rel

from speedrun.config import Window
from speedrun.kernels import fp8 as F8
from speedrun.model import GPT
from speedrun.presets import record89_model

pytestmark = pytest.mark.gpu


def record89_on_gpu(T=16384, dtype=torch.bfloat16, randomize=None, **overrides):
    """(config, randomized record-89 model on the GPU, ids, targets, cu_seqlens); ``randomize``:
    extra randomized89 arguments (its MUDD output scales)."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    cfg = record89_model(**overrides)
    model = randomized89(GPT(cfg, dtype).to(dev), scale=0.02, **(randomize or {}))
    g = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, 50256, (T,), device=dev, generator=g, dtype=torch.int32)
    targets = torch.randint(0, 50256, (T,), device=dev, generator=g)
    return cfg, model, ids, targets, packed_docs(T, 700, dev)


# as configs/record_89.json (record89_model()'s defaults leave them off)
ATTENTION89 = dict(paired_head_layers=[0, 2, 5, 9], key_offset=True)


def attention89_on_gpu(dtype, randomize=None, T=4096, **overrides):
    """(cfg, model, ids, targets, cu) of a record-89 model with every attention switch on, at the
    window stage (3, 7), in train mode; the caller runs it eagerly first, then compiles."""
    torch._dynamo.reset()
    cfg, model, ids, targets, cu = record89_on_gpu(T=T, dtype=dtype, randomize=randomize, **ATTENTION89, **overrides)
    model.set_window(Window(1, 3))
    model.set_window(Window(3, 7))
    return cfg, model.train(), ids, targets, cu


def mark(t0, what):
    """Progress on stdout, so a run stopped by its time limit shows how far it got."""
    print(f"[{time.perf_counter() - t0:6.1f} s] {what}", flush=True)


def test_compiled_record89_model_matches_eager_twin_and_never_recompiles():
    """Every record-89 attention switch on (paired heads, key offset, XSA, output gates, DC-MHA
    through its Triton kernel), compiled as `record_89` trains it (regions, symbolic token count,
    flex) against the eager model on sdpa's dense masks (DC-MHA's kernel = twin:
    test_kernels_dc_mha), one training forward+backward; prints the largest differences. Then
    window stages, a 2x longer micro-batch and the untie compile nothing new.

    In fp32 (FP8 head and the 16-bit MLP kernel off): in bf16 the gradient of this deep gated model
    is itself mostly rounding noise (bf16 vs fp32 of the same eager code differ by a median 13% per
    parameter at the record's own init, measured on the CPU); the recipe's dtype is the next test."""
    from torch._dynamo.utils import counters
    t0 = time.perf_counter()
    cfg, model, ids, targets, cu = attention89_on_gpu(
        torch.float32, randomize=dict(mudd_w2_std=0.2, mudd_bias_std=0.3),
        fp8_head=False, fused_mlp=False, fused_loss=False)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(ids, targets, cu)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    cfg.attention_backend = "sdpa"
    eager_loss, eager_grads = loss_and_grads()
    mark(t0, "eager sdpa twin done")
    cfg.attention_backend = "flex"
    model.compile_regions(dynamic=True)
    loss, grads = loss_and_grads()
    mark(t0, "compiled forward+backward done")
    assert grads.keys() == eager_grads.keys()
    worst = sorted(((rel(grads[n], eager_grads[n]), n) for n in grads), reverse=True)
    print(f"fp32 compiled vs eager twin: loss {loss.item():.6f} vs {eager_loss.item():.6f} "
          f"(rel {abs(loss.item() / eager_loss.item() - 1):.2e}); gradient rel. norm diff: largest "
          f"{worst[0][1]} {worst[0][0]:.2e}, median {worst[len(worst) // 2][0]:.2e}; max |diff| "
          f"{max((grads[n] - eager_grads[n]).abs().max().item() for n in grads):.3e} (max |grad| "
          f"{max(t.abs().max().item() for t in eager_grads.values()):.3e})", flush=True)
    assert abs(loss.item() / eager_loss.item() - 1) < 1e-4
    assert worst[len(worst) // 2][0] < 1e-2 and worst[0][0] < 5e-2, worst[:5]

    graphs = {"first step": counters["stats"]["unique_graphs"]}
    for long in (11, 13):
        model.set_window(Window(long // 2, long))
        model(ids, targets, cu).backward()
        graphs[f"window {long}"] = counters["stats"]["unique_graphs"]
    T = ids.numel()
    model(torch.cat([ids, ids]), torch.cat([targets, targets]), packed_docs(2 * T, 700, ids.device)).backward()
    graphs["2x length"] = counters["stats"]["unique_graphs"]
    model.untie_embed()
    model(ids, targets, cu).backward()
    graphs["untie"] = counters["stats"]["unique_graphs"]
    mark(t0, f"window stages, 2x length, untie done; graphs after each: {graphs}")
    assert len(set(graphs.values())) == 1, f"recompiled: {graphs}; {recompile_reasons()}"
    torch._dynamo.reset()


def recompile_reasons() -> str:
    """The last guard failure of each recompiled code object: why dynamo traced it again."""
    from torch._dynamo.utils import guard_failures
    return "; ".join(f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno}): "
                     f"{str(fails[-1]).splitlines()[0][:300]}" for code, fails in guard_failures.items())


def test_compiled_record89_model_loss_in_bf16_matches_eager_twin():
    """The recipe's dtype and kernels (bf16, FP8 head where the GPU has it, fused MLP and loss),
    same switches: the compiled training loss vs the eager sdpa twin's."""
    t0 = time.perf_counter()
    cfg, model, ids, targets, cu = attention89_on_gpu(torch.bfloat16)
    cfg.attention_backend = "sdpa"
    with torch.no_grad():
        eager = model(ids, targets, cu).item()
    cfg.attention_backend = "flex"
    model.compile_regions(dynamic=True)
    loss = model(ids, targets, cu)
    loss.backward()
    mark(t0, "compiled forward+backward done")
    print(f"bf16 compiled vs eager twin: loss {loss.item():.4f} vs {eager:.4f} (rel {abs(loss.item() / eager - 1):.2e})")
    assert abs(loss.item() / eager - 1) < 1e-2
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_losses_with_the_asymmetric_rescale_match_plain(compiled):
    """fused_loss on (the FP8 head + CE op where the GPU has FP8, else the Triton CE) vs off (the
    plain rescale + F.cross_entropy on the same head), record 89's 23 sigmoid((z + 5) / 7.5)."""
    torch._dynamo.reset()
    cfg, model, ids, targets, cu = record89_on_gpu(T=8192)
    model.set_window(Window(1, 3))
    if compiled:
        model.compile_regions()
    model.train()
    results = fused_and_plain(cfg, model, (model.lm_head.weight, model.bigram.weight), ids, targets, cu)
    tol = 2e-2 if F8.fp8_supported("cuda", 0) else 1e-2
    for got, want in zip(results[True], results[False]):
        assert rel(got, want) < tol
    torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_losses_with_mtp_and_prefix_terms_match_plain(compiled):
    """Record 89's stage-0 loss (3 MTP weights, prefix weight, record 89's FP8 head scales) through
    the fused op (or the Triton CE without FP8) vs fused_loss off (the plain twin on fp32 rescaled
    logits); then weights of later steps (zero padding, zero prefix weight) without a new graph."""
    from torch._dynamo.utils import counters

    from speedrun.model import LossWeights
    torch._dynamo.reset()
    cfg, model, ids, targets, cu = record89_on_gpu(T=8192, fp8_head_scales=[100 / 448, 1.6 / 448, 0.75 / 448])
    model = GPT(cfg, torch.bfloat16, prefix_loss=True).cuda()
    model = randomized89(model, scale=0.02)
    model.set_window(Window(1, 3))
    if compiled:
        model.compile_regions()
    model.train()
    buffer = torch.tensor([1.0, 0.5, 0.25, 0.25], device="cuda")
    weights = LossWeights(buffer[:3], buffer[3])
    results = fused_and_plain(cfg, model, (model.lm_head.weight, model.bigram.weight), ids, targets, cu,
                              loss_weights=weights)
    tol = 3e-2 if F8.fp8_supported("cuda", 0) else 1e-2
    for got, want in zip(results[True], results[False]):
        assert rel(got, want) < tol
    graphs = counters["stats"]["unique_graphs"]
    for row in ([1.0, 0.5, 0.0, 0.25], [1.0, 0.0, 0.0, 0.0]):
        buffer.copy_(torch.tensor(row))
        model(ids, targets, cu, loss_weights=weights).backward()
    assert counters["stats"]["unique_graphs"] == graphs, "new weights recompiled"
    torch._dynamo.reset()
