"""speedrun.data.prefix: the prefix-token table of the GPT-2 vocabulary (record 88) against brute force
over every token, the worked example of r89-training.md 4.3, and the table cut to smaller vocabularies."""
from __future__ import annotations

import time

import numpy as np
import pytest
from tiktoken.load import load_tiktoken_bpe

from speedrun.data import prefix as P
from speedrun.data.tokenizer import EOT_ID, RANKS_PATH, RANKS_SHA256, encode


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return load_tiktoken_bpe(RANKS_PATH, expected_hash=RANKS_SHA256)


def test_table_equals_brute_force_for_every_token(ranks):
    """For each token: try every proper prefix, longest first, and take the first that is a token."""
    table = P.prefix_table(50304)
    want = np.full(50304, -1, dtype=np.int64)
    for token, rank in ranks.items():
        for cut in range(len(token) - 1, 0, -1):
            hit = ranks.get(token[:cut])
            if hit is not None:
                want[rank] = hit
                break
    assert table.dtype == np.int64 and table.shape == (50304,)
    assert np.array_equal(table, want)
    # r89-training.md 4.1: the 256 single bytes, EOT and the 47 padding ids have none; every
    # multi-byte token has one (every single byte is a token)
    assert (table == -1).sum() == 304 and table[EOT_ID] == -1 and (table[50257:] == -1).all()
    single = [rank for token, rank in ranks.items() if len(token) == 1]
    assert len(single) == 256 and (table[single] == -1).all()
    # a prefix is strictly shorter, and prefixes chain: ` understanding` -> ... -> ` `
    inv = {rank: token for token, rank in ranks.items()}
    chain, t = [], ranks[b" understanding"]
    while t >= 0:
        chain.append(inv[int(t)])
        t = table[t]
    assert chain == [b" understanding", b" understand", b" unders", b" under", b" unde", b" und", b" un", b" u", b" "]


def test_worked_example_of_the_notes():
    """r89-training.md 4.3: `<eot>Hello world, the running dog`."""
    ids = [EOT_ID] + encode("Hello world, the running dog")
    assert ids == [50256, 15496, 995, 11, 262, 2491, 3290]
    table = P.prefix_table(50304)
    assert table[ids].tolist() == [-1, 28254, 476, -1, 294, 1057, 466]


def test_cut_to_a_smaller_vocabulary_and_cached():
    full = P.prefix_table(50304)
    small = P.prefix_table(300)
    keep = full[:300] < 300
    assert np.array_equal(small[keep], full[:300][keep]) and (small[~keep] == -1).all()
    assert (small >= 0).sum() > 20          # merges like " t" -> " " survive the cut
    assert P.prefix_table(60000)[50304:].tolist() == [-1] * (60000 - 50304)
    t = time.perf_counter()
    P.prefix_table(50304)
    assert time.perf_counter() - t < 0.05   # the GPT-2 table is built once per process
    with pytest.raises(ValueError, match="vocab_size"):
        P.prefix_table(0)
