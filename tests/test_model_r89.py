"""Record 89's embedding / residual-stream switches (issue 16): the forward against the independent
float64 oracle (tests/r89_helpers.py) with every switch on, each one off, and mixed with record 45's;
the coefficients handed to attention; "switched off == neutral values"; the bigram hash; the record's
lane layout and parameter inventory against the public code's tables; init; regional compilation
without recompiles (window stages, the untie); the KV-cache decoder; weights saved with the earlier
layout."""
import copy
import dataclasses
import math

import pytest
import torch
from r89_helpers import r89_oracle, randomized89, small_r89
from test_model_gpt import batch, decode_in_pieces, graph_counter, small_cfg

from speedrun.config import Config, ConfigError, ModelConfig, Window
from speedrun.model import GPT
from speedrun.model import attention as A
from speedrun.model.embeddings import bigram_hash, sign_index
from speedrun.model.kv_cache import KVCache
from speedrun.model.mudd import gate_groups, gate_lanes, mudd_lanes
from speedrun.model.scalars import legacy_size
from speedrun.optim.build import adam_group, build_optimizers, optimizer_of
from speedrun.presets import record89_model, record89_optim

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

# each record-89 switch turned off (some need a companion: MUDD adds to v only with gated value
# embeddings, and reads the final value-embedding table)
OFF = {
    "bigram_embed": dict(bigram_embed=False),
    "value_embed_gates": dict(value_embed_gates=False, mudd=False),
    "value_embeds": dict(value_embeds=False, mudd_final_value_embed=-1),
    "residual_lambdas": dict(residual_lambdas=False),
    "x0_gates": dict(x0_gates=False),
    "attn_input_layer": dict(attn_input_layer=-1),
    "mudd": dict(mudd=False),
    "mudd_gates": dict(mudd_gates=False),
    "logit_rescale": dict(logit_softcap=30.0, logit_softcap_offset=0.0, logit_softcap_temperature=0.0),
    "tie_embed": dict(tie_embed=False),
    "attention_consumers": dict(xsa_layers=[], attn_out_gate_layers=[], dc_layers=[], attn_lambdas=False),
}


def build(cfg: ModelConfig, seed=0, dtype=torch.float64, windows=Window(1, 3)) -> GPT:
    torch.manual_seed(seed)
    model = randomized89(GPT(cfg, dtype, flex_block_size=16), seed)
    if windows is not None:
        model.set_window(Window(1, 2))
        model.set_window(windows)
    return model


def captured_inputs(monkeypatch) -> dict:
    """What each attention layer receives (LayerInputs), keyed by the layer's module."""
    seen = {}
    real = A.CausalSelfAttention.forward

    def spy(self, x, inp):
        seen[id(self)] = inp
        return real(self, x, inp)
    monkeypatch.setattr(A.CausalSelfAttention, "forward", spy)
    return seen


def check_against_oracle(cfg: ModelConfig, monkeypatch=None):
    model = build(cfg)
    seen = captured_inputs(monkeypatch) if monkeypatch is not None else None
    ids, _, cu = batch()
    with torch.no_grad():
        logits = model(ids, None, cu)
        want, coefficients = r89_oracle(model, ids, cu)
    torch.testing.assert_close(logits.double(), want, rtol=2e-6, atol=2e-5)
    if seen is not None:   # the coefficients the model hands attention, lane by lane
        for i, block in enumerate(model.blocks):
            if block.attn is None:
                continue
            inp, exp = seen[id(block.attn)], coefficients[i]
            got = {"xsa": inp.xsa_alpha, "out_gate": inp.out_gate,
                   "dc_w1": inp.dc_weights[0] if inp.dc_weights else None,
                   "dc_w2": inp.dc_weights[1] if inp.dc_weights else None}
            for name, value in got.items():
                assert (value is None) == (exp[name] is None), (i, name)
                if value is not None:
                    assert value.shape == (ids.numel(), cfg.num_heads), (i, name)
                    torch.testing.assert_close(value.double(), exp[name], rtol=1e-6, atol=1e-7)
            assert (inp.attn_lambdas is None) == (exp["attn_lambdas"] is None)
            if inp.attn_lambdas is not None:
                assert [float(v.detach()) for v in inp.attn_lambdas] == [float(v) for v in exp["attn_lambdas"]]
    return model


# ------------------------------------------------------------------------------------------------
# the forward against the oracle
# ------------------------------------------------------------------------------------------------
def test_forward_matches_oracle_every_switch_on(monkeypatch):
    model = check_against_oracle(small_r89(), monkeypatch)
    assert model.embed_tied and model.mudd is not None and model.gate_mlps is not None


@pytest.mark.parametrize("switch", sorted(OFF))
def test_switch_off_matches_oracle(switch, monkeypatch):
    check_against_oracle(small_r89(**OFF[switch]), monkeypatch)


