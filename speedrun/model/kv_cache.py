"""The state of incremental decoding: what later tokens need from earlier ones when a sequence is
fed to ``GPT.forward(ids, kv_cache=cache)`` a few tokens at a time.

Owns ``KVCache``, which holds, for one sequence of at most ``max_tokens`` tokens:
- the keys and values of every attention layer (rotary applied, value embeddings mixed in, in the
  activation dtype, as the full forward hands them to attention); a paired-head layer's in its
  stream layout (2 * max_tokens rows of H/2 heads: attention.to_stream), a key-offset layer's
  shifted as attention consumed them;
- per attention layer the last token's key before the key offset (the next token's shifted dims
  come from it);
- the raw embedding and the id of the last token, because smear mixes each token with its
  predecessor and the bigram hash reads the previous id;
- the number of tokens already decoded (the position of the next one).

The model's own forward does all the math (one forward for training, evaluation and decoding);
the only step that differs when decoding is attention itself: a query attends to the cached keys
within its layer's window (``LayerKV.attend``), which is the full forward's mask for one document
starting at position 0, and DC-MHA reads the cached keys and values of its own window
(``LayerKV.dc``). Everything else in the forward (XSA included: it reads the token's own value)
acts on one token at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from speedrun.kernels.dc_mha import dc_mha_reference


class LayerKV:
    """One attention layer's view of the cache for the tokens being decoded now: positions
    [start, end) are written, keys within ``window`` positions of each query are read (rows of
    the stream in a paired-head layer: ``start`` and the positions are doubled, not the window).
    ``last_key`` (H, D): the un-shifted key of the token before ``start``, for the key offset."""

    def __init__(self, keys: Tensor, values: Tensor, start: int, window: int,
                 last_key: Tensor | None = None):
        self.keys, self.values, self.start, self.window = keys, values, start, window
        self.last_key = last_key

    def previous_key(self, k: Tensor) -> Tensor | None:
        """The un-shifted key before the new tokens' keys k (None at position 0, where the full
        forward's first key keeps its own); remembers k's last row for the next call."""
        previous = self.last_key.clone() if self.start > 0 else None
        self.last_key.copy_(k[-1])
        return previous

    def dc(self, y: Tensor, q: Tensor, w1: Tensor, w2: Tensor, window: int) -> Tensor:
        """y + DC-MHA's correction for the new tokens (q scaled), over the cached keys and values
        of the ``window`` positions up to each (written by ``attend`` just before)."""
        end = self.start + q.shape[0]
        lo = max(0, self.start - window + 1)
        return dc_mha_reference(y, q, self.keys[lo:end], self.values[lo:end], w1, w2, None, window)

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
        H, D = cfg.num_heads, cfg.head_dim
        self.paired = set(cfg.paired_head_layers)
        layers = [i for i, block in enumerate(model.blocks) if block.attn is not None]
        self.keys = {i: torch.empty((2 * max_tokens, H // 2, D) if i in self.paired else (max_tokens, H, D),
                                    dtype=model.dtype, device=device) for i in layers}
        self.values = {i: torch.empty_like(k) for i, k in self.keys.items()}
        self.last_keys = {i: torch.zeros((H, D), dtype=model.dtype, device=device) for i in layers}
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
        """Layer ``index``'s view for the tokens claimed last, attending ``window`` positions back."""
        start = 2 * self._start if index in self.paired else self._start
        return LayerKV(self.keys[index], self.values[index], start, window, self.last_keys[index])
