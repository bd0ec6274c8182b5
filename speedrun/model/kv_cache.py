"""The state of incremental decoding: what later tokens need from earlier ones when a sequence is
fed to ``GPT.forward(ids, kv_cache=cache)`` a few tokens at a time.

Owns ``KVCache``, which holds, for one sequence of at most ``max_tokens`` tokens:
- the keys and values of every attention layer (rotary applied, value embeddings mixed in, in the
  activation dtype, as the full forward hands them to attention);
- the raw embedding and the id of the last token, because smear mixes each token with its
  predecessor and the bigram hash reads the previous id;
- the number of tokens already decoded (the position of the next one).

The model's own forward does all the math (one forward for training, evaluation and decoding);
the only step that differs when decoding is attention itself: a query attends to the cached keys
within its layer's window (``LayerKV.attend``), which is the full forward's mask for one document
starting at position 0. Everything else in the forward acts on one token at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class LayerKV:
    """One attention layer's view of the cache for the tokens being decoded now: positions
    [start, end) are written, keys within ``window`` tokens of each query are read."""

    def __init__(self, keys: Tensor, values: Tensor, start: int, window: int):
        self.keys, self.values, self.start, self.window = keys, values, start, window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: Tensor | float) -> Tensor:
        """Store k, v (n, H, D) at the new positions; softmax(scale q K^T + mask) V over the cache."""
        start, end = self.start, self.start + q.shape[0]
        self.keys[start:end] = k
        self.values[start:end] = v
        # only keys inside the first query's window can be seen: attend over that slice
        lo = max(0, start - self.window)
        query_pos = torch.arange(start, end, device=q.device)[:, None]
        key_pos = torch.arange(lo, end, device=q.device)[None, :]
        mask = (key_pos <= query_pos) & (query_pos - key_pos <= self.window)
        # the sdpa backend's math: the (YaRN) scale folded into q, the kernel at scale 1
        y = F.scaled_dot_product_attention((q * scale).transpose(0, 1), self.keys[lo:end].transpose(0, 1),
                                           self.values[lo:end].transpose(0, 1), attn_mask=mask, scale=1.0)
        return y.transpose(0, 1)


class KVCache:
    """Keys/values of every attention layer of ``model`` for one sequence of at most ``max_tokens``
    tokens, on the model's device (see the module docstring)."""

    def __init__(self, model, max_tokens: int):
        cfg = model.cfg
        if max_tokens < 1:
            raise ValueError(f"KVCache: max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        device = model.embed.weight.device
        shape = (max_tokens, cfg.num_heads, cfg.head_dim)
        self.keys = {i: torch.empty(shape, dtype=model.dtype, device=device)
                     for i, block in enumerate(model.blocks) if block.attn is not None}
        self.values = {i: torch.empty_like(k) for i, k in self.keys.items()}
        self.length = 0                              # tokens decoded so far
        self.last_embedding: Tensor | None = None    # raw embedding of the last token (for smear)
        self.last_token: Tensor | None = None        # id of the last token (for the bigram hash)
        self._start = 0                              # first position of the tokens being decoded

    def reset(self) -> None:
        """Forget the sequence (the buffers are reused)."""
        self.length, self.last_embedding, self.last_token, self._start = 0, None, None, 0

    def claim(self, n: int) -> int:
        """Reserve positions for ``n`` new tokens; returns the first one."""
        if n == 0:
            raise ValueError("KVCache: no tokens given")
        if self.length + n > self.max_tokens:
            raise ValueError(f"KVCache: {self.length + n} tokens exceed the cache size {self.max_tokens}")
        self._start, self.length = self.length, self.length + n
        return self._start

    def layer(self, index: int, window: int) -> LayerKV:
        """Layer ``index``'s view for the tokens claimed last, attending ``window`` tokens back."""
        return LayerKV(self.keys[index], self.values[index], self._start, window)