def test_untied_embedding_matches_oracle():
    model = build(small_r89())
    with torch.no_grad():
        model.embed.weight.copy_(torch.randn(model.embed.weight.shape, generator=torch.Generator().manual_seed(7)))
    model.embed_tied = False     # the embedding's own (different) table is read
    ids, _, cu = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, None, cu).double(), r89_oracle(model, ids, cu)[0], rtol=2e-6, atol=2e-5)


def test_mixed_with_record45_techniques():
    """Record 45's block lambdas and sigmoid attention gates on top of record 89's stream."""
    check_against_oracle(small_r89(block_lambdas=True, attn_gate=True))


def test_record89_switches_on_a_record45_model():
    """Each record-89 switch alone on record 45's small model (value lambdas, backout, ...)."""
    for extra in (dict(bigram_embed=True, bigram_vocab_size=331, bigram_sign_rows=0),
                  dict(residual_lambdas=True, x0_gates=True),
                  dict(x0_gates=True, bigram_embed=True, bigram_vocab_size=331, mudd_gates=True,
                       mudd_gate_layer=2, mudd_hidden=8),
                  dict(attn_input_layer=1, logit_softcap=23.0, logit_softcap_offset=5.0,
                       logit_softcap_temperature=7.5)):
        check_against_oracle(small_cfg(**extra))


def test_all_record89_switches_off_is_record45():
    """record89_model with every switch of this issue off builds record 45's parameters."""
    off = {k: v for d in OFF.values() for k, v in d.items() if k not in ("value_embeds", "logit_softcap",
                                                                         "logit_softcap_temperature")}
    cfg = record89_model(**off, value_embed_layers=ModelConfig().value_embed_layers, attn_gate=True,
                         block_lambdas=True, value_embed_init_std=1.0, head_init_std=0.0,
                         attn_out_init_nonzero=False, logit_softcap=30.0)
    with torch.device("meta"):
        a, b = GPT(cfg, torch.bfloat16), GPT(ModelConfig(), torch.bfloat16)
    assert a.inventory() == b.inventory()


# ------------------------------------------------------------------------------------------------
# switched off == neutral values of the switched-on technique
# ------------------------------------------------------------------------------------------------
def transfer(src: GPT, dst: GPT) -> None:
    """dst <- src wherever both have the value: same-named parameters of one shape, the scalars by
    section, the value-embedding gates by layer (gate coefficients by lane: _copy_lanes)."""
    src_p, dst_p = dict(src.named_parameters()), dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in dst_p.items():
            if name in src_p and src_p[name].shape == p.shape:
                p.copy_(src_p[name])
        if src.ve_gates is not None and dst.ve_gates is not None:    # by layer
            for row, layer in enumerate(dst.gated_ve_layers):
                if layer in src.gated_ve_layers:
                    dst.ve_gates[row] = src.ve_gates[src.gated_ve_layers.index(layer)]
        for section in ("attn", "skip", "block", "value", "smear", "backout"):
            a, b = getattr(src.layout, section), getattr(dst.layout, section)
            n = 2 * src.cfg.num_layers if section in ("attn", "block", "value") else 1
            if a is not None and b is not None:
                dst.scalars[b:b + n] = src.scalars[a:a + n]


def loss_of(model, seed=1):
    ids, targets, cu = batch(seed=seed)
    with torch.no_grad():
        return model(ids, targets, cu)


def test_bigram_zero_table_equals_bigram_off():
    cfg = small_r89(mudd_gates=False)      # constants: the lanes of both models line up by key
    on = build(cfg)
    with torch.no_grad():
        on.bigram.weight.zero_()
    off = GPT(small_r89(mudd_gates=False, bigram_embed=False), torch.float64)
    transfer(on, off)
    _copy_lanes(on, off)
    off.set_window(Window(1, 3))
    off.rotary.load_state_dict(on.rotary.state_dict())
    torch.testing.assert_close(loss_of(on), loss_of(off), rtol=1e-12, atol=1e-9)


def _copy_lanes(src: GPT, dst: GPT) -> None:
    with torch.no_grad():
        if src.gate_constants is not None and dst.gate_constants is not None:
            by_key = {(ln.kind, ln.layer): ln for ln in src.gate_constants.lanes}
            for ln in dst.gate_constants.lanes:
                s_ln = by_key[(ln.kind, ln.layer)]
                dst.gate_constants.values[ln.start:ln.start + ln.width] = \
                    src.gate_constants.values[s_ln.start:s_ln.start + s_ln.width]
        if src.mudd is not None and dst.mudd is not None:
            for block in range(2):
                by_key = {(ln.kind, ln.layer): ln for ln in src.mudd.blocks[block]}
                for ln in dst.mudd.blocks[block]:
                    s_ln = by_key[(ln.kind, ln.layer)]
                    dst.mudd.w2[block][ln.start:ln.start + ln.width] = src.mudd.w2[block][s_ln.start:s_ln.start + ln.width]
                    dst.mudd.b2[block][ln.start:ln.start + ln.width] = src.mudd.b2[block][s_ln.start:s_ln.start + ln.width]


