"""Shared by the record-89 tests: a small record-89-shaped config, a randomization that gives every
record-89 path signal, and an independent float64 oracle of the forward written from the spec
(r89-model.md section 11), not from the package's code."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from speedrun.model import GPT
from speedrun.presets import record89_model


def small_r89(**kw):
    """Record 89's structure at toy size: 6 layers, no attention on 3 (the skip's target), the MUDD
    layer last (5) reading the cached output of 4 (record 77), the post gate at 2, untied value
    embeddings on 1, 2, 4, 5, XSA / output-gate / DC coefficients produced for a few layers."""
    base = dict(vocab_size=500, num_layers=6, model_dim=64, num_heads=2, head_dim=32,
                no_attention_layers=[3], long_window_layers=[2, 5],
                value_embed_layers=[-1, 0, 1, -1, 2, 3], skip_from_layer=1, skip_to_layer=3,
                backout_layer=2, attn_input_layer=4, mudd_layer=5, mudd_value_sources=[-1, 2, 4],
                mudd_residual_sources=[-1, 2], mudd_final_sources=[-1, 2, 4, 1], mudd_final_value_embed=0,
                mudd_gate_layer=2, xsa_layers=[1, 2, 4], attn_out_gate_layers=[2, 5], dc_layers=[5],
                bigram_vocab_size=997, bigram_sign_rows=64, block_size=16, rope_max_positions=4096,
                attention_backend="sdpa", value_embed_gate_dim=4, mudd_hidden=8, untie_after_step=3)
    base.update(kw)
    return record89_model(**base)


def randomized89(model: GPT, seed: int = 0, scale: float = 0.05, mudd_w2_std: float = 2.0,
                 mudd_bias_std: float = 3.0) -> GPT:
    """Random values where the init is zero or neutral (head, output projections, gates, bigram
    table, MUDD output weights, lambdas), so every term of the forward carries signal.
    The MUDD defaults make large coefficients (strong signal for float64 oracles); at the record's
    size in bf16 they make the gradient chaotic (bf16 vs fp32 gradients differ by ~100%), so
    GPU comparisons of gradients pass smaller ones."""
    g = torch.Generator().manual_seed(seed)

    def rnd(p, s):
        return (torch.randn(p.shape, generator=g) * s).to(p.device, p.dtype)

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.label in ("lm_head", "attn", "mlp_proj"):
                p.copy_(rnd(p, scale))
            elif p.label in ("attn_gate", "smear_gate", "ve_gate", "bigram_embed"):
                p.copy_(rnd(p, 0.5))
            elif p.label in ("scalars", "resid_lambdas", "post_lambdas", "gate_constants"):
                p.add_(rnd(p, 0.3))
            elif p.label in ("mudd", "mudd_gate") and ".w2." in name:
                p.copy_(rnd(p, mudd_w2_std))
            elif p.label in ("mudd_bias", "mudd_gate_bias") and ".b2." in name:
                p.add_(rnd(p, mudd_bias_std))
    return model


def r89_oracle(model: GPT, ids: torch.Tensor, cu: torch.Tensor):
    """(logits, coefficients) in float64. ``coefficients[i]`` holds what layer i hands attention:
    {"xsa", "out_gate", "dc_w1", "dc_w2", "attn_lambdas"} as produced by the gates.

    Attention is record 45's (dense softmax, QK norm, rotary, windows, documents) plus the value
    injection and record 89's consumers of the coefficients, written from r89-attention.md (not
    from attention.py): the attention lambdas on [Wq;Wk;Wv] and Wo, DC-MHA (its own softmax over
    dc_window keys, mixed across heads by RMS-normed w1, read through each head's v by w2), XSA
    and the linear output gate, in that order. Paired heads and the key offset are not in this
    oracle's configs (test_model_attention_r89.py has their references). Lane positions and scalar offsets are read
    from the model (they are the parameters' storage layout; the record's layout is checked against
    the public code's table in test_model_r89.py)."""
    cfg, lay = model.cfg, model.layout
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    s = P["scalars"]
    T, d, H, D, L = ids.numel(), cfg.model_dim, cfg.num_heads, cfg.head_dim, cfg.num_layers
    V = cfg.padded_vocab_size
    eps = torch.finfo(torch.float64).eps

    def norm(v):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    def mlp_coef(z, w1, w2, b2, sc):
        return sc * (F.gelu(z @ w1.T) @ w2.T + b2)              # (T, n)

    def lanes_of(blocks_lanes, values):
        """{(kind, layer): (T, width)} from a block's output (T, n) or constants (n,)."""
        out = {}
        for lane in blocks_lanes:
            v = values[..., lane.start:lane.start + lane.width]
            out[(lane.kind, lane.layer)] = v.expand(T, lane.width) if v.dim() == 1 else v
        return out

    ids = ids.long()
    table = P["lm_head.weight"] if model.embed_tied else P["embed.weight"]
    e = table[ids]
    if cfg.smear:
        smeared = e.clone()
        for t in range(1, T):
            gate = s[lay.smear] * torch.sigmoid(e[t, :cfg.gate_dim] @ P["smear_gate.weight"][0])
            smeared[t] = e[t] + gate * e[t - 1]
        e = smeared
    x0 = norm(e)

    beta = None
    if cfg.bigram_embed:
        M, rows = cfg.bigram_vocab_size - 1, cfg.bigram_sign_rows
        tok = ids.tolist()
        hashes = [M] + [((36313 * tok[t]) ^ (27191 * tok[t - 1])) % M for t in range(1, T)]
        beta = P["bigram.weight"][hashes]
        if rows:
            signs = model.bigram.signs.double()
            beta = beta * signs[[0] + [(tok[t - 1] ^ tok[t]) % rows for t in range(1, T)]]

    ve_tables = P["value_embeds.weight"].view(-1, V, d) if cfg.num_value_embeds else None

    def ve_of(layer):
        k = cfg.value_embed_layers[layer] if cfg.value_embeds else -1
        return ve_tables[k][ids] if k >= 0 else None

    # the gate coefficients: the two gate MLPs, or the learned constants
    if cfg.mudd_gates:
        gm = model.gate_mlps
        sc = P["gate_mlps.scale"]
        group = lanes_of(gm.blocks[0], mlp_coef(x0, P["gate_mlps.w1"][0], P["gate_mlps.w2.0"],
                                                 P["gate_mlps.b2.0"], sc))
    elif model.gate_constants is not None:
        group = lanes_of(model.gate_constants.lanes, P["gate_constants.values"])
    else:
        group = {}

    x = x0 + group[("bigram", 0)] * beta if beta is not None else x0
    cache = {-1: x}
    starts = [int(c) for c in cu if int(c) < T]
    doc = [sum(1 for st in starts if st <= t) - 1 for t in range(T)]
    angles = torch.outer(torch.arange(T, dtype=torch.float32), model.rotary.freqs.float())
    rot = torch.exp(-1j * angles.double())
    scale = model.rotary.attn_scale.double()
    coefficients = {}
    gated_layers = model.gated_ve_layers
    for i in range(L):
        pre = f"blocks.{i}."
        if cfg.mudd_gates and i == cfg.mudd_gate_layer:
            group = lanes_of(gm.blocks[1], mlp_coef(x, P["gate_mlps.w1"][1], P["gate_mlps.w2.1"],
                                                    P["gate_mlps.b2.1"], sc))
        r_a = p_a = r_m = p_m = None
        if cfg.residual_lambdas:
            r_a, r_m = P["resid_lambdas"][i]
            p_a, p_m = P["post_lambdas"][i]
        # MUDD block 0 at the layer's entry, on the residual entering it (before the skip and record
        # 45's block lambdas, where those are on as well); attention then reads that residual
        v_extra = ve_gate = entering = None
        x0_gate, x0_src = group.get(("x0", i)), x0
        bg_gate = group.get(("bigram", i)) if i > 0 else None
        if cfg.mudd and i == cfg.mudd_layer:
            mu = lanes_of(model.mudd.blocks[0], mlp_coef(x, P["mudd.w1"][0], P["mudd.w2.0"],
                                                         P["mudd.b2.0"], cfg.mudd_scale))
            v_extra = sum(mu[("value_source", j)] * cache[j] for j in cfg.mudd_value_sources)
            new_x = (1 + mu[("self", i)]) * x + sum(mu[("residual_source", j)] * cache[j]
                                                    for j in cfg.mudd_residual_sources)
            if ("ve_gate", i) in mu:   # heads of the first half take lane 0, the rest lane 1
                ve_gate = torch.cat([mu[("ve_gate", i)][:, :1].expand(T, H // 2),
                                     mu[("ve_gate", i)][:, 1:].expand(T, H - H // 2)], 1)
            if cfg.residual_lambdas:
                r_a, p_a, r_m, p_m = (mu[(k, i)] for k in ("resid_attn", "post_attn", "resid_mlp", "post_mlp"))
            x0_gate, bg_gate, x0_src = mu.get(("x0", i)), mu.get(("bigram", i)), cache[-1]
            entering, x = x, new_x
        if cfg.skip_connection and i == cfg.skip_to_layer:
            gate = torch.sigmoid(s[lay.skip])
            if cfg.mudd_gates:
                gate = gate * group[("skip", i)]
            x = x + gate * cache[cfg.skip_from_layer]
        if cfg.block_lambdas:
            x = s[lay.block + 2 * i] * x + s[lay.block + 2 * i + 1] * x0
        if cfg.has_attention(i):
            if 0 <= cfg.attn_input_layer < i:
                source = cache[cfg.attn_input_layer]
            else:
                source = x if entering is None else entering
            u = norm(source)
            Wq, Wk, Wv, Wo = P[pre + "attn.qkvo"].view(4, d, d)
            if cfg.attn_lambdas:   # record 47: lambdas on the weights
                Wq, Wk, Wv = (s[lay.attn + 2 * i] * W for W in (Wq, Wk, Wv))
                Wo = s[lay.attn + 2 * i + 1] * Wo
            q, k, v = ((u @ W.T).view(T, H, D) for W in (Wq, Wk, Wv))
            if cfg.qk_norm:
                q, k = norm(q), norm(k)
            if cfg.rotary:
                def rotate(w):
                    z = torch.complex(w[..., :D // 2], w[..., D // 2:]) * rot[:, None, :]
                    return torch.cat([z.real, z.imag], -1)
                q, k = rotate(q), rotate(k)
            ve = ve_of(i)
            if cfg.value_embeds and not cfg.value_embed_gates:           # record 45's lambdas
                v = s[lay.value + 2 * i] * v
                if ve is not None:
                    v = v + s[lay.value + 2 * i + 1] * ve.view(T, H, D)
            elif ve is not None:
                if ve_gate is None:
                    W = P["ve_gates"][gated_layers.index(i)]
                    k_ = cfg.value_embed_gate_dim
                    ve_gate = 2 * torch.sigmoid(torch.cat([u[:, :k_], ve[:, :k_]], 1) @ W.T)
                v = v + ve_gate[:, :, None] * ve.view(T, H, D)
            if v_extra is not None:
                v = v + v_extra.view(T, H, D)
            blocks = (model.window.long if i in cfg.long_window_layers else model.window.short) if model.window else None
            window = math.inf if blocks is None else blocks * cfg.block_size
            y = torch.zeros(T, H, D, dtype=torch.float64)
            for t in range(T):
                keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j <= window]
                for h in range(H):
                    p = torch.softmax(scale * (k[keys, h] @ q[t, h]), 0)
                    y[t, h] = p @ v[keys, h]
            if ("dc_w1", i) in group:   # DC-MHA: r89-attention.md 5.2
                w1, w2 = group[("dc_w1", i)], group[("dc_w2", i)]
                w1 = w1 / torch.sqrt(w1.pow(2).mean(-1, keepdim=True) + 1e-6)
                for t in range(T):
                    keys = [j for j in range(t + 1) if doc[j] == doc[t] and t - j < cfg.dc_window]
                    mix = sum(w1[t, g] * torch.softmax(scale * (k[keys, g] @ q[t, g]), 0) for g in range(H))
                    for h in range(H):
                        y[t, h] = y[t, h] + w2[t, h] * (mix @ v[keys, h])
            if ("xsa", i) in group:     # record 86's algebraic form, the token's own v
                alpha = group[("xsa", i)]
                dot = (y * v).sum(-1, keepdim=True)
                y = y - torch.tanh(alpha)[:, :, None] * dot / v.pow(2).sum(-1, keepdim=True).clamp_min(1e-8) * v
            if ("out_gate", i) in group:
                y = y * group[("out_gate", i)][:, :, None]
            if cfg.attn_gate:
                y = y * torch.sigmoid(u[:, :cfg.gate_dim] @ P[pre + "attn.gate.weight"].T)[:, :, None]
            out = y.reshape(T, d) @ Wo.T
            x = x + out if r_a is None else r_a * x + p_a * out
            if x0_gate is not None:
                x = x + x0_gate * x0_src
            if bg_gate is not None:
                x = x + bg_gate * beta
            coefficients[i] = {k: group.get((k, i)) for k in ("xsa", "out_gate", "dc_w1", "dc_w2")}
            coefficients[i]["attn_lambdas"] = ((s[lay.attn + 2 * i], s[lay.attn + 2 * i + 1])
                                               if cfg.attn_lambdas else None)
        h = norm(x) @ P[pre + "mlp.c_fc"]
        h = F.relu(h) ** 2 if cfg.relu_squared else F.gelu(h)
        m = h @ P[pre + "mlp.c_proj"].T
        x = x + m if r_m is None else r_m * x + p_m * m
        cache[i] = x
    if cfg.mudd:
        c = lanes_of(model.mudd.blocks[1], mlp_coef(x, P["mudd.w1"][1], P["mudd.w2.1"], P["mudd.b2.1"],
                                                    cfg.mudd_scale))
        update = sum(c[("final_source", j)] * cache[j] for j in cfg.mudd_final_sources)
        if cfg.mudd_final_value_embed >= 0:
            update = update + c[("final_value_embed", cfg.mudd_final_value_embed)] * \
                ve_tables[cfg.mudd_final_value_embed][ids]
        x = x + update
    elif cfg.backout:
        x = x - s[lay.backout] * cache[cfg.backout_layer]
    logits = norm(x) @ P["lm_head.weight"].T
    cap, off = cfg.logit_softcap, cfg.logit_softcap_offset
    tau = cfg.logit_softcap_temperature or cap / 4
    return (cap * torch.sigmoid((logits + off) / tau) if cap > 0 else logits), coefficients
