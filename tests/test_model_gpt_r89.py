"""The GPT with record 89's attention switches on: the learned per-layer coefficients without the
MUDD gates (r89 initial values, labels, gradients), KV-cache decoding equal to the full forward with every switch
on, the backends agreeing on the whole model, and regional compilation (one graph per block
variant, nothing new across window stages)."""
import copy
import dataclasses

import pytest
import torch
from test_model_gpt import batch, decode_in_pieces, randomized, small_cfg

from speedrun.config import ModelConfig, OptimConfig, Window
from speedrun.model import GPT
from speedrun.model.kv_cache import KVCache
from speedrun.optim.build import build_optimizers

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# layer 0 paired, 1 XSA, 2 long (key offset) + XSA + gate, 3 MLP only, 4 long + DC + gate
R89 = dict(num_heads=6, head_dim=16, model_dim=96, block_size=8, paired_head_layers=[0], key_offset=True,
           xsa_layers=[1, 2], dc_layers=[4], dc_window=5, attn_out_gate_layers=[2, 4], attn_lambdas=True)


def r89_cfg(**kw) -> ModelConfig:
    return small_cfg(**{**R89, **kw})


def attn_lambdas(model: GPT) -> torch.Tensor:
    """The (qkv, o) lambdas of every layer, (L, 2), a view into the scalars vector."""
    lay = model.layout
    return model.scalars[lay.attn:lay.attn + 2 * model.cfg.num_layers].view(-1, 2)