def test_zero_x0_gates_and_unit_lambdas_equal_them_off():
    cfg = small_r89(mudd_gates=False, mudd=False)
    on = build(cfg)
    with torch.no_grad():
        for ln in on.gate_constants.lanes:
            if ln.kind == "x0":
                on.gate_constants.values[ln.start] = 0.0
        on.resid_lambdas.fill_(1.0)
        on.post_lambdas.fill_(1.0)
    off = GPT(small_r89(mudd_gates=False, mudd=False, x0_gates=False, residual_lambdas=False), torch.float64)
    transfer(on, off)
    _copy_lanes(on, off)
    off.rotary.load_state_dict(on.rotary.state_dict())
    off.set_window(Window(1, 3))
    torch.testing.assert_close(loss_of(on), loss_of(off), rtol=1e-12, atol=1e-9)


def test_mudd_gates_with_constant_output_equal_the_constants():
    """Gate MLPs whose output weights are zero give their biases times the scale: the learned
    constants of the same values compute the same model."""
    on = build(small_r89())
    off = GPT(small_r89(mudd_gates=False), torch.float64)
    transfer(on, off)
    off.rotary.load_state_dict(on.rotary.state_dict())
    off.set_window(Window(1, 3))
    with torch.no_grad():
        constants = {}
        for g, lanes in enumerate(on.gate_mlps.blocks):
            on.gate_mlps.w2[g].zero_()
            for ln in lanes:
                if ln.kind == "skip":             # no skip gate without mudd_gates: make it 1
                    on.gate_mlps.b2[g][ln.start] = 1.0 / on.gate_mlps.scale
                constants[(ln.kind, ln.layer)] = on.gate_mlps.b2[g][ln.start:ln.start + ln.width] * on.gate_mlps.scale
        for ln in off.gate_constants.lanes:
            off.gate_constants.values[ln.start:ln.start + ln.width] = constants[(ln.kind, ln.layer)]
    torch.testing.assert_close(loss_of(on), loss_of(off), rtol=1e-12, atol=1e-9)


def test_neutral_mudd_equals_mudd_off():
    """MUDD with zero output weights, zero source coefficients and the off model's gates / lambdas /
    backout as its biases computes the model without MUDD (record 45's backout included)."""
    cfg = small_r89(mudd_gates=False, x0_gates=False, bigram_embed=False)
    on = build(cfg)
    off = GPT(small_r89(mudd_gates=False, x0_gates=False, bigram_embed=False, mudd=False), torch.float64)
    transfer(on, off)
    off.rotary.load_state_dict(on.rotary.state_dict())
    off.set_window(Window(1, 3))
    L = cfg.mudd_layer
    with torch.no_grad():
        scale = cfg.mudd_scale
        want = {("resid_attn", L): off.resid_lambdas[L, 0], ("post_attn", L): off.post_lambdas[L, 0],
                ("resid_mlp", L): off.resid_lambdas[L, 1], ("post_mlp", L): off.post_lambdas[L, 1],
                ("ve_gate", L): torch.tensor(1.0),     # the off model's gate at W = 0: 2 sigmoid(0)
                ("final_source", cfg.backout_layer): -off.scalars[off.layout.backout]}
        off.ve_gates[off.gated_ve_layers.index(L)].zero_()
        for block in range(2):
            on.mudd.w2[block].zero_()
            for ln in on.mudd.blocks[block]:
                value = torch.as_tensor(want.get((ln.kind, ln.layer), 0.0)).double()   # no fp32 rounding
                on.mudd.b2[block][ln.start:ln.start + ln.width] = value / scale
    torch.testing.assert_close(loss_of(on), loss_of(off), rtol=1e-12, atol=1e-9)


def test_ungated_value_embeddings_equal_zero_gates_and_unit_lambdas():
    """Gates at W = 0 give 2 sigmoid(0) = 1: v + ve, which is record 45's v <- 1 v + 1 ve."""
    on = build(small_r89(mudd=False))
    with torch.no_grad():
        on.ve_gates.zero_()
    off = GPT(small_r89(mudd=False, value_embed_gates=False), torch.float64)
    transfer(on, off)
    with torch.no_grad():
        off.scalars[off.layout.value:off.layout.value + 2 * 6] = 1.0
    off.rotary.load_state_dict(on.rotary.state_dict())
    off.set_window(Window(1, 3))
    torch.testing.assert_close(loss_of(on), loss_of(off), rtol=1e-12, atol=1e-9)


