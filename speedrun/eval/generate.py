"""Text generation: sampling (temperature, top-k, top-p; greedy at temperature 0) on the KV-cache
decoder (speedrun/model/kv_cache.py), yielding tokens as they are decoded, and a streaming UTF-8
decoder so that text can be printed token by token.

A prompt is conditioned the way training documents start: ``<|endoftext|>`` (the BOS of every
training document) and then the prompt's tokens. Generation stops after ``max_tokens`` tokens or
when the model ends the document with ``<|endoftext|>``.
"""
from __future__ import annotations

import codecs
import math
from typing import Iterator

import torch
from torch import Tensor

from speedrun.data.tokenizer import EOT_ID, get_tokenizer
from speedrun.eval.loading import EvalError
from speedrun.model.kv_cache import KVCache
from speedrun.utils import available_memory, human_bytes


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top ``top_k`` (0: no limit) and outside the nucleus: the
    smallest set of most likely tokens whose probability reaches ``top_p`` (1.0: no limit). The most
    likely token always survives. Works on (..., V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs     # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p             # the set already reached top_p without it
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits: Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> int:
    """One token id from (V,) logits: argmax at temperature 0, else a draw from the filtered
    softmax(logits / temperature)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    # shifted so the largest logit is 0 before dividing: with a tiny temperature the others go to
    # -inf and the most likely token gets probability 1, where unshifted logits would overflow to
    # inf and the softmax would be nan
    logits = logits.float()
    scaled = (logits - logits.max()) / temperature
    probs = torch.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(temperature: float, top_k: int, top_p: float, max_tokens: int) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise EvalError(f"--temperature {temperature}: expected a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        raise EvalError(f"--top-k {top_k}: expected >= 0 (0 = no limit)")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise EvalError(f"--top-p {top_p}: expected a probability in (0, 1]")
    if max_tokens < 0:
        raise EvalError(f"--max-tokens {max_tokens}: expected >= 0")


def generation_context(model, prompt_ids: list[int], max_tokens: int, bos: bool = True) -> list[int]:
    """The ids the model is fed (``<|endoftext|>`` then the prompt), checked against its vocabulary,
    its context and the memory of its KV cache (cheap: callers check before printing anything)."""
    context = ([EOT_ID] if bos else []) + list(prompt_ids)
    if not context:
        raise EvalError("generate: empty context (give a prompt or keep bos=True)")
    if max(context) >= model.cfg.vocab_size or min(context) < 0:
        bad = next(t for t in context if not 0 <= t < model.cfg.vocab_size)
        what = "<|endoftext|>, which starts every prompt" if bos and bad == EOT_ID else "the prompt's"
        raise EvalError(f"--prompt: token id {bad} ({what}) is outside the model's vocabulary "
                        f"(0..{model.cfg.vocab_size - 1}); the model was not trained on GPT-2 tokens")
    if max_tokens > 0:
        check_context(model, len(context), max_tokens)
    return context


def check_context(model, context_tokens: int, max_tokens: int) -> None:
    """Refuse (rather than silently shorten) a generation longer than the model's context, and one
    whose KV cache (sized to the prompt plus ``max_tokens``, allocated up front) would not fit."""
    cfg = model.cfg
    limit = cfg.rope_max_positions
    if context_tokens + max_tokens > limit:
        raise EvalError(f"--max-tokens {max_tokens}: the prompt ({context_tokens} tokens with <|endoftext|>) "
                        f"plus {max_tokens} new tokens exceed the model's context of {limit} positions "
                        f"(model.rope_max_positions); use --max-tokens {max(0, limit - context_tokens)} or less")
    layers = sum(cfg.has_attention(i) for i in range(cfg.num_layers))
    cache_bytes = (context_tokens + max_tokens) * layers * 2 * cfg.num_heads * cfg.head_dim * model.dtype.itemsize
    available = available_memory(model.embed.weight.device)
    if available is not None and cache_bytes > available:
        raise EvalError(f"--max-tokens {max_tokens}: the KV cache for {context_tokens + max_tokens:,} tokens needs "
                        f"{human_bytes(cache_bytes)}, more than the {human_bytes(available)} of memory "
                        f"available; ask for fewer tokens")


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, bos: bool = True,
             stop_at_eot: bool = True) -> Iterator[int]:
    """Yield up to ``max_tokens`` new token ids after ``prompt_ids``, one at a time as decoded.

    The same seed gives the same tokens on the same device. Ids of the padded vocabulary (rows
    past the tokenizer's vocabulary, never seen in training) are never produced."""
    check_sampling(temperature, top_k, top_p, max_tokens)
    device = model.embed.weight.device
    context = generation_context(model, prompt_ids, max_tokens, bos)
    if max_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    vocab = model.cfg.vocab_size
    cache = KVCache(model, len(context) + max_tokens)
    logits = model(torch.tensor(context, dtype=torch.long, device=device), kv_cache=cache)[-1]
    for i in range(max_tokens):
        if not bool(torch.isfinite(logits[:vocab]).all()):
            raise EvalError(f"the model produced non-finite logits (nan or inf) for new token {i + 1}; "
                            f"its weights are damaged or the run diverged")
        token = next_token(logits[:vocab], temperature, top_k, top_p, generator)
        yield token
        if stop_at_eot and token == EOT_ID:
            return
        if i + 1 < max_tokens:
            logits = model(torch.tensor([token], dtype=torch.long, device=device), kv_cache=cache)[-1]


class TextStream:
    """Token ids -> text pieces, holding back bytes of a UTF-8 character split across tokens (a
    GPT-2 token may end in the middle of a multi-byte character)."""

    def __init__(self):
        self.tokenizer = get_tokenizer()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tokenizer.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