def r89_model(seed=0, **kw) -> GPT:
    """Every coefficient away from its neutral initial value, so each technique changes the output."""
    torch.manual_seed(seed)
    model = randomized(GPT(r89_cfg(**kw)), seed, scale=0.1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        v = model.gate_constants.values
        v.add_(torch.randn(v.shape, generator=g) * 0.5)
        lam = attn_lambdas(model)
        lam.add_(torch.randn(lam.shape, generator=g) * 0.1)
    return model


def test_coefficients_only_when_switched_on_with_r89_initial_values():
    """Without the MUDD gates, each attention coefficient is a learned per-layer constant (label
    gate_constants, fp32) starting at record 89's initial value; the attention lambdas sit in the
    scalars vector. Record 45 has neither."""
    plain = GPT(small_cfg())
    assert plain.gate_constants is None and plain.layout.attn is None
    model = GPT(r89_cfg())
    values = model.gate_constants.values
    assert values.dtype == torch.float32 and values.label == "gate_constants"
    c = model._coefficients(0, None, 3)
    ones, zeros = torch.ones(3, 6), torch.zeros(3, 6)
    assert torch.equal(c.take("xsa", 1), zeros) and torch.equal(c.take("xsa", 2), zeros)
    for i in (2, 4):
        assert torch.equal(c.take("out_gate", i), 0.25 * ones)
    assert torch.equal(c.take("dc_w1", 4), ones) and torch.equal(c.take("dc_w2", 4), zeros)
    assert c.take("xsa", 0) is None and c.take("out_gate", 1) is None and c.take("dc_w1", 2) is None
    lam = attn_lambdas(model)
    for i in (0, 1, 2, 4):   # the attention layers all have lambdas (0.5, 1.0)
        assert lam[i].tolist() == [0.5, 1.0]


def test_every_coefficient_gets_a_gradient_and_adam_takes_it():
    model = r89_model()
    ids, targets, cu = batch(T=96)
    model.set_window(Window(1, 2))
    model(ids, targets, cu).backward()
    assert (model.gate_constants.values.grad != 0).all()
    grad = model.scalars.grad[model.layout.attn:model.layout.attn + 2 * model.cfg.num_layers].view(-1, 2)
    attention = [i for i, b in enumerate(model.blocks) if b.attn is not None]
    assert (grad[attention] != 0).all() and (grad[[3]] == 0).all()     # layer 3: MLP only
    opt = build_optimizers(model, OptimConfig())
    adam_params = {id(p) for g in opt.adam.param_groups for p in g["params"]}
    assert id(model.gate_constants.values) in adam_params and id(model.scalars) in adam_params


@pytest.mark.parametrize("split", [[40], [1] * 40, [7, 1, 1, 1, 12, 1, 17]])
def test_kv_cache_equals_full_forward_with_every_switch_on(split):
    """Decoding a piece at a time (paired layer in stream layout, key offset carried across
    pieces, DC over the cached window, XSA on the token's own value) = the full forward, with
    windows shorter than the sequence (long 24 tokens, short 8: 8 stream rows in the paired layer)."""
    model = r89_model().eval()
    model.set_window(Window(1, 2))
    model.set_window(Window(1, 3))
    ids = torch.randint(0, 500, (sum(split),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        decoded = decode_in_pieces(model, ids, split, KVCache(model, 48))
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)


def test_each_switch_changes_the_model():
    """Switched off one at a time (same weights), the logits change: every technique is wired in."""
    model = r89_model()
    model.eval().set_window(Window(1, 2))
    ids, _, cu = batch(T=64)
    with torch.no_grad():
        full = model(ids, cu_seqlens=cu)
        for off in ({"paired_head_layers": []}, {"key_offset": False}, {"xsa_layers": []}, {"dc_layers": []},
                    {"attn_out_gate_layers": []}):
            other = GPT(r89_cfg(**off))
            # the constants' lanes follow the switches: the others keep their values
            state = {k: v for k, v in model.state_dict().items() if k != "gate_constants.values"}
            other.load_state_dict(state, strict=False)
            other.eval().set_window(Window(1, 2))
            assert not torch.allclose(other(ids, cu_seqlens=cu), full, atol=1e-3), off


def test_model_backends_agree(monkeypatch):
    """The whole model with every switch on: flex (eager, no grad on the CPU) and FlashAttention-4
    (fake: doubled cu_seqlens / max_seqlen in the paired layer) give the sdpa twin's loss; FA4's
    gradients equal sdpa's."""
    import flash_fakes

    from speedrun.model import attention as A
    from speedrun.model import gpt as G
    model = r89_model()
    model.set_window(Window(1, 2))
    model.max_doc_len = 64
    ids, targets, cu = batch(T=64)
    cu = cu.clamp_max(64)

    def run(backend, grad=True):
        model.cfg = dataclasses.replace(model.cfg, attention_backend=backend)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(grad):
            loss = model(ids, targets, cu)
        if grad:
            loss.backward()
            return [loss.detach()] + [p.grad.clone() for p in model.parameters()]
        return [loss]

    want = run("sdpa")
    torch.testing.assert_close(run("flex", grad=False)[0], want[0], rtol=1e-5, atol=1e-5)
    flash_fakes.install_fa4(monkeypatch, [])
    monkeypatch.setattr(G, "resolve_backend", lambda name, device, *shape: name)
    A.flash_attn_impl.cache_clear()
    try:
        for got, ref in zip(run("flash"), want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)   # fp32 noise
    finally:
        A.flash_attn_impl.cache_clear()


def test_compiled_regions_match_eager_and_never_recompile():
    """Regional compilation (fullgraph, aot_eager on the CPU: the DC twin runs there) with every
    switch on: the eager model's loss and gradients, one graph per block variant made at the first
    step, nothing new across window stages."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    eager = r89_model()
    compiled = copy.deepcopy(eager).compile_regions(backend="aot_eager")
    ids, targets, cu = batch(T=96)
    g = torch.Generator().manual_seed(3)
    counts, before = [], counters["stats"]["unique_graphs"]
    for long in (2, 5):
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            m.set_window(Window(1, long))
        losses = [m(ids, targets, cu) for m in (eager, compiled)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
        starts = torch.randperm(95, generator=g)[:4].sort().values + 1
        cu = torch.cat([torch.tensor([0]), starts, torch.tensor([96, 96, 96])]).to(torch.int32)
        counts.append(counters["stats"]["unique_graphs"] - before)
    # embed, loss, 5 block variants (paired, XSA, long + offset + XSA + gate, MLP + skip, long + DC + gate)
    assert counts == [7, 7]
    torch._dynamo.reset()


def test_fused_dc_switch_picks_the_twin():
    assert GPT(r89_cfg()).blocks[4].attn.dc_kernel == "auto"
    assert GPT(r89_cfg(fused_dc=False)).blocks[4].attn.dc_kernel == "torch"


def test_record89_model_built_under_a_device_context_puts_every_tensor_there():
    """The trainer builds the model under ``with torch.device(...)``: every parameter and buffer
    (the prefix table from numpy, the FP8 MLP state, the bigram signs) must land on that device,
    or the first compiled step fails indexing a CPU buffer with GPU ids (seen on the H200)."""
    from speedrun.config import Config
    from speedrun.train.cli import config_path
    cfg = Config.load(config_path("record_89")).model
    with torch.device("meta"):
        model = GPT(cfg, dtype=torch.bfloat16, micro_steps=8, prefix_loss=True)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert any(name == "prefix_table" for name, _ in tensors)
    assert [name for name, t in tensors if t.device.type != "meta"] == []