def test_tied_equals_untied_with_the_heads_values():
    tied = build(small_r89())
    untied = copy.deepcopy(tied)
    untied.untie_embed()
    assert not untied.embed_tied and torch.equal(untied.embed.weight, tied.lm_head.weight)
    torch.testing.assert_close(loss_of(tied), loss_of(untied), rtol=0, atol=0)
    # tied, the embedding's gradient lands in the lm_head's (autograd sums both uses)
    ids, targets, cu = batch()
    tied(ids, targets, cu).backward()
    untied(ids, targets, cu).backward()
    assert tied.embed.weight.grad is None
    torch.testing.assert_close(tied.lm_head.weight.grad, untied.lm_head.weight.grad + untied.embed.weight.grad)


# ------------------------------------------------------------------------------------------------
# bigram hash
# ------------------------------------------------------------------------------------------------
def test_bigram_hash_and_sign_index():
    """Against the formula in Python integers; the record's example tokens; decoding continues the
    hash across chunks; position 0 takes the reserved row (record: the quirk at position 1 is not
    reproduced, r89-model.md 2.1)."""
    M = 50304 * 15 // 2 - 1
    got = bigram_hash(torch.tensor([50256, 464, 3290], dtype=torch.int32), None, M + 1)
    assert got.tolist() == [377279, 143001, 349207]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50304, (200,), generator=g, dtype=torch.int32)
    tok = ids.tolist()
    # the record's int32 arithmetic: the products stay below 2^31, xor and mod are of non-negatives
    want = [M] + [(((36313 * tok[t]) & 0xFFFFFFFF) ^ ((27191 * tok[t - 1]) & 0xFFFFFFFF)) % M for t in range(1, 200)]
    assert bigram_hash(ids, None, M + 1).tolist() == want
    assert sign_index(ids, None, 8192).tolist() == [0] + [(tok[t - 1] ^ tok[t]) % 8192 for t in range(1, 200)]
    joined = torch.cat([bigram_hash(ids[:50], None, M + 1), bigram_hash(ids[50:], ids[49:50], M + 1)])
    assert torch.equal(joined, bigram_hash(ids, None, M + 1))
    joined = torch.cat([sign_index(ids[:7], None, 64), sign_index(ids[7:], ids[6:7], 64)])
    assert torch.equal(joined, sign_index(ids, None, 64))


def test_bigram_sign_table_is_fixed_and_signs():
    a, b = GPT(small_r89()), GPT(small_r89())
    assert torch.equal(a.bigram.signs, b.bigram.signs)
    assert set(a.bigram.signs.unique().tolist()) == {-1.0, 1.0}
    # the table does not consume the global RNG: the rest of the init is the same with it off
    torch.manual_seed(5)
    on = GPT(small_r89())
    torch.manual_seed(5)
    off = GPT(small_r89(bigram_embed=False))
    assert torch.equal(on.blocks[4].mlp.c_fc, off.blocks[4].mlp.c_fc)


# ------------------------------------------------------------------------------------------------
# the record's layout and inventory against the public code
# ------------------------------------------------------------------------------------------------
def test_record89_lane_layout_is_the_public_one():
    """Gate lanes (r89-model.md 5.2, 5.3) and MUDD lanes (4.2, 4.3) with their effective inits."""
    cfg = record89_model()
    pre, post = (gate_lanes(cfg, layers) for layers in gate_groups(cfg))

    def table(lanes):
        return [(ln.kind, ln.layer, ln.start, ln.width, ln.init) for ln in lanes]
    assert table(pre) == [("xsa", 1, 0, 6, 0.0), ("xsa", 3, 6, 6, 0.0), ("out_gate", 3, 12, 6, 0.25)] + [
        (kind, layer, 18 + 2 * n + j, 1, (0.0, 0.05)[j])
        for n, layer in enumerate((0, 1, 2, 3)) for j, kind in enumerate(("x0", "bigram"))]
    assert table(post) == [("xsa", 4, 0, 6, 0.0), ("xsa", 7, 6, 6, 0.0), ("out_gate", 10, 12, 6, 0.25)] + [
        (kind, layer, 18 + 2 * n + j, 1, (0.0, 0.05)[j])
        for n, layer in enumerate((4, 5, 7, 8, 9)) for j, kind in enumerate(("x0", "bigram"))] + [
        ("skip", 6, 28, 1, 0.5), ("dc_w1", 10, 29, 6, 1.0), ("dc_w2", 10, 35, 6, 0.0)]
    at, final = mudd_lanes(cfg)
    sub = math.sqrt(1.1)
    assert table(at) == [
        ("value_source", -1, 0, 1, 0.0), ("value_source", 7, 1, 1, 0.0), ("value_source", 9, 2, 1, 0.0),
        ("residual_source", -1, 3, 1, 0.0), ("residual_source", 7, 4, 1, 0.0), ("self", 10, 5, 1, 0.0),
        ("ve_gate", 10, 6, 2, 2.0), ("resid_attn", 10, 8, 1, sub), ("post_attn", 10, 9, 1, 1.0),
        ("x0", 10, 10, 1, 0.0), ("bigram", 10, 11, 1, 0.05), ("resid_mlp", 10, 12, 1, sub),
        ("post_mlp", 10, 13, 1, 1.0)]
    # the public order is cache[0], cache[7], cache[9], ve bank 0, cache[3]: the same set (the
    # value embedding last here); the backout is cache[7]'s -0.5
    assert table(final) == [("final_source", -1, 0, 1, 0.0), ("final_source", 7, 1, 1, -0.5),
                            ("final_source", 9, 2, 1, 0.0), ("final_source", 3, 3, 1, 0.0),
                            ("final_value_embed", 0, 4, 1, 0.0)]


