"""The GPT: record inventory (spec 1.1), init (1.7), scalars layout (1.2), the whole forward vs an
independent float64 oracle with every technique on and each one switched off (1.3), "switched off
== neutral values" equivalences, loss reductions and chunked eval, windows/YaRN, regional
compilation without recompiles on window changes."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from speedrun.config import ModelConfig, Window
from speedrun.kernels import fp8 as F8
from speedrun.model import GPT

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SWITCHES = ["rotary", "yarn", "qk_norm", "relu_squared", "value_embeds", "smear", "attn_gate",
            "skip_connection", "block_lambdas", "backout"]
LABELS = {"embed", "value_embed", "lm_head", "scalars", "attn", "mlp_fc", "mlp_proj", "smear_gate",
          "attn_gate"}


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=500, num_layers=5, model_dim=64, num_heads=2, head_dim=32,
                no_attention_layers=[3], long_window_layers=[2, 4], value_embed_layers=[1, 0, -1, -1, 1],
                skip_from_layer=1, skip_to_layer=3, backout_layer=2, block_size=16,
                rope_max_positions=4096, attention_backend="sdpa")
    base.update(kw)
    return ModelConfig(**base)


def randomized(model: GPT, seed=0, scale=0.05) -> GPT:
    """Give the zero-initialized parts (gates, outputs, head) and the scalars random values so
    every path of the forward carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.label in ("attn_gate", "smear_gate"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.label in ("lm_head", "attn", "mlp_proj"):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
            elif p.label == "scalars":
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def batch(T=96, vocab=500, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (T,), generator=g, dtype=torch.int32)
    targets = torch.randint(0, vocab, (T,), generator=g)
    cu = torch.tensor([0, 20, 51, 52, 80, T, T, T], dtype=torch.int32)
    return ids, targets, cu


def graph_counter():
    """A dynamo backend that runs each graph as traced and keeps it: (backend, the list of graphs).
    Guards are backend-independent, so the count is what inductor would compile on the GPU."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return backend, graphs


def decode_in_pieces(model, ids, split, cache):
    """The logits of ``ids`` fed through ``cache`` (a KVCache) in chunks of the lengths in ``split``."""
    pieces, at = [], 0
    for n in split:
        pieces.append(model(ids[at:at + n], kv_cache=cache))
        at += n
    return torch.cat(pieces)


# ------------------------------------------------------------------------------------------------
# the oracle: the spec's forward written out directly, float64, loops where it helps reading
# ------------------------------------------------------------------------------------------------
def oracle_logits(model: GPT, ids, cu) -> torch.Tensor:
    cfg, lay = model.cfg, model.layout
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    s = P["scalars"]
    T, d, H, D, L = ids.numel(), cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers
    eps = torch.finfo(torch.float64).eps

    def norm(v):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    ids = ids.long()
    x = P["embed.weight"][ids]
    if cfg.smear:
        smeared = x.clone()
        for t in range(1, T):
            gate = s[lay.smear] * torch.sigmoid(x[t, :cfg.gate_dim] @ P["smear_gate.weight"][0])
            smeared[t] = x[t] + gate * x[t - 1]
        x = smeared
    x0 = norm(x)
    starts = [int(c) for c in cu if int(c) < T]
    doc = [sum(1 for st in starts if st <= t) - 1 for t in range(T)]
    freqs = model.rotary.freqs.float()
    angles = torch.outer(torch.arange(T, dtype=torch.float32), freqs)    # fp32 tables, as the spec
    rot = torch.exp(-1j * angles.double())
    scale = model.rotary.attn_scale.double()
    x, skip, backout = x0, None, None
    for i in range(L):
        pre = f"blocks.{i}."
        if cfg.skip_connection and i == cfg.skip_to_layer:
            x = x + torch.sigmoid(s[lay.skip]) * skip
        if cfg.block_lambdas:
            x = s[lay.block + 2 * i] * x + s[lay.block + 2 * i + 1] * x0
        if cfg.has_attention(i):
            xn = norm(x)
            Wq, Wk, Wv, Wo = P[pre + "attn.qkvo"].view(4, d, d)
            q, k, v = ((xn @ W.T).view(T, H, D) for W in (Wq, Wk, Wv))
            if cfg.qk_norm:
                q, k = norm(q), norm(k)
            if cfg.rotary:
                def rotate(u):
                    z = torch.complex(u[..., :D // 2], u[..., D // 2:]) * rot[:, None, :]
                    return torch.cat([z.real, z.imag], -1)
                q, k = rotate(q), rotate(k)
            if cfg.value_embeds:
                v = s[lay.value + 2 * i] * v
                if cfg.value_embed_layers[i] >= 0:
                    table = P["value_embeds.weight"].view(-1, cfg.padded_vocab_size, d)[cfg.value_embed_layers[i]]
                    ve = table[ids].view(T, H, D)
                    v = v + s[lay.value + 2 * i + 1] * ve
            blocks = (model.window.long if i in cfg.long_window_layers else model.window.short) if model.window else None
            window = math.inf if blocks is None else blocks * cfg.block_size
            y = torch.zeros(T, H, D, dtype=torch.float64)
            for t in range(T):
                keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j <= window]
                for h in range(H):
                    p = torch.softmax(scale * (k[keys, h] @ q[t, h]), 0)
                    y[t, h] = p @ v[keys, h]
            if cfg.attn_gate:
                y = y * torch.sigmoid(xn[:, :cfg.gate_dim] @ P[pre + "attn.gate.weight"].T)[:, :, None]
            x = x + y.reshape(T, d) @ Wo.T
        h = norm(x) @ P[pre + "mlp.c_fc"]
        h = F.relu(h) ** 2 if cfg.relu_squared else F.gelu(h)
        x = x + h @ P[pre + "mlp.c_proj"].T
        if cfg.skip_connection and i == cfg.skip_from_layer:
            skip = x
        if cfg.backout and i == cfg.backout_layer:
            backout = x
    if cfg.backout:
        x = x - s[lay.backout] * backout
    logits = norm(x) @ P["lm_head.weight"].T
    cap = cfg.logit_softcap
    return cap * torch.sigmoid(logits / (cap / 4)) if cap > 0 else logits


def check_against_oracle(cfg, windows=Window(1, 3), backend="sdpa"):
    cfg = dataclasses.replace(cfg, attention_backend=backend)
    torch.manual_seed(0)
    model = randomized(GPT(cfg, torch.float64, flex_block_size=16))
    if windows is not None:
        model.set_window(Window(1, 2))
        model.set_window(windows)       # a YaRN update, so rescaled frequencies/scale are exercised
    ids, _, cu = batch()
    with torch.no_grad():
        logits = model(ids, None, cu)
    assert logits.dtype == torch.float32 and logits.shape == (ids.numel(), cfg.padded_vocab_size)
    # the model returns fp32 logits: compare at fp32 resolution
    torch.testing.assert_close(logits.double(), oracle_logits(model, ids, cu), rtol=2e-6, atol=2e-5)
    return model


def test_forward_matches_oracle_all_on():
    model = check_against_oracle(small_cfg())
    assert model.rotary.attn_scale.item() != pytest.approx(0.1)   # YaRN did act


def test_forward_matches_oracle_flex():
    check_against_oracle(small_cfg(), backend="flex")


def test_forward_matches_oracle_no_window():
    check_against_oracle(small_cfg(), windows=None)


@pytest.mark.parametrize("switch", SWITCHES)
def test_switch_off_matches_oracle(switch):
    check_against_oracle(small_cfg(**{switch: False}))


def test_softcap_off_matches_oracle():
    check_against_oracle(small_cfg(logit_softcap=0.0))


def test_everything_off_is_plain_transformer():
    cfg = small_cfg(**{s: False for s in SWITCHES}, logit_softcap=0.0, zero_init_outputs=False,
                    fp8_head=False)
    model = check_against_oracle(cfg)
    labels = {p.label for p in model.parameters()}
    assert labels == {"embed", "lm_head", "scalars", "attn", "mlp_fc", "mlp_proj"}


# ------------------------------------------------------------------------------------------------
# switched off == neutral values of the switched-on technique
# ------------------------------------------------------------------------------------------------
NEUTRAL = {
    # switch: (scalar slot name, offset, value) set on the "on" model to make it neutral
    "block_lambdas": lambda m, s: [s.__setitem__(m.layout.block + 2 * i + j, v)
                                   for i in range(m.cfg.num_layers) for j, v in ((0, 1.0), (1, 0.0))],
    "smear": lambda m, s: s.__setitem__(m.layout.smear, 0.0),
    "skip_connection": lambda m, s: s.__setitem__(m.layout.skip, -1e4),
    "backout": lambda m, s: s.__setitem__(m.layout.backout, 0.0),
    "value_embeds": lambda m, s: [s.__setitem__(m.layout.value + 2 * i + j, v)
                                  for i in range(m.cfg.num_layers) for j, v in ((0, 1.0), (1, 0.0))],
}


@pytest.mark.parametrize("switch", sorted(NEUTRAL))
def test_off_equals_neutral_on(switch):
    torch.manual_seed(0)
    on = randomized(GPT(small_cfg(), torch.float64))
    with torch.no_grad():
        NEUTRAL[switch](on, on.scalars)
    off = GPT(small_cfg(**{switch: False}), torch.float64)
    state = {k: v for k, v in on.state_dict().items() if k != "scalars"}
    missing, unexpected = off.load_state_dict(state, strict=False)
    assert missing == ["scalars"]
    with torch.no_grad():   # the off model's scalars: the on model's sections that it has
        for name in ("skip", "block", "value", "smear", "backout"):
            start, size = getattr(off.layout, name), 2 * 5 if name in ("block", "value") else 1
            if start is not None:
                off.scalars[start:start + size] = on.scalars[getattr(on.layout, name):][:size]
    ids, targets, cu = batch()
    on.set_window(Window(1, 3))
    off.set_window(Window(1, 3))
    with torch.no_grad():
        torch.testing.assert_close(on(ids, targets, cu), off(ids, targets, cu), rtol=1e-12, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# record config: inventory, layout, init
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def record():
    torch.manual_seed(0)
    return GPT(ModelConfig(), torch.bfloat16)


def test_record_inventory(record):
    print("\n" + record.format_inventory())
    inv = record.inventory()
    by_label = {}
    for name, shape, dtype, label, count in inv:
        by_label.setdefault(label, []).append((shape, dtype))
    assert record.cfg.padded_vocab_size == 50304
    assert by_label["embed"] == [((50304, 768), "bfloat16")]
    assert by_label["value_embed"] == [((3 * 50304, 768), "bfloat16")]      # one parameter, 3 tables
    assert by_label["lm_head"] == [((50304, 768), "bfloat16")]
    assert by_label["attn"] == [((768, 3072), "float32")] * 10
    assert by_label["mlp_fc"] == [((768, 3072), "float32")] * 11
    assert by_label["mlp_proj"] == [((768, 3072), "float32")] * 11
    assert by_label["smear_gate"] == [((1, 12), "bfloat16")]
    assert by_label["attn_gate"] == [((6, 12), "bfloat16")] * 10
    assert by_label["scalars"] == [((48,), "float32")]
    assert set(by_label) == LABELS
    assert record.num_params() == 268_665_612                      # "about 268.7M"
    assert record.num_params(exclude_embeddings=True) == 114_131_724  # "about 114M"
    assert record.blocks[6].attn is None                           # reference slot 7


def test_record_scalars_layout(record):
    """[skip logit, block lambdas (2L), value lambdas (2L), smear, backout]: 47 values, one of padding."""
    s, L = record.scalars.detach(), 11
    assert s.numel() == 48 and record.layout.used == 4 * L + 3 and s.dtype == torch.float32 and s[47] == 1
    assert s[0] == -1.5 and record.layout.skip == 0
    assert torch.all(s[1:2 * L + 1:2] == 1.1) and torch.all(s[2:2 * L + 1:2] == 0.0)
    assert torch.all(s[2 * L + 1:4 * L + 1] == 0.5)
    assert s[4 * L + 1] == 0.0 and s[4 * L + 2] == 0.5
    assert (record.layout.block, record.layout.value, record.layout.smear, record.layout.backout) == \
        (1, 2 * L + 1, 4 * L + 1, 4 * L + 2)
    assert torch.sigmoid(s[record.layout.skip]).item() == pytest.approx(0.1824, abs=1e-4)


def test_record_init(record):
    bound = math.sqrt(3) * 0.5 * 768 ** -0.5
    assert bound == pytest.approx(0.03125, abs=1e-4)
    e = record.embed.weight.float()
    assert abs(e.mean().item()) < 1e-3 and e.std().item() == pytest.approx(1.0, abs=1e-2)
    for table in record.value_embeds.tables():
        assert table.float().std().item() == pytest.approx(1.0, abs=1e-2)
    assert torch.all(record.lm_head.weight == 0) and torch.all(record.smear_gate.weight == 0)
    for block in record.blocks:
        fc = block.mlp.c_fc
        assert fc.abs().max() <= bound and fc.abs().max() > 0.99 * bound
        assert fc.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert torch.all(block.mlp.c_proj == 0)
        if block.attn is not None:
            w = block.attn.qkvo.view(4, 768, 768)
            assert w[:3].abs().max() <= bound and w[:3].abs().max() > 0.99 * bound
            assert torch.all(w[3] == 0)
            assert torch.all(block.attn.gate.weight == 0)


def test_labels_and_storage_dtypes():
    model = GPT(small_cfg(), torch.bfloat16)
    for name, p in model.named_parameters():
        assert p.label in LABELS, name
        fp32 = p.label in ("attn", "mlp_fc", "mlp_proj", "scalars")
        assert p.dtype == (torch.float32 if fp32 else torch.bfloat16), name


def test_zero_init_outputs_off():
    model = GPT(small_cfg(zero_init_outputs=False))
    assert model.lm_head.weight.abs().max() > 0
    assert all(b.mlp.c_proj.abs().max() > 0 for b in model.blocks)
    assert all(b.attn.qkvo.view(4, 64, 64)[3].abs().max() > 0 for b in model.blocks if b.attn)


# ------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------
def test_loss_reductions_agree():
    torch.manual_seed(0)
    model = randomized(GPT(small_cfg()))
    model.set_window(Window(1, 3))
    ids, targets, cu = batch()
    T = ids.numel()
    with torch.no_grad():
        total = model(ids, targets, cu)                      # "sum" is the default
        mean = model(ids, targets, cu, reduction="mean")
        per_token = model(ids, targets, cu, reduction="none")
        logits = model(ids, None, cu)
    assert total.dtype == mean.dtype == per_token.dtype == torch.float32
    assert total.ndim == 0 and per_token.shape == (T,)
    torch.testing.assert_close(total / T, mean)
    torch.testing.assert_close(per_token.mean(), mean)
    torch.testing.assert_close(per_token, F.cross_entropy(logits, targets, reduction="none"))


def test_chunked_eval_equals_unchunked():
    torch.manual_seed(0)
    model = randomized(GPT(small_cfg()))
    ids, targets, cu = batch()
    with torch.no_grad():
        model.eval_chunk_tokens = 1 << 20
        full_mean = model(ids, targets, cu, reduction="mean")
        full_none = model(ids, targets, cu, reduction="none")
        model.eval_chunk_tokens = 13                         # uneven chunks
        torch.testing.assert_close(model(ids, targets, cu, reduction="mean"), full_mean)
        torch.testing.assert_close(model(ids, targets, cu, reduction="none"), full_none)


def test_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        GPT(small_cfg())(torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long),
                         reduction="avg")


def test_training_backward_bf16_and_fp8_dispatch_on_cpu(monkeypatch):
    """bf16 model on CPU: training loss is fp32, gradients land in the storage dtypes, and the FP8
    op is not used (CPU has no FP8 kernels: the twin is chosen)."""
    monkeypatch.setattr(F8, "fp8_linear", lambda *a: (_ for _ in ()).throw(AssertionError("fp8 on CPU")))
    torch.manual_seed(0)
    model = randomized(GPT(small_cfg(fp8_head=True), torch.bfloat16))
    assert model.cfg.fp8_head and not model.fp8_head_active(torch.device("cpu"))   # no FP8 on a CPU
    model.train()
    ids, targets, cu = batch()
    loss = model(ids, targets, cu)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == p.dtype, name


def test_single_document_default_and_int64_inputs():
    torch.manual_seed(0)
    model = randomized(GPT(small_cfg()))
    ids, targets, _ = batch()
    whole = torch.tensor([0, ids.numel()], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.long(), targets), model(ids, targets, whole))


# ------------------------------------------------------------------------------------------------
# windows, YaRN, compilation
# ------------------------------------------------------------------------------------------------
def test_set_window_yarn_and_reset():
    model = GPT(small_cfg(block_size=128, head_dim=32))
    model.set_window(Window(1, 3))                                    # first call records, no update
    assert model.rotary.attn_scale.item() == pytest.approx(0.1)
    assert model.window_long.item() == 384 and model.window_short.item() == 128
    expected = [0.11695, 0.12752, 0.13178]
    for window, scale in zip([Window(3, 7), Window(5, 11), Window(6, 13)], expected):
        model.set_window(window)
        assert model.rotary.attn_scale.item() == pytest.approx(scale, abs=5e-6)
    freqs = model.rotary.freqs.clone()
    model.set_window(Window(6, 20), update_yarn=False)                # final validation: no YaRN update
    assert model.window_long.item() == 2560 and model.rotary.attn_scale.item() == pytest.approx(0.13178, abs=5e-6)
    assert torch.equal(model.rotary.freqs, freqs)
    model.reset_window()
    assert model.rotary.attn_scale.item() == pytest.approx(0.1)
    assert torch.equal(model.rotary.freqs, model.rotary.base_freqs)
    assert model.window is None


def test_yarn_off_keeps_scale():
    model = GPT(small_cfg(yarn=False))
    model.set_window(Window(1, 3))
    model.set_window(Window(3, 7))
    assert model.rotary.attn_scale.item() == pytest.approx(0.1)
    assert torch.equal(model.rotary.freqs, model.rotary.base_freqs)


def test_window_changes_do_not_recompile():
    """Regional compilation: one graph per block variant (+ embed, loss); windows/YaRN changes and
    new document layouts reuse them. Dynamo guards are backend-independent, so a counting backend
    on CPU shows what inductor would compile on the GPU."""
    torch._dynamo.reset()
    counting_backend, graphs = graph_counter()
    torch.manual_seed(0)
    model = randomized(GPT(small_cfg()))
    model.compile_regions(backend=counting_backend)
    ids, targets, _ = batch(T=128)
    g = torch.Generator().manual_seed(3)
    counts = []
    model.set_window(Window(1, 3))
    for long in (3, 7, 11, 13):
        model.set_window(Window(max(1, long // 2), long))
        for _ in range(2):
            starts = torch.randperm(127, generator=g)[:5].sort().values + 1
            cu = torch.cat([torch.tensor([0]), starts, torch.tensor([128, 128])]).to(torch.int32)
            model(ids, targets, cu).backward()
        counts.append(len(graphs))
    # embed + 2 block variants (attention with a real or a zero value embedding, mlp+skip) +
    # training loss, all made at the first step
    assert counts == [4, 4, 4, 4]
    torch._dynamo.reset()


def test_compiled_regions_match_eager():
    """The compiled model (which gives attention layers without a value embedding a zero one to
    share one graph) computes the eager model's loss and gradients."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomized(GPT(small_cfg()))
    compiled = copy.deepcopy(eager).compile_regions(backend="eager")
    ids, targets, cu = batch(T=128)
    for m in (eager, compiled):
        m.set_window(Window(1, 3))
        m(ids, targets, cu).backward()
    assert compiled._compiled and not eager._compiled
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    layout = eager.layout
    # l1 lambdas of layers without a value embedding (2: attention, 3: MLP only): zero gradient
    for i in (2, 3):
        assert compiled.scalars.grad[layout.value + 2 * i + 1] == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("impl", ["fa3", "fa4"])
def test_compiled_flash_backend_matches_eager_sdpa(monkeypatch, impl):
    """The flash backend inside compiled blocks computes the sdpa model's loss and gradients, with
    the training documents' bound (max_doc_len) and each layer's window reaching the kernel; window
    changes compile nothing new (the window is a CPU tensor). FA4 runs as custom ops traced into the
    blocks (compiled through AOTAutograd here, so their fake and autograd registrations are used),
    FA3 behind a graph break. Both packages are faked (tests/flash_fakes.py); the GPU tests run FA4."""
    import flash_fakes
    from torch._dynamo.utils import counters

    from speedrun.model import attention as A
    from speedrun.model import gpt as G
    calls = []
    (flash_fakes.install_fa3 if impl == "fa3" else flash_fakes.install_fa4)(monkeypatch, calls)
    monkeypatch.setattr(G, "resolve_backend", lambda name, device, *shape: name)   # flash on the CPU
    A.flash_attn_impl.cache_clear()
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        eager = randomized(GPT(small_cfg()))
        compiled = copy.deepcopy(eager)
        compiled.cfg = dataclasses.replace(compiled.cfg, attention_backend="flash")
        compiled.compile_regions(backend="aot_eager")
        compiled.max_doc_len = 64      # >= the longest document of batch(T=96): 31 tokens
        ids, targets, cu = batch(T=96)
        graphs = []
        for long, short in ((3, 1), (7, 3)):
            for m in (eager, compiled):
                m.zero_grad(set_to_none=True)
                m.set_window(Window(short, long))
            losses = [m(ids, targets, cu) for m in (eager, compiled)]
            for loss in losses:
                loss.backward()
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
            for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[1] == graphs[0], "a window change recompiled"
        # 4 attention layers per forward (2 short, 2 long), windows in tokens (blocks of 16): stage
        # one 16 and 48, stage two 48 and 112, which reaches past max_doc_len and is passed as 64
        assert [w for kind, w in calls if kind == "fwd"] == [16, 16, 48, 48] + [48, 48, 64, 64]
        # eval keeps T as the bound (validation documents are not capped: the fake checks it)
        compiled.eval()
        with torch.no_grad():
            compiled(ids, targets, torch.tensor([0, 96], dtype=torch.int32), reduction="mean")
    finally:
        A.flash_attn_impl.cache_clear()
        torch._dynamo.reset()


@pytest.mark.parametrize("head_dim, dtype, chosen", [(32, torch.bfloat16, "flash"), (32, torch.float32, "flex"),
                                                     (12, torch.bfloat16, "flex")])
def test_model_resolves_auto_attention_with_its_head_size_and_dtype(monkeypatch, head_dim, dtype, chosen):
    """What the trainer and bench ask (GPT.attention_backend) is what the forward runs: auto's FA4
    choice on an H100 (faked here) sees the config's head size and the model's dtype."""
    from speedrun.model import attention as A
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(A, "flash_attn_impl", lambda: "fa4")
    A._fa4_on_hopper.cache_clear()
    try:
        model = GPT(small_cfg(attention_backend="auto", head_dim=head_dim, model_dim=2 * head_dim), dtype)
        assert model.attention_backend(torch.device("cuda", 0)) == chosen
        assert model.attention_backend(torch.device("cpu")) == "sdpa"
    finally:
        A._fa4_on_hopper.cache_clear()
