"""Incremental decoding with a key/value cache: the GPT's forward, a few tokens at a time.

Owns ``KVDecoder``: it feeds new tokens through the *same* modules and parameters as
``GPT.forward`` (embeddings, smear gate, blocks, head; no second model) and keeps what later
tokens need from earlier ones:

- the keys and values of every attention layer (rotary already applied, value embeddings mixed in);
- the raw embedding of the last token, because smear mixes each token with its predecessor.

Everything else in the forward (block lambdas, the skip, backout, MLPs, norms, gates, softcap) acts
on one token at a time, so it needs no cache. The sequence is one document that starts at position
0, and attention follows the model's current windows (``GPT.set_window``): a query at position i
sees keys i - window_tokens .. i of its layer's window, exactly the full forward's mask. Feeding a
sequence in any split gives the full forward's logits (up to float rounding; tests check this).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speedrun.model.attention import rms_norm
from speedrun.model.gpt import GPT


class KVDecoder:
    """Decode one sequence of at most ``max_tokens`` tokens with ``model`` (in eval mode)."""

    def __init__(self, model: GPT, max_tokens: int):
        cfg = model.cfg
        self.model, self.max_tokens = model, max_tokens
        device = model.embed.weight.device
        shape = (max_tokens, cfg.num_heads, cfg.head_dim)
        # one buffer per attention layer, filled up to self.length (keys in the activation dtype,
        # as the full forward hands them to attention)
        self.keys = {i: torch.empty(shape, dtype=model.dtype, device=device)
                     for i, block in enumerate(model.blocks) if block.attn is not None}
        self.values = {i: torch.empty_like(k) for i, k in self.keys.items()}
        self.length = 0
        self.last_embedding: Tensor | None = None   # raw embedding of the last token (for smear)

    def reset(self) -> None:
        self.length, self.last_embedding = 0, None

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        """Append ``ids`` (n,) to the sequence; return their fp32 softcapped logits (n, padded_vocab)."""
        m, cfg, lay = self.model, self.model.cfg, self.model.layout
        ids = ids.reshape(-1).to(m.embed.weight.device)
        n, start = ids.numel(), self.length
        if n == 0:
            raise ValueError("KVDecoder.forward: no tokens given")
        if start + n > self.max_tokens:
            raise ValueError(f"KVDecoder: {start + n} tokens exceed the cache size {self.max_tokens}")

        # embeddings (GPT._embed with the previous token carried over from the last call)
        x = m.embed(ids)
        if m.smear_gate is not None:
            previous = x[:-1] if start == 0 else torch.cat([self.last_embedding, x[:-1]])
            first = 1 if start == 0 else 0           # position 0 has no predecessor
            gate = m.scalars[lay.smear] * torch.sigmoid(m.smear_gate(x[first:, :cfg.gate_dim]))
            smeared = x[first:] + gate * previous
            self.last_embedding = x[-1:]
            x = smeared if first == 0 else torch.cat([x[:1], smeared])
        x0 = rms_norm(x)
        ves = [ve(ids) for ve in m.value_embeds]
        cos = sin = None
        if cfg.rotary:
            cos, sin = m.rotary.cos_sin(n, x0.dtype, start=start)

        # the blocks (GPT.forward's per-layer arguments, Block.forward's body)
        s = m.scalars.unbind()
        x, skip, backout = x0, None, None
        for i, block in enumerate(m.blocks):
            if cfg.skip_connection and i == cfg.skip_to_layer:
                x = x + torch.sigmoid(s[lay.skip + i]) * skip
            if cfg.block_lambdas:
                x = s[lay.block + 2 * i] * x + s[lay.block + 2 * i + 1] * x0
            if block.attn is not None:
                ve_index = cfg.value_embed_layers[i] if cfg.value_embeds else -1
                value_lambdas = (s[lay.value + 2 * i], s[lay.value + 2 * i + 1]) if cfg.value_embeds else None
                x = x + self._attention(i, block.attn, rms_norm(x), ves[ve_index] if ve_index >= 0 else None,
                                        value_lambdas, cos, sin, start)
            x = x + block.mlp(rms_norm(x))
            if cfg.skip_connection and i == cfg.skip_from_layer:
                skip = x
            if cfg.backout and i == cfg.backout_layer:
                backout = x
        self.length = start + n
        return m._logits(m._final(x, backout))

    def _attention(self, layer: int, attn, x: Tensor, ve: Tensor | None, value_lambdas,
                   cos: Tensor | None, sin: Tensor | None, start: int) -> Tensor:
        """CausalSelfAttention.forward with the keys/values of earlier tokens read from the cache."""
        w = attn.weights(x.dtype)
        q, k, v = attn.project(x, w, ve, value_lambdas, cos, sin)
        end = start + x.shape[0]
        self.keys[layer][start:end] = k
        self.values[layer][start:end] = v
        # only keys inside the first query's window can be seen: attend over that slice
        window = self.model.window_tokens(layer)
        lo = max(0, start - window)
        keys, values = self.keys[layer][lo:end], self.values[layer][lo:end]
        query_pos = torch.arange(start, end, device=x.device)[:, None]
        key_pos = torch.arange(lo, end, device=x.device)[None, :]
        mask = (key_pos <= query_pos) & (query_pos - key_pos <= window)
        # the sdpa backend's math: the (YaRN) scale folded into q, the kernel at scale 1
        q = q * self.model.rotary.attn_scale
        y = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1),
                                           values.transpose(0, 1), attn_mask=mask, scale=1.0)
        return attn.output(x, w, y.transpose(0, 1))