# The public code's parameters (r89-model.md section 10, built from train_gpt.py at f411b3d3):
# name, shape, optimizer, betas, lr_mul, wd_mul. NorMuon rows: their lr multipliers are issue 18's.
PUBLIC = [
    ("value_embeds", (251520, 768), "adam", (0.75, 0.95), 75.0, 5.0),
    ("ve_gate_bank", (5, 6, 12), "adam", (0.9, 0.99), 1.0, 1.0),
    ("qk_bank", (64, 256, 768), "muon", None, None, None),
    ("vo_bank", (24, 768, 768), "muon", None, None, None),
    ("mlp_bank", (12, 2, 3072, 768), "muon", None, None, None),
    ("post_lambdas", (11, 2), "adam", (0.9, 0.95), 1.0, 0.0),
    ("resid_lambdas", (11, 2), "adam", (0.9, 0.95), 5.0, 0.0),
    ("scalars", (24,), "adam", (0.9, 0.99), 5.0, 0.0),
    ("mudd_w1", (2, 64, 768), "adam", (0.9, 0.99), 0.25, 1.0),
    ("mudd_w2", (2, 14, 64), "adam", (0.9, 0.99), 0.25, 1.0),
    ("mudd_b2", (2, 14), "adam", (0.9, 0.99), 0.25, 0.0),
    ("_mudd_gate_scale", (), "adam", (0.9, 0.99), 0.1, 0.0),
    ("mudd_gate_w1", (2, 64, 768), "adam", (0.9, 0.99), 0.1, 1.0),
    ("mudd_gate_w2", (2, 41, 64), "adam", (0.9, 0.99), 0.1, 1.0),
    ("mudd_gate_b2", (2, 41), "adam", (0.9, 0.99), 0.1, 0.0),
    ("lm_head", (768, 50304), "adam", (0.5, 0.95), 1.0, 150.0),
    ("embed", (50304, 768), "adam", (0.5, 0.95), 1.0, 150.0),
    ("smear_gate", (1, 12), "adam", (0.9, 0.99), 0.01, 0.0),
    ("bigram_embed", (377280, 768), "adam", (0.75, 0.95), 75.0, 5.0),
]
# public name -> (our parameter names, values of the public tensor not in ours and why)
MAPPING = {
    "value_embeds": (["value_embeds.weight"], 0, ""),
    "ve_gate_bank": (["ve_gates"], 72, "bank 4: never read (layer 10's gate is MUDD's)"),
    "qk_bank": ([f"blocks.{i}.attn.qkvo" for i in range(11) if i != 6], 0, "Q, K"),
    "vo_bank": ([], 0, "V, O: in the same qkvo matrices"),
    "mlp_bank": ([f"blocks.{i}.mlp.{w}" for i in range(11) for w in ("c_fc", "c_proj")], 0, ""),
    "post_lambdas": (["post_lambdas"], 0, ""),
    "resid_lambdas": (["resid_lambdas"], 0, ""),
    "scalars": (["scalars"], 0, ""),
    "mudd_w1": (["mudd.w1"], 0, ""),
    "mudd_w2": (["mudd.w2.0", "mudd.w2.1"], 9 * 64, "post-loop block: lanes 5..13 unused"),
    "mudd_b2": (["mudd.b2.0", "mudd.b2.1"], 9, "post-loop block: lanes 5..13 unused"),
    "_mudd_gate_scale": (["gate_mlps.scale"], 0, ""),
    "mudd_gate_w1": (["gate_mlps.w1"], 0, ""),
    "mudd_gate_w2": (["gate_mlps.w2.0", "gate_mlps.w2.1"], 15 * 64, "pre gate: lanes 26..40 unused"),
    "mudd_gate_b2": (["gate_mlps.b2.0", "gate_mlps.b2.1"], 15, "pre gate: lanes 26..40 unused"),
    "lm_head": (["lm_head.weight"], 0, "stored (V, D) here, (D, V) there: Adam is elementwise"),
    "embed": (["embed.weight"], 0, ""),
    "smear_gate": (["smear_gate.weight"], 0, ""),
    "bigram_embed": (["bigram.weight"], 0, ""),
}
BANK_PADDING = {"qk_bank": 4 * 256 * 768, "vo_bank": 4 * 768 * 768, "mlp_bank": 2 * 3072 * 768}


