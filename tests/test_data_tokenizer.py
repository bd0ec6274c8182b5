"""The offline GPT-2 tokenizer: known ids, and agreement with a slow pure-Python BPE that reads the
bundled rank file itself (so the test checks the ids, not just tiktoken against itself)."""
import base64
import functools

import pytest

from speedrun.data.tokenizer import (
    EOT_ID,
    GPT2_PATTERN,
    RANKS_PATH,
    decode,
    encode,
    encode_document,
    get_tokenizer,
)

regex = pytest.importorskip("regex")  # tiktoken depends on it


@functools.lru_cache(maxsize=1)
def bundled_ranks() -> dict[bytes, int]:
    ranks = {}
    with open(RANKS_PATH, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def slow_bpe(text: str) -> list[int]:
    """GPT-2 byte-level BPE: split with the GPT-2 pattern, then in each piece repeatedly merge the
    adjacent pair whose concatenation has the lowest rank (leftmost on ties)."""
    ranks = bundled_ranks()
    ids = []
    for piece in regex.findall(GPT2_PATTERN, text):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            pair_ranks = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
            candidates = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
            if not candidates:
                break
            _, i = min(candidates)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


KNOWN_IDS = {   # GPT-2 ids as published (tiktoken "gpt2" / HF GPT2Tokenizer)
    "Hello world": [15496, 995],
    "hello world": [31373, 995],
    " the": [262],
    "\n": [198],
    "\n\n": [628],
    "a\n\nb": [64, 198, 198, 65],
    "I'm": [40, 1101],
    " don't": [836, 470],
}

TRICKY = [
    "naïve café, Straße, 日本語のテキスト, emoji 🤖🎉 and ZWJ 👩‍💻",
    "spaces   between\twords\t\t and  \n\n\n  newlines  \r\n trailing   ",
    "I'm sure you're right, they've said we'll go; she'd know it's HIS'S",
    "numbers 12345 3.14159 1,000,000 and 2024-05-20!!!",
    "punctuation...?! (brackets) [x] {y} <|endoftext|> --- ***",
    "   leading and trailing spaces   ",
]


@pytest.mark.parametrize("text, ids", KNOWN_IDS.items())
def test_known_gpt2_ids(text, ids):
    assert encode(text) == ids
    assert slow_bpe(text) == ids


def test_special_token_and_vocab():
    enc = get_tokenizer()
    assert EOT_ID == 50256 == enc.eot_token
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert EOT_ID not in encode("<|endoftext|>")   # ordinary encoding treats it as text
    assert get_tokenizer() is enc                  # cached


@pytest.mark.parametrize("text", TRICKY)
def test_matches_reference_bpe_and_round_trips(text):
    ids = encode(text)
    assert ids == slow_bpe(text)
    assert decode(ids) == text


def test_encode_document_prefixes_eot():
    doc = encode_document("Hello world")
    assert doc.dtype.name == "uint16" and doc.tolist() == [EOT_ID, 15496, 995]
    assert encode_document("").tolist() == [EOT_ID]


def test_rank_file_is_the_full_gpt2_vocabulary():
    ranks = bundled_ranks()
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert ranks[b" the"] == 262
