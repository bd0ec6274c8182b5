"""Prefix tokens of the GPT-2 vocabulary (record 88's prefix-token loss, r89-training.md section 4):
for every token id, the id of the token whose bytes are the longest *proper* byte prefix of its bytes,
or -1 where no shorter token is a prefix (every single byte, ``<|endoftext|>``, the padding ids).

Built from the bundled rank file (``assets/gpt2.tiktoken``), never from data, in well under a second
on first use and cached per process. How: sort the (bytes, id) pairs by bytes; then every prefix of a
token comes before it, and every token between a prefix p and b also starts with p. Walking the
sorted list with a stack of the chain of prefixes so far (each entry a prefix of the next), pop until
the top is a prefix of b: the top is then the longest token prefix of b (tests/test_data_prefix.py
checks the table against brute force over every token).

Example: ``Hello`` (15496) -> ``Hell`` (28254); `` world`` (995) -> `` wor`` (476); ``,`` (11) -> -1.
A prefix can have a higher id than its token (28254 > 15496), so a table cut to a smaller vocabulary
(tests) drops the entries that point past it.
"""
from __future__ import annotations

import functools

import numpy as np
from tiktoken.load import load_tiktoken_bpe

from speedrun.data.tokenizer import RANKS_PATH, RANKS_SHA256

NO_PREFIX = -1


@functools.cache
def _gpt2_prefix_table() -> np.ndarray:
    """(50256,) int64: the prefix id of every BPE token of the bundled ranks (-1: none)."""
    ranks = load_tiktoken_bpe(RANKS_PATH, expected_hash=RANKS_SHA256)
    table = np.full(len(ranks), NO_PREFIX, dtype=np.int64)
    stack: list[tuple[bytes, int]] = []
    for token, rank in sorted(ranks.items()):
        while stack and not token.startswith(stack[-1][0]):
            stack.pop()
        if stack:
            table[rank] = stack[-1][1]
        stack.append((token, rank))
    table.flags.writeable = False
    return table


def prefix_table(vocab_size: int) -> np.ndarray:
    """(vocab_size,) int64 prefix ids for the model's (padded) vocabulary: the GPT-2 table for the
    ids it covers, -1 for ids beyond the BPE tokens (``<|endoftext|>`` 50256, padding 50257..) and for
    entries that would point at an id >= vocab_size (a vocabulary smaller than GPT-2's)."""
    if vocab_size < 1:
        raise ValueError(f"prefix_table: vocab_size must be >= 1, got {vocab_size}")
    gpt2 = _gpt2_prefix_table()
    out = np.full(vocab_size, NO_PREFIX, dtype=np.int64)
    n = min(vocab_size, len(gpt2))
    out[:n] = np.where(gpt2[:n] < vocab_size, gpt2[:n], NO_PREFIX)
    return out