def test_record89_inventory_and_optimizer_groups_equal_the_public_code():
    cfg, optim = record89_model(), record89_optim()
    Config(model=cfg, optim=optim).validate()
    with torch.device("meta"):
        model = GPT(cfg, torch.bfloat16)
    ours = dict(model.named_parameters())
    mapped = [n for names, _, _ in MAPPING.values() for n in names]
    assert sorted(mapped) == sorted(ours), "every parameter is mapped once"
    total_public = 0
    for name, shape, which, betas, lr_mul, wd_mul in PUBLIC:
        names, unused, _ = MAPPING[name]
        count = math.prod(shape)
        total_public += count
        if name in ("qk_bank", "vo_bank"):
            continue                                      # checked together below
        assert sum(ours[n].numel() for n in names) == count - BANK_PADDING.get(name, 0) - unused, name
        for n in names:
            p = ours[n]
            assert optimizer_of(p.label, optim) == which, (name, n)
            if which == "adam":
                group = adam_group(p.label, optim)
                assert (group["betas"], group["lr_mul"], group["wd_mul"]) == (betas, lr_mul, wd_mul), (name, n)
    attn = sum(ours[n].numel() for n in MAPPING["qk_bank"][0])
    assert attn == 60 * 256 * 768 + 20 * 768 * 768          # Q, K, V, O of 10 layers, no padding
    assert all(ours[n].shape == (768, 4 * 768) for n in MAPPING["qk_bank"][0])   # [Wq; Wk; Wv; Wo]
    assert total_public == 643_751_335                                          # the public total
    removed = sum(BANK_PADDING.values()) + sum(u for _, u, _ in MAPPING.values())
    assert model.num_params() == total_public - removed == 635_885_383   # (24 scalars: no padding)
    assert optim.adam.eps == 1e-10
    # the shapes that carry over one to one
    for name, ours_name in (("value_embeds", "value_embeds.weight"), ("embed", "embed.weight"),
                            ("bigram_embed", "bigram.weight"), ("smear_gate", "smear_gate.weight"),
                            ("resid_lambdas", "resid_lambdas"), ("post_lambdas", "post_lambdas"),
                            ("scalars", "scalars"), ("mudd_w1", "mudd.w1"), ("mudd_gate_w1", "gate_mlps.w1"),
                            ("_mudd_gate_scale", "gate_mlps.scale")):
        assert tuple(ours[ours_name].shape) == dict((p[0], p[1]) for p in PUBLIC)[name], name
    assert tuple(model.bigram.signs.shape) == (8192, 768)
    # dtypes: bf16 except the fp32 lambdas, scalars, gate scale and block matrices (ours: fp32 master)
    fp32 = {n for n, p in ours.items() if p.dtype == torch.float32}
    assert {n for n in fp32 if not n.startswith("blocks.")} == {"scalars", "resid_lambdas", "post_lambdas",
                                                                  "gate_mlps.scale"}
    # all of Adam's groups build (replicated where dim 0 does not shard over 8 ranks)
    build_optimizers(model, optim)


