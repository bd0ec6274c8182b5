"""The GPT-2 BPE tokenizer, offline: tiktoken's fast encoder built on the bundled rank file
(``assets/gpt2.tiktoken``, byte-identical to tiktoken's ``r50k_base``), so token ids equal tiktoken's
``gpt2`` encoding without any network access (tiktoken would otherwise download the ranks)."""
from __future__ import annotations

import functools
import os
from typing import Iterable

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe

EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
VOCAB_SIZE = 50257
RANKS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "gpt2.tiktoken")
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenizer split pattern (contractions, letters, numbers, punctuation, whitespace runs)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding (cached per process). Ids are identical to ``tiktoken.get_encoding("gpt2")``."""
    # expected_hash guards against a corrupted asset and against tiktoken's path-keyed file cache
    ranks = load_tiktoken_bpe(RANKS_PATH, expected_hash=RANKS_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_ID}, explicit_n_vocab=VOCAB_SIZE)


def encode(text: str) -> list[int]:
    """Token ids of ``text``; special-token strings such as ``<|endoftext|>`` are encoded as plain text."""
    return get_tokenizer().encode_ordinary(text)


def encode_document(text: str) -> np.ndarray:
    """One document as stored in shards: ``[EOT_ID] + encode(text)`` as uint16 (the reference's layout)."""
    ids = get_tokenizer().encode_ordinary(text)
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[0] = EOT_ID
    out[1:] = ids
    return out


def decode(ids: Iterable[int]) -> str:
    """Text of token ids (invalid UTF-8 from a cut multi-byte character becomes U+FFFD)."""
    return get_tokenizer().decode([int(i) for i in ids])
