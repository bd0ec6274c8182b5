"""Batches for training and validation (reference spec 1.11).

Train: BOS-aligned packing. One optimizer step is ``tokens_per_step / sequence_tokens`` *virtual*
micro-batches built in order from a cursor over the shard's BOS positions; every segment starts at a
BOS and ends at the next BOS, ``max_doc_len`` tokens later, or where the micro-batch is full (tails
are skipped). Rank ``r`` with accumulation ``A`` takes virtual micro-batches ``r*A .. r*A+A-1``, so
the batches of a step do not depend on how they are spread over ranks (1 rank x 8 = 8 ranks x 1).
The batch may change from step to step (a stage table's batch and document cap: ``next_step(shape)``);
the cursor is a BOS number, which no batch or cap changes, and the cap is applied when planning.
A step's plan never spans shards: when the current shard runs out mid-plan, the rest of it is
discarded and the plan is rebuilt from the next shard (as the reference does). A background thread
loads and indexes the next shard while the current one is consumed; its errors reach the caller.
The position (shard, BOS cursor, steps) is a small JSON-able dict, and it does not depend on the
world size: a resumed run continues with the exact next batch.

Validation: the fixed first ``num_tokens`` tokens of the val shards (plus one target token) in
chunks of ``sequence_tokens``; chunk ``i`` goes to rank ``i % world_size``.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np
import torch

from speedrun.config import BatchShape
from speedrun.data.shards import DataError, ShardError, read_header, read_shard, shard_paths

T_ = TypeVar("T_")


class DataExhaustedError(DataError):
    """Every train shard has been used and ``wrap`` is off."""


@dataclasses.dataclass
class Batch:
    inputs: torch.Tensor       # int32 (T,)
    targets: torch.Tensor      # int64 (T,)
    cu_seqlens: torch.Tensor   # int32 (max_num_docs,): document starts, then T, padded with T


def _docs_at_300(sequence_tokens: int) -> int:
    """The reference's ``ceil_to_128(T // 300)``: room for documents averaging 300 tokens."""
    return -(-(sequence_tokens // 300) // 128) * 128


def default_max_num_docs(sequence_tokens: int) -> int:
    """cu_seqlens length: the reference's ``ceil_to_128(T // 300)`` (room for documents averaging 300
    tokens) plus 128 spare entries, since corpora with shorter documents than FineWeb are common."""
    return _docs_at_300(sequence_tokens) + 128


# record 89's cu_seqlens lengths for its three micro-batch sizes (FineWeb; no spare entries)
TIGHT_MAX_NUM_DOCS = {16384: 64, 32768: 96, 49152: 128}


def max_num_docs_for(sequence_tokens: int, rule: str = "spare") -> int:
    """cu_seqlens length of a micro-batch of ``sequence_tokens`` tokens (``data.max_num_docs_rule``):
    "spare" = ``default_max_num_docs``; "tight" = record 89's table, ``ceil_to_128(T // 300)`` (at
    least 128) for other sizes. A micro-batch holds at most this minus one documents (else a
    DataError)."""
    if rule == "spare":
        return default_max_num_docs(sequence_tokens)
    if rule == "tight":
        return TIGHT_MAX_NUM_DOCS.get(sequence_tokens, max(128, _docs_at_300(sequence_tokens)))
    raise DataError(f"data.max_num_docs_rule: {rule!r}, expected spare or tight")


# ---- shard index and the plan of one micro-batch -------------------------------------------------

@dataclasses.dataclass
class ShardIndex:
    """A memory-mapped shard with its BOS positions and document lengths."""
    path: str
    tokens: np.ndarray         # uint16 memmap
    starts: np.ndarray         # int64 BOS positions
    lengths: np.ndarray        # int64 document lengths (to the next BOS or the shard's end)
    _cums: dict = dataclasses.field(default_factory=dict, repr=False)

    def cum(self, max_doc_len: int) -> np.ndarray:
        """int64 (len(starts)+1,): cum[i] = sum of the segment lengths (documents cut at
        max_doc_len) before BOS number i; computed once per cap (a stage table changes it)."""
        if max_doc_len not in self._cums:
            cum = np.zeros(len(self.starts) + 1, dtype=np.int64)
            np.cumsum(np.minimum(self.lengths, max_doc_len), out=cum[1:])
            self._cums[max_doc_len] = cum
        return self._cums[max_doc_len]


def check_vocabulary(tokens: np.ndarray, vocab_size: int | None, path: str, what: str = "") -> None:
    """Refuse token ids the model has no embedding for when the shard is opened (one max over the
    memory map), not as an IndexError (or a CUDA device assert) in the middle of a run."""
    if vocab_size is None or not len(tokens):
        return
    high = int(tokens.max())
    if high >= vocab_size:
        at = int(np.argmax(np.asarray(tokens) >= vocab_size))
        raise ShardError(f"{path}: token id {high} ({what}first at position {at}) is outside the model's "
                         f"vocabulary, model.vocab_size {vocab_size} (ids 0..{vocab_size - 1}); were these "
                         f"shards made with another tokenizer?")


def index_shard(path: str, bos_id: int, max_doc_len: int | None = None,
                vocab_size: int | None = None) -> ShardIndex:
    """Read and index a shard (in the background thread); ``max_doc_len``: also compute that cap's
    cumulative lengths now; ``vocab_size``: refuse token ids at or above it."""
    tokens = read_shard(path)
    check_vocabulary(tokens, vocab_size, path)
    starts = np.flatnonzero(tokens == bos_id).astype(np.int64)
    ends = np.append(starts[1:], len(tokens))        # a document ends where the next one starts
    index = ShardIndex(path, tokens, starts, ends - starts)
    if max_doc_len is not None:
        index.cum(max_doc_len)
    return index


def plan_micro_batch(shard: ShardIndex, cursor: int, need: int, max_doc_len: int
                     ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """Segments ``(starts, lengths)`` of ``need`` tokens taken from BOS number ``cursor`` on, and the
    next cursor; ``None`` if the shard's remaining documents cannot fill it.

    Same result as the reference's loop (take ``min(document, max_doc_len, still needed)`` tokens
    per BOS until full), found with one binary search over the cumulative segment lengths."""
    cum = shard.cum(max_doc_len)
    target = cum[cursor] + need
    k = int(np.searchsorted(cum, target, side="left"))         # first k with cum[k] >= target
    if k >= len(cum):
        return None
    last = k - 1                                               # segment in which the batch fills up
    starts = shard.starts[cursor:last + 1]
    lengths = np.diff(cum[cursor:last + 2])
    lengths[-1] = target - cum[last]
    return starts, lengths, last + 1


def make_batch(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, max_num_docs: int,
               device: torch.device, where: str = "") -> Batch:
    """Concatenate segments into ``T + 1`` tokens: inputs ``[:-1]``, targets ``[1:]``, cu_seqlens."""
    buf = np.concatenate([tokens[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())])
    seq = len(buf) - 1
    if len(lengths) > max_num_docs - 1:
        raise DataError(f"{where}a micro-batch holds {len(lengths)} documents, more than max_num_docs-1 "
                        f"= {max_num_docs - 1} (the cu_seqlens length less one); documents this short need "
                        f"data.max_num_docs_rule spare (--data.max_num_docs_rule spare)")
    cu = np.full(max_num_docs, seq, dtype=np.int32)
    cu[0] = 0
    cu[1:len(lengths)] = np.cumsum(lengths[:-1])               # the last segment ends at T, not T+1
    return _to_batch(buf, cu, device)


def _to_batch(buf: np.ndarray, cu: np.ndarray, device: torch.device) -> Batch:
    batch = Batch(torch.from_numpy(buf[:-1].astype(np.int32)), torch.from_numpy(buf[1:].astype(np.int64)),
                  torch.from_numpy(cu.astype(np.int32, copy=False)))
    if device.type == "cpu":
        return batch
    pin = device.type == "cuda"   # pinned host memory makes the copy truly asynchronous
    return Batch(*(t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)
                   for t in (batch.inputs, batch.targets, batch.cu_seqlens)))


# ---- background loading --------------------------------------------------------------------------

class _Prefetch(Generic[T_]):
    """Runs ``fn`` in a daemon thread (or lazily in the caller when not async); ``get`` returns the
    result or re-raises the thread's exception, so a failed load can never leave the caller waiting."""

    def __init__(self, fn: Callable[[], T_], run_async: bool):
        self._fn, self._result, self._error, self._done = fn, None, None, False
        self._thread = None
        if run_async:
            self._thread = threading.Thread(target=self._run, name="speedrun-shard-loader", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._fn()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer in get()
            self._error = e
        self._done = True

    def get(self) -> T_:
        if self._thread is not None:
            self._thread.join()
        elif not self._done:
            self._run()
        if self._error is not None:
            raise self._error
        return self._result


# ---- train loader --------------------------------------------------------------------------------

class TrainLoader:
    """This rank's micro-batches of each optimizer step; see the module docstring."""

    def __init__(self, pattern, *, tokens_per_step: int, sequence_tokens: int, world_size: int = 1,
                 rank: int = 0, max_doc_len: int = 2048, bos_id: int = 50256, wrap: bool = False,
                 async_loading: bool = True, device="cpu", max_num_docs: int | None = None,
                 max_num_docs_rule: str = "spare", vocab_size: int | None = None):
        """``tokens_per_step``, ``sequence_tokens``, ``max_doc_len``: the batch of the steps until
        ``next_step`` is given another. ``max_num_docs``: a fixed cu_seqlens length; by default it
        follows the micro-batch size by ``max_num_docs_rule`` (``max_num_docs_for``).
        ``vocab_size``: token ids must be below it (checked as each shard is indexed)."""
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.pattern = os.fspath(pattern)
        self.paths = shard_paths(self.pattern)
        for path in self.paths:   # fail on a malformed shard now, not hours into the run
            read_header(path)
        self.world_size, self.rank = world_size, rank
        self.bos_id, self.wrap = bos_id, wrap
        self.vocab_size = vocab_size   # ids must be below it (checked as each shard is indexed)
        self.async_loading = async_loading
        self.device = torch.device(device)
        self._fixed_max_num_docs, self.max_num_docs_rule = max_num_docs, max_num_docs_rule
        self.shape: BatchShape | None = None
        self._set_shape(BatchShape(tokens_per_step, sequence_tokens, max_doc_len))
        self._shard = self._cursor = self._steps = self._passes = 0
        self._loads: dict[int, _Prefetch[ShardIndex]] = {}
        self._closed = False
        self._prefetch(0)

    # -- position --
    def state_dict(self) -> dict:
        return {"shard": self._shard, "cursor": self._cursor, "steps": self._steps,
                "passes": self._passes, "shard_name": os.path.basename(self.paths[self._shard])}

    def load_state_dict(self, state: dict) -> None:
        shard = int(state["shard"])
        name = os.path.basename(self.paths[shard]) if 0 <= shard < len(self.paths) else None
        if name is None or name != state.get("shard_name", name):
            raise DataError(f"{self.pattern}: the saved loader position is in shard #{shard} "
                            f"'{state.get('shard_name')}', but the train shards now give {name!r} there; "
                            f"resume with the same train shards")
        self._shard, self._cursor = shard, int(state["cursor"])
        self._steps, self._passes = int(state.get("steps", 0)), int(state.get("passes", 0))
        self._loads = {}
        self._prefetch(self._shard)

    # -- batch shape --
    def _set_shape(self, shape: BatchShape) -> None:
        """The batch of the following steps (global tokens, micro-batch, document cap)."""
        _check_split(shape.tokens_per_step, shape.micro_batch_tokens, self.world_size)
        if shape.max_doc_len < 1:
            raise DataError(f"max_doc_len must be >= 1, got {shape.max_doc_len}")
        self.shape = shape
        self.tokens_per_step, self.sequence_tokens, self.max_doc_len = shape
        self.micro_batches = shape.micro_batches
        self.grad_accum = self.micro_batches // self.world_size
        self.max_num_docs = self._fixed_max_num_docs or max_num_docs_for(shape.micro_batch_tokens,
                                                                         self.max_num_docs_rule)

    # -- batches --
    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_step()

    def next_step(self, shape: BatchShape | None = None) -> list[Batch]:
        """This rank's ``grad_accum`` micro-batches of the next optimizer step; ``shape``: this
        step's batch (kept for the following steps), else the current one."""
        if self._closed:
            raise RuntimeError("TrainLoader.next_step() after close()")
        if shape is not None and shape != self.shape:
            self._set_shape(BatchShape(*shape))
        failed_fresh = 0   # shards that could not fill one step even from their start
        while True:
            shard = self._current()
            if self._cursor > len(shard.starts):
                raise DataError(f"{shard.path}: the loader position (document {self._cursor}) is past its "
                                f"{len(shard.starts)} documents; was the shard rewritten since the save?")
            plan = self._plan_step(shard, self._cursor)
            if plan is not None:
                break
            failed_fresh = failed_fresh + 1 if self._cursor == 0 else 0
            if failed_fresh > len(self.paths):
                raise DataError(f"{self.pattern}: no train shard can fill one optimizer step of "
                                f"{self.tokens_per_step} tokens (documents capped at {self.max_doc_len})")
            self._next_shard()
        segments, self._cursor = plan
        self._steps += 1
        where = f"{shard.path}: "
        return [make_batch(shard.tokens, s, n, self.max_num_docs, self.device, where) for s, n in segments]

    def _plan_step(self, shard: ShardIndex, cursor: int):
        """Walk all virtual micro-batches of the step; keep this rank's. None if the shard runs out."""
        first = self.rank * self.grad_accum
        mine = []
        for v in range(self.micro_batches):
            planned = plan_micro_batch(shard, cursor, self.sequence_tokens + 1, self.max_doc_len)
            if planned is None:
                return None
            starts, lengths, cursor = planned
            if first <= v < first + self.grad_accum:
                mine.append((starts, lengths))
        return mine, cursor

    # -- shards --
    def _current(self) -> ShardIndex:
        shard = self._prefetch(self._shard).get()
        self._prefetch(self._following(self._shard))   # index the next shard meanwhile
        return shard

    def _following(self, i: int) -> int | None:
        if i + 1 < len(self.paths):
            return i + 1
        return 0 if self.wrap else None

    def _prefetch(self, i: int | None) -> _Prefetch[ShardIndex]:
        if i is None:
            return None  # type: ignore[return-value]
        if i not in self._loads:
            path, bos, cap, vocab = self.paths[i], self.bos_id, self.max_doc_len, self.vocab_size
            # the current cap's lengths are summed in the background too; another cap's later
            self._loads[i] = _Prefetch(lambda: index_shard(path, bos, cap, vocab), self.async_loading)
        return self._loads[i]

    def _next_shard(self) -> None:
        nxt = self._following(self._shard)
        if nxt is None:
            names = os.path.basename(self.paths[0])
            if len(self.paths) > 1:
                names += f" .. {os.path.basename(self.paths[-1])}"
            hint = "" if self._steps else (f" (together they hold less than one step of "
                                           f"{self.tokens_per_step} tokens, documents capped at {self.max_doc_len})")
            raise DataExhaustedError(
                f"training data exhausted after {self._steps} steps: all {len(self.paths)} train shards "
                f"of {self.pattern} ({names}) are used{hint}; add shards, train fewer steps, or set "
                f"data.wrap=true to start over at the first shard")
        if nxt <= self._shard:
            self._passes += 1
        if nxt != self._shard:
            self._loads.pop(self._shard, None)   # done with it: drop the memory map
        self._shard, self._cursor = nxt, 0

    def close(self) -> None:
        """Stop using the loader (daemon loading threads need no join)."""
        self._closed = True
        self._loads = {}

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_split(tokens_per_step: int, sequence_tokens: int, world_size: int) -> None:
    if sequence_tokens < 1 or tokens_per_step < sequence_tokens or tokens_per_step % sequence_tokens:
        raise DataError(f"tokens_per_step ({tokens_per_step}) must be a positive multiple of "
                        f"sequence_tokens ({sequence_tokens})")
    micro = tokens_per_step // sequence_tokens
    if world_size < 1 or micro % world_size:
        raise DataError(f"tokens_per_step/sequence_tokens = {micro} micro-batches per step is not "
                        f"divisible by the world size {world_size}")


# ---- validation loader ---------------------------------------------------------------------------

class ValLoader:
    """This rank's share of the fixed first ``num_tokens`` val tokens; iterate it once per evaluation."""

    def __init__(self, pattern, *, num_tokens: int, sequence_tokens: int, world_size: int = 1,
                 rank: int = 0, bos_id: int = 50256, device="cpu", max_num_docs: int | None = None,
                 max_num_docs_rule: str = "spare", vocab_size: int | None = None):
        if sequence_tokens < 1 or num_tokens < sequence_tokens or num_tokens % sequence_tokens:
            raise DataError(f"val num_tokens ({num_tokens}) must be a positive multiple of "
                            f"sequence_tokens ({sequence_tokens})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside 0..{world_size - 1}")
        self.pattern = os.fspath(pattern)
        self.sequence_tokens, self.bos_id = sequence_tokens, bos_id
        self.device = torch.device(device)
        self.max_num_docs = max_num_docs or max_num_docs_for(sequence_tokens, max_num_docs_rule)
        self.tokens = self._first_tokens(shard_paths(self.pattern), num_tokens + 1, vocab_size)
        self.num_chunks = num_tokens // sequence_tokens
        self.chunks = range(rank, self.num_chunks, world_size)   # may be uneven across ranks

    def _first_tokens(self, paths: list[str], need: int, vocab_size: int | None) -> np.ndarray:
        """The first ``need`` tokens across the val shards, copied into memory once."""
        pieces, have = [], 0
        for path in paths:
            if have >= need:
                break
            tokens = read_shard(path)
            pieces.append(np.array(tokens[:need - have]))
            check_vocabulary(pieces[-1], vocab_size, path, what="in the validation tokens, ")
            have += len(pieces[-1])
        if have < need:
            raise DataError(f"{self.pattern}: the val shards hold {have} tokens, fewer than the "
                            f"{need} needed (num_tokens {need - 1} plus one target); lower the val tokens")
        return np.concatenate(pieces)

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Batch]:
        for i in self.chunks:
            yield self.batch(i)

    def batch(self, i: int) -> Batch:
        """Chunk ``i``: tokens ``[i*T, (i+1)*T]``; documents start at 0 (maybe mid-document) and at each BOS."""
        seq = self.sequence_tokens
        buf = self.tokens[i * seq:(i + 1) * seq + 1]
        starts = np.flatnonzero(buf[:seq] == self.bos_id)
        starts = starts[starts > 0]
        if len(starts) + 2 > self.max_num_docs:
            raise DataError(f"{self.pattern}: val chunk {i} holds {len(starts) + 1} documents, more than "
                            f"max_num_docs-1 = {self.max_num_docs - 1}; pass a larger max_num_docs")
        cu = np.full(self.max_num_docs, seq, dtype=np.int32)
        cu[0] = 0
        cu[1:len(starts) + 1] = starts
        return _to_batch(buf, cu, self.device)