# ------------------------------------------------------------------------------------------------
# init
# ------------------------------------------------------------------------------------------------
def test_record89_init():
    torch.manual_seed(0)
    cfg = small_r89(vocab_size=4000, model_dim=128, head_dim=64)
    model = GPT(cfg)
    d = cfg.model_dim
    bound = math.sqrt(3) * 0.5 * d ** -0.5
    assert torch.equal(model.embed.weight, model.lm_head.weight) and model.embed_tied
    assert model.lm_head.weight.std().item() == pytest.approx(0.005, rel=0.02)
    assert model.value_embeds.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert torch.all(model.bigram.weight == 0) and torch.all(model.ve_gates == 0)
    for block in model.blocks:
        if block.attn is not None:     # record 64: Wo drawn like Wv
            wo = block.attn.qkvo.view(4, d, d)[3]
            assert wo.abs().max() <= bound and wo.abs().max() > 0.99 * bound
        assert torch.all(block.mlp.c_proj == 0)
    assert torch.all(model.resid_lambdas == math.sqrt(1.1)) and torch.all(model.post_lambdas == 1)
    s, lay = model.scalars, model.layout
    assert lay.used == 2 * 6 + 2 and s.numel() == 16 and s[lay.skip] == -1.5 and s[lay.smear] == 0
    assert torch.equal(s[lay.attn:lay.attn + 12], torch.tensor([0.5, 1.0] * 6))
    assert lay.block is None and lay.value is None and lay.backout is None
    # MLP output weights zero: every coefficient starts at its lane's init
    for mlps in (model.mudd, model.gate_mlps):
        assert all(torch.all(w2 == 0) for w2 in mlps.w2)
        assert mlps.w1.abs().max() <= 1 / math.sqrt(d) and mlps.w1.abs().max() > 0.95 / math.sqrt(d)
        for lanes, b2 in zip(mlps.blocks, mlps.b2):
            scale = mlps.scale if mlps.learned_scale else cfg.mudd_scale
            want = torch.tensor([ln.init for ln in lanes for _ in range(ln.width)])
            torch.testing.assert_close(b2 * scale, want)
    assert model.gate_mlps.scale.dtype == torch.float32 and model.gate_mlps.scale.item() == pytest.approx(0.1)
    bf16 = GPT(small_r89(), torch.bfloat16)    # the gates' scale is not rounded through bf16
    assert bf16.gate_mlps.scale.dtype == torch.float32 and bf16.gate_mlps.scale.item() == pytest.approx(0.1)
    assert bf16.gate_mlps.w1.dtype == bf16.mudd.b2[0].dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# compilation
