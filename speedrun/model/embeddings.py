"""Token-indexed side embeddings of the GPT: the value-embedding banks and the hashed bigram
embedding (record 89, head-spec.md; r89-model.md sections 2 and 3).

Owns:
- ``ValueEmbeddings``: every value-embedding table in ONE parameter (n*V, D) (record 65), looked up
  through a (n, V, D) view; which layer reads which table is the model's business
  (``model.value_embed_layers``; record 45 shares 3 tables over 5 layers, record 89 has 5 untied ones).
- ``bigram_hash`` / ``sign_index``: the bigram ids and sign-table rows of a token sequence, computed
  on the tokens' device (record 68 moved the hash to the GPU);
- ``BigramEmbedding``: the zero-initialized table (label "bigram_embed") times a fixed +-1 sign table
  (record 83): beta_t = table[hash(prev_t, cur_t)] * sign[(prev_t ^ cur_t) mod rows].

The hash, here and in the record: h = ((36313 cur) XOR (27191 prev)) mod (rows - 1); the last row is
reserved for a position without a predecessor. Difference from the public code (a documented
choice): it hashes the packed per-rank buffer in its CPU loader, where position 1 uses the reserved
row's index as its "previous token" instead of the real token 0 (a quirk of how its buffer is filled);
here prev is always the real previous token, and only the first position of a sequence (of the packed
batch; of a decoded sequence) takes the reserved row. Like the record, the hash and the sign cross
document boundaries inside a packed batch (a BOS token hashes with the previous document's last token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HASH_CUR, HASH_PREV = 36313, 27191
SIGN_SEED = 1089   # the sign table is drawn from its own generator: fixed, and the model's init
#                    (the global RNG) does not depend on whether the bigram embedding is on


def bigram_hash(ids: Tensor, previous: Tensor | None, rows: int) -> Tensor:
    """(T,) int64 table rows: ((36313 ids[t]) ^ (27191 ids[t-1])) mod (rows - 1), with ids[-1] =
    ``previous`` (a 1-element tensor: the token before this chunk when decoding) or, when it is None,
    the reserved row rows - 1 at position 0. Exact in int64 (the record's int32 products do not wrap
    for token ids below 2^31 / 36313 = 59138, which covers GPT-2's 50304)."""
    ids = ids.long()
    cur = ids * HASH_CUR
    if previous is None:
        prev = ids[:-1] * HASH_PREV
        out = torch.bitwise_xor(cur[1:], prev) % (rows - 1)
        return torch.cat([out.new_full((1,), rows - 1), out])
    prev = torch.cat([previous.reshape(1).long(), ids[:-1]]) * HASH_PREV
    return torch.bitwise_xor(cur, prev) % (rows - 1)


def sign_index(ids: Tensor, previous: Tensor | None, rows: int) -> Tensor:
    """(T,) int64 rows of the sign table: (ids[t-1] ^ ids[t]) mod rows; row 0 at a position without
    a predecessor (as the record's position 0)."""
    ids = ids.long()
    if previous is None:
        return torch.cat([ids.new_zeros(1), torch.bitwise_xor(ids[:-1], ids[1:]) % rows])
    prev = torch.cat([previous.reshape(1).long(), ids[:-1]])
    return torch.bitwise_xor(prev, ids) % rows


class ValueEmbeddings(nn.Module):
    """``weight`` (n*V, D), label "value_embed": table k is rows [k V, (k+1) V)."""

    def __init__(self, num_tables: int, vocab: int, dim: int):
        super().__init__()
        self.num_tables, self.vocab = num_tables, vocab
        self.weight = nn.Parameter(torch.empty(num_tables * vocab, dim))
        self.weight.label = "value_embed"
        self.reset_parameters(1.0)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        # table by table, as separate nn.Embedding tables drew them (record 45's init, bit for bit,
        # on the CPU and CUDA generators alike)
        for table in self.tables():
            table.normal_(0.0, std)

    def tables(self) -> list[Tensor]:
        return list(self.weight.view(self.num_tables, self.vocab, -1).unbind(0))

    def forward(self, ids: Tensor) -> list[Tensor]:
        """Each table's (T, D) rows for ``ids``."""
        return [F.embedding(ids, table) for table in self.tables()]


class BigramEmbedding(nn.Module):
    """The hashed bigram table (``weight`` (rows, D), zero init, label "bigram_embed") and the fixed
    sign table (buffer ``signs`` (sign_rows, D) of +-1; none when sign_rows is 0)."""

    def __init__(self, rows: int, dim: int, sign_rows: int):
        super().__init__()
        self.rows, self.sign_rows = rows, sign_rows
        self.weight = nn.Parameter(torch.zeros(rows, dim))
        self.weight.label = "bigram_embed"
        if sign_rows:
            g = torch.Generator().manual_seed(SIGN_SEED)
            signs = torch.randint(0, 2, (sign_rows, dim), generator=g, device="cpu").float() * 2 - 1
            # persistent: an export carries the exact table it was trained with
            self.register_buffer("signs", signs.to(self.weight.device))
        else:
            self.signs = None

    def forward(self, ids: Tensor, previous: Tensor | None = None) -> Tensor:
        """beta (T, D) in the table's dtype for the tokens ``ids`` (``previous``: see bigram_hash)."""
        beta = F.embedding(bigram_hash(ids, previous, self.rows), self.weight)
        if self.signs is not None:
            beta = beta * self.signs[sign_index(ids, previous, self.sign_rows)].to(beta.dtype)
        return beta