# ------------------------------------------------------------------------------------------------
def test_compiled_regions_no_recompiles_across_windows_and_untie():
    torch._dynamo.reset()
    counting_backend, graphs = graph_counter()
    torch.manual_seed(0)
    model = randomized89(GPT(small_r89()))
    model.compile_regions(backend=counting_backend)
    ids, targets, _ = batch(T=128)
    g = torch.Generator().manual_seed(3)
    counts = []
    model.set_window(Window(1, 3))
    for stage, long in enumerate((3, 7, 11, 13)):
        model.set_window(Window(max(1, long // 2), long))
        if stage == 2:
            model.untie_embed()                     # the embedding becomes its own parameter
        for _ in range(2):
            starts = torch.randperm(127, generator=g)[:5].sort().values + 1
            cu = torch.cat([torch.tensor([0]), starts, torch.tensor([128, 128])]).to(torch.int32)
            model(ids, targets, cu).backward()
        counts.append(len(graphs))
    assert counts[0] == counts[-1], counts          # everything compiled at the first step
    torch._dynamo.reset()


@pytest.mark.parametrize("lengths", [(128, 256, 384, 128), (64, 128, 192)])
def test_dynamic_compile_serves_every_length_with_the_first_graphs(lengths):
    """compile_regions(dynamic=True): micro-batches of 128, 256 and 384 tokens (the paired layers at
    twice that) run the graphs traced at the first length, with the eager model's loss and grads.
    A first length of 64 tokens equals the width: with dynamo's duck shaping the token count took
    the width's symbol, the width specialised and every later length recompiled each block (the
    GPU's paired layers hit the same with 64 mask blocks = 64 rotary columns); compile_regions
    turns duck shaping off."""
    torch._dynamo.reset()
    counting_backend, graphs = graph_counter()
    torch.manual_seed(0)
    eager = randomized89(GPT(small_r89(paired_head_layers=[0, 2], key_offset=True)))
    assert eager.cfg.model_dim == 64
    compiled = copy.deepcopy(eager).compile_regions(dynamic=True, backend=counting_backend)
    counts = []
    for T in lengths:
        ids, targets, _ = batch(T, seed=T)
        cu = torch.tensor([0, T // 5, T // 3, T // 3 + 1, T // 2, T, T, T], dtype=torch.int32)
        losses = []
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            m.set_window(Window(1, 3))
            losses.append(m(ids, targets, cu))
            losses[-1].backward()
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-5)
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
        counts.append(len(graphs))
    assert counts == [counts[0]] * len(lengths), counts
    # the token count stayed a symbol; the width did not (it meets the parameters' static shapes)
    placeholders = [n.meta.get("example_value") for gm in graphs for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(t.shape) for t in placeholders if isinstance(t, torch.Tensor)]
    def constant(n):     # an int, or a symbol the graph's guards fixed to a number
        return type(n) is int or n.node.expr.is_number
    streams = [s for s in shapes if len(s) == 2 and not constant(s[0])]   # (T, ...) inputs
    assert streams and any(constant(s[1]) and s[1] == 64 for s in streams), shapes
    # the config's floats (softcap, offset, temperature, MUDD scale) are constants, not float inputs
    # read back with .item() (compile_regions specialises floats)
    items = [n for gm in graphs for n in gm.graph.nodes if n.op == "call_method" and n.target == "item"]
    assert not items, [n.format_node() for n in items]
    torch._dynamo.reset()


def test_compiled_regions_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = randomized89(GPT(small_r89()))
    compiled = copy.deepcopy(eager).compile_regions(backend="eager")
    ids, targets, cu = batch(T=128)
    losses = []
    for m in (eager, compiled):
        m.set_window(Window(1, 3))
        losses.append(m(ids, targets, cu))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is None:
            assert b.grad is None, name
        else:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split", [[40], [1] * 40, [7, 1, 1, 12, 1, 18]])
def test_kv_cache_equals_full_forward_every_switch_on(split):
    model = build(small_r89(), dtype=torch.float32).eval()
    ids = torch.randint(0, 500, (sum(split),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        decoded = decode_in_pieces(model, ids, split, KVCache(model, 48))
    torch.testing.assert_close(decoded, full, atol=1e-4, rtol=1e-4)


def test_kv_cache_on_a_compiled_model_runs_eager_regions():
    """Decoding chunks of any length on a compiled model compiles nothing (its gate / MUDD regions
    run eagerly, as the blocks do) and still equals the full forward."""
    torch._dynamo.reset()
    counting_backend, graphs = graph_counter()
    model = build(small_r89(), dtype=torch.float32).eval()
    model.compile_regions(backend=counting_backend)
    ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        before = len(graphs)
        cache = KVCache(model, 24)
        got = torch.cat([model(ids[a:b], kv_cache=cache) for a, b in ((0, 5), (5, 6), (6, 13), (13, 24))])
    assert len(graphs) == before
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------
# weights saved with the earlier layout; config errors
# ------------------------------------------------------------------------------------------------
def test_weights_of_the_earlier_layout_load():
    """Record 45's weights as saved before this layout (scalars [skip logits (L), block, value,
    smear, backout] padded to a multiple of 8; value_embeds.{k}.weight) load and compute the same."""
    torch.manual_seed(0)
    model = randomized89(GPT(small_cfg(), torch.float64))
    model.set_window(Window(1, 3))
    L, lay = 5, model.layout
    state = model.state_dict()
    old = torch.ones(legacy_size(L), dtype=torch.float32)
    old[:L] = -7.0                                             # the unused skip logits
    old[small_cfg().skip_to_layer] = model.scalars[lay.skip]
    old[L:3 * L] = model.scalars[lay.block:lay.block + 2 * L]
    old[3 * L:5 * L] = model.scalars[lay.value:lay.value + 2 * L]
    old[5 * L], old[5 * L + 1] = model.scalars[lay.smear], model.scalars[lay.backout]
    state["scalars"] = old
    tables = state.pop("value_embeds.weight").view(2, -1, 64)
    state.update({f"value_embeds.{k}.weight": tables[k].clone() for k in range(2)})
    fresh = GPT(small_cfg(), torch.float64)
    fresh.load_state_dict(state)
    fresh.set_window(Window(1, 3))
    fresh.rotary.load_state_dict(model.rotary.state_dict())
    torch.testing.assert_close(loss_of(fresh), loss_of(model), rtol=0, atol=0)


@pytest.mark.parametrize("change, field", [
    (dict(mudd_layer=3), "model.mudd_layer"),                        # no attention there
    (dict(mudd_value_sources=[-1, 5]), "model.mudd_value_sources"),   # not before the MUDD layer
    (dict(mudd_residual_sources=[4]), "model.mudd_residual_sources"),  # the residual itself
    (dict(mudd_final_sources=[-1, 4]), "model.mudd_final_sources"),   # backout_layer 2 not listed
    (dict(value_embed_gates=False), "model.value_embed_gates"),      # MUDD needs the gated injection
    (dict(mudd_gate_layer=0), "model.mudd_gate_layer"),
    (dict(xsa_layers=[3]), "model.xsa_layers"),                      # layer 3 has no attention
    (dict(attn_input_layer=6), "model.attn_input_layer"),
    (dict(untie_after_step=4), "model.untie_after_step"),            # an even step
    (dict(tie_embed=True, head_init_std=0.0), "model.head_init_std"),
    (dict(logit_softcap_temperature=-1.0), "model.logit_softcap_temperature"),
    (dict(bigram_vocab_size=1), "model.bigram_vocab_size"),
])
def test_bad_record89_config_names_the_field(change, field):
    cfg = Config(model=small_r89(**change), optim=record89_optim())
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        cfg.validate()


def test_record89_config_round_trips_through_json(tmp_path):
    cfg = Config(model=record89_model(), optim=record89_optim()).validate()
    cfg.save(tmp_path / "c.json")
    assert Config.load(tmp_path / "c.json") == cfg
    assert dataclasses.asdict(Config.load(tmp_path / "c.json").optim.adam.embed) == \
        {"lr_mul": 1.0, "betas": [0.5, 0.95], "wd_mul": 150.0}
