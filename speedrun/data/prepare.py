"""Making shards: local text / JSON-lines corpora -> ``.bin`` shards (``speedrun data text``), and the
download of the pre-tokenized FineWeb shards from the Hugging Face hub (``speedrun data fineweb``).

Text layout follows the reference's ``data/fineweb.py``: every document is ``[50256] + tokens`` (the
separator is a *prefix*), documents are concatenated in input order and cut into fixed-size shards
(a document may continue into the next shard); shard 0 is the validation split.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np

from speedrun.data.shards import DataError, ShardError, read_header, write_shard
from speedrun.data.tokenizer import EOT_ID, encode_document, get_tokenizer
from speedrun.utils import human_count, probe_writable

DEFAULT_VAL_TOKENS = 1_000_000
DEFAULT_SHARD_TOKENS = 100_000_000
AUTO_VAL_FRACTION = 10            # automatic val split: at most 1/10 of the corpus
TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")
_POOL_MIN_BYTES = 1 << 20         # below this much text, worker start-up costs more than it saves
_CHUNK_BYTES = 1 << 20            # text per worker task (ordered, bounded in-flight window)
_CHUNK_DOCS = 256


class InputError(DataError):
    """A text input is missing, unreadable or lacks the requested JSON field."""


def shard_name(prefix: str, index: int) -> str:
    """Reference naming: shard 0 is ``{prefix}_val_000000.bin``, then ``{prefix}_train_000001.bin``..."""
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.bin"


# ---- inputs -> documents -------------------------------------------------------------------------

def list_input_files(inputs: Iterable[str]) -> list[str]:
    """Expand inputs: files as given, directories recursively (``*.txt``, ``*.jsonl``, ``*.json``), sorted."""
    files: list[str] = []
    for item in inputs:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(item)
                for name in names if name.endswith(TEXT_SUFFIXES + JSON_SUFFIXES))
            if not found:
                raise InputError(f"{item}: directory has no .txt, .jsonl or .json files")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such input file or directory")
    return files


def iter_documents(files: Iterable[str], field: str = "text") -> Iterator[tuple[str, int]]:
    """Yield ``(text, source bytes)`` per document: a whole text file, or one JSON record's ``field``."""
    for path in files:
        if path.endswith(JSON_SUFFIXES):
            yield from _json_documents(path, field)
        else:
            yield _read_text(path), os.path.getsize(path)


def _read_text(path: str) -> str:
    try:  # newline="" keeps \r\n as is, so decoding the shards gives back the exact file
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _json_documents(path: str, field: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # a .json file holding one array of records
        with open(path, encoding="utf-8") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        size = os.path.getsize(path) // max(1, len(records))
        for number, record in enumerate(records, 1):
            yield _field_text(record, field, path, number), size
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InputError(f"{path}:{number}: not a valid JSON line ({e})") from None
            yield _field_text(record, field, path, number), len(line)


def _field_text(record, field: str, path: str, number: int) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(list(record)[:8]) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"{path}:{number}: record has no field '{field}' (has: {keys}); "
                         f"choose the text field with --field")
    value = record[field]
    if not isinstance(value, str):
        raise InputError(f"{path}:{number}: field '{field}' is {type(value).__name__}, expected a string")
    return value


# ---- long texts -> documents of bounded length ---------------------------------------------------

# A cut right before the last character of a whitespace run that holds a line break (and is followed
# by a non-space) is token-exact: GPT-2's pre-tokenizer gives the same pieces on both sides as for the
# whole text (the run's last character always starts a new piece). So line pieces can be tokenized
# separately and regrouped freely: the concatenation equals the whole text's tokens.
_LINE_BREAK = re.compile(r"\n[ \t\r\n]*(?=\S)")


def _line_pieces(text: str) -> tuple[list[str], list[bool]]:
    """Split text at token-exact line breaks; flags mark pieces that start a paragraph (blank line)."""
    pieces, starts, begin, para = [], [], 0, True
    for match in _LINE_BREAK.finditer(text):
        cut = match.end() - 1
        if cut > begin:
            pieces.append(text[begin:cut])
            starts.append(para)
            begin = cut
        para = match.group().count("\n") >= 2
    pieces.append(text[begin:])
    starts.append(para)
    return pieces, starts


def split_document(text: str, max_tokens: int) -> list[np.ndarray]:
    """Cut one long text into BOS-prefixed documents of at most ``max_tokens`` tokens (BOS included).

    Whole paragraphs (blank-line separated) are packed greedily; a paragraph too long for one
    document is packed line by line, and a line too long for one is cut at token boundaries. The
    token stream without the BOS separators equals the tokens of ``text``."""
    if max_tokens < 2:
        raise InputError(f"documents need at least 2 tokens (BOS + text), got max_tokens={max_tokens}")
    enc, limit = get_tokenizer(), max_tokens - 1
    pieces, starts = _line_pieces(text)
    paragraphs: list[list[list[int]]] = []
    for piece, start in zip(pieces, starts):
        if start or not paragraphs:
            paragraphs.append([])
        paragraphs[-1].append(enc.encode_ordinary(piece))
    docs: list[list[int]] = [[]]
    for lines in paragraphs:
        size = sum(len(line) for line in lines)
        if size <= limit:
            _pack(docs, [t for line in lines for t in line], limit)
            continue
        for line in lines:  # an over-long paragraph: pack its lines, cut over-long lines
            for at in range(0, len(line), limit):
                _pack(docs, line[at:at + limit], limit)
    return [np.array([EOT_ID] + doc, dtype=np.uint16) for doc in docs if doc]


def _pack(docs: list[list[int]], tokens: list[int], limit: int) -> None:
    if docs[-1] and len(docs[-1]) + len(tokens) > limit:
        docs.append([])
    docs[-1].extend(tokens)


# ---- documents -> tokens (parallel, ordered) -----------------------------------------------------

def _encode_chunk(texts: list[str], max_doc_tokens: int = 0) -> list[np.ndarray]:
    """Per input document one uint16 array: ``[EOT] + tokens``, or several such documents when
    ``max_doc_tokens`` > 0 (see :func:`split_document`), concatenated."""
    if max_doc_tokens <= 0:
        return [encode_document(t) for t in texts]
    return [np.concatenate(split_document(t, max_doc_tokens)) for t in texts]


def _warm_worker() -> None:
    get_tokenizer()


def _chunks(docs: Iterable[tuple[str, int]]) -> Iterator[tuple[list[str], int]]:
    texts, nbytes, size = [], 0, 0
    for text, source_bytes in docs:
        texts.append(text)
        nbytes += source_bytes
        size += len(text)
        if size >= _CHUNK_BYTES or len(texts) >= _CHUNK_DOCS:
            yield texts, nbytes
            texts, nbytes, size = [], 0, 0
    if texts:
        yield texts, nbytes


def tokenize_documents(docs: Iterable[tuple[str, int]], workers: int = 1, max_doc_tokens: int = 0
                       ) -> Iterator[tuple[list[np.ndarray], int]]:
    """Tokenize documents in input order; yields ``(token arrays, source bytes)`` per chunk.

    With several workers, chunks go to a process pool through a bounded window of in-flight tasks
    (``Pool.imap`` would read the whole input ahead into memory); results come back in order, so the
    output is identical for every worker count."""
    if workers <= 1:
        for texts, nbytes in _chunks(docs):
            yield _encode_chunk(texts, max_doc_tokens), nbytes
        return
    with multiprocessing.get_context().Pool(workers, initializer=_warm_worker) as pool:
        window: collections.deque = collections.deque()
        for texts, nbytes in _chunks(docs):
            window.append((pool.apply_async(_encode_chunk, (texts, max_doc_tokens)), nbytes))
            if len(window) >= 4 * workers:
                result, n = window.popleft()
                yield result.get(), n
        while window:
            result, n = window.popleft()
            yield result.get(), n


# ---- tokens -> shards ----------------------------------------------------------------------------

class ShardWriter:
    """Cuts a token stream into shards: shard 0 (val) of ``val_tokens``, then train shards of
    ``shard_tokens`` (the last one holds the remainder).

    ``val_tokens=None`` picks the split automatically: ``min(DEFAULT_VAL_TOKENS, total // 10)``, so a
    small corpus gives at most a tenth of itself to validation. To know the total without holding a
    big corpus in memory, tokens are buffered only until ``10 * DEFAULT_VAL_TOKENS`` have arrived
    (from then on the default is certain). ``val_tokens=0`` writes no val shard."""

    def __init__(self, out_dir: str, prefix: str, val_tokens: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens <= 0:
            raise InputError(f"shard_tokens must be positive, got {shard_tokens}")
        if val_tokens is not None and val_tokens < 0:
            raise InputError(f"val_tokens must be >= 0, got {val_tokens}")
        self.out_dir, self.prefix, self.shard_tokens = out_dir, prefix, shard_tokens
        self.pieces: list[np.ndarray] = []
        self.buffered = self.total = 0
        self.index = 0                 # the next shard's number
        self.paths: list[str] = []
        self.sizes: list[int] = []
        self.val_tokens: int | None = None
        if val_tokens is not None:
            self._set_val_tokens(val_tokens)

    def _set_val_tokens(self, n: int) -> None:
        self.val_tokens = n
        if n == 0:
            self.index = 1             # no val shard; train shards keep their reference numbering

    def add(self, tokens: np.ndarray) -> None:
        self.pieces.append(tokens)
        self.buffered += len(tokens)
        self.total += len(tokens)
        if self.val_tokens is None and self.total >= AUTO_VAL_FRACTION * DEFAULT_VAL_TOKENS:
            self._set_val_tokens(DEFAULT_VAL_TOKENS)
        self._flush(final=False)

    def finish(self) -> list[str]:
        if self.val_tokens is None:
            self._set_val_tokens(min(DEFAULT_VAL_TOKENS, self.total // AUTO_VAL_FRACTION))
        if self.index == 0 and 0 < self.val_tokens and self.total <= self.val_tokens:
            raise InputError(f"the input has only {self.total} tokens: not enough for {self.val_tokens} "
                             f"val tokens plus training data; lower --val-tokens")
        self._flush(final=True)
        return self.paths

    def _flush(self, final: bool) -> None:
        if self.val_tokens is None:    # automatic split not decided yet: keep buffering
            return
        while True:
            if self.index == 0:        # val waits for one token more: val alone is an error (finish)
                target, ready = self.val_tokens, self.buffered > self.val_tokens
            else:
                target, ready = self.shard_tokens, self.buffered >= self.shard_tokens
            if not ready:
                break
            self._write(target)
        if final and self.buffered > 0:
            self._write(self.buffered)

    def _write(self, n: int) -> None:
        tokens = np.concatenate(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
        rest = tokens[n:]
        self.pieces = [rest] if len(rest) else []
        self.buffered = len(rest)
        path = os.path.join(self.out_dir, shard_name(self.prefix, self.index))
        write_shard(path, tokens[:n])
        self.paths.append(path)
        self.sizes.append(n)
        self.index += 1


# ---- the `speedrun data text` job ----------------------------------------------------------------

@dataclasses.dataclass
class PrepareSummary:
    files: int
    documents: int
    empty_documents: int       # documents with no text: skipped (they would be a lone separator)
    shard_documents: int       # documents in the shards (more than ``documents`` with max_doc_tokens)
    longest_document: int      # tokens, separator included
    tokens: int
    val_tokens: int
    shards: list[str]
    shard_tokens: list[int]
    seconds: float
    removed: list[str]         # stale shards of an earlier run with the same prefix

    def __str__(self) -> str:
        rate = self.tokens / max(self.seconds, 1e-9)
        skipped = f" ({self.empty_documents} empty skipped)" if self.empty_documents else ""
        split = f" cut into {self.shard_documents}" if self.shard_documents != self.documents else ""
        return (f"{self.documents} documents{skipped}{split} from {self.files} files -> {self.tokens} tokens "
                f"({human_count(self.tokens)}; val {self.val_tokens}, train {self.tokens - self.val_tokens}) "
                f"in {len(self.shards)} shards, {self.seconds:.1f}s ({human_count(rate)} tokens/s)")


def default_prefix(inputs: list[str]) -> str:
    """The first input's name without extension, reduced to ``[A-Za-z0-9_-]``; ``text`` if that is empty."""
    if not inputs:
        return "text"
    stem = os.path.basename(os.path.normpath(inputs[0])).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "text"


def prepare_text(inputs: list[str], out_dir: str, *, field: str = "text", val_tokens: int | None = None,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str | None = None,
                 max_doc_tokens: int = 0, workers: int | None = None, progress: bool = True,
                 log: Callable[[str], None] | None = None) -> PrepareSummary:
    """Tokenize text / JSON-lines inputs into ``out_dir`` shards; deterministic for any ``workers``.

    Each input document (a whole text file, or one JSON record) becomes ``[50256] + tokens``; with
    ``max_doc_tokens`` > 0 it is first cut at paragraph/line boundaries into documents of at most that
    many tokens (long books would otherwise be truncated by the loader's ``max_doc_len``)."""
    log = log or _stderr
    start = time.time()
    files = list_input_files(inputs)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"--out {out_dir}: is a file, expected a directory for the shards")
    probe_writable(out_dir)   # a read-only or misplaced --out fails now, not after the tokenizing
    prefix = prefix or default_prefix(inputs)
    total_bytes = sum(os.path.getsize(p) for p in files)
    workers = workers or os.cpu_count() or 1
    if total_bytes < _POOL_MIN_BYTES:
        workers = 1
    writer = ShardWriter(out_dir, prefix, val_tokens, shard_tokens)
    counts = {"docs": 0, "empty": 0, "out_docs": 0, "longest": 0}
    bar = _Progress(total_bytes, progress, log)

    def documents() -> Iterator[tuple[str, int]]:
        for text, nbytes in iter_documents(files, field):
            if text:
                counts["docs"] += 1
                yield text, nbytes
            else:
                counts["empty"] += 1
                bar.update(nbytes, 0)

    try:
        for arrays, nbytes in tokenize_documents(documents(), workers, max_doc_tokens):
            for tokens in arrays:
                writer.add(tokens)
                _count_documents(tokens, counts)
            bar.update(nbytes, sum(len(a) for a in arrays))
        bar.close()
        if writer.total == 0:
            raise InputError(f"{', '.join(inputs)}: no text to tokenize ({len(files)} file(s), "
                             f"{counts['empty']} empty document(s)); nothing was written")
        paths = writer.finish()
    except BaseException:
        # a failed run (a full disk, a bad record, Ctrl-C) leaves no part of its shard set: a loader
        # glob would otherwise mix this run's first shards with an earlier run's others
        for path in writer.paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    removed = _remove_stale(out_dir, prefix, paths)
    return PrepareSummary(len(files), counts["docs"], counts["empty"], counts["out_docs"],
                          counts["longest"], writer.total, writer.val_tokens or 0, paths, writer.sizes,
                          time.time() - start, removed)


def _count_documents(tokens: np.ndarray, counts: dict) -> None:
    starts = np.flatnonzero(tokens == EOT_ID)   # text never encodes to EOT_ID: separators only
    counts["out_docs"] += len(starts)
    if len(starts):
        counts["longest"] = max(counts["longest"], int(np.diff(np.append(starts, len(tokens))).max()))


def _remove_stale(out_dir: str, prefix: str, keep: list[str]) -> list[str]:
    """Delete shards with our naming left by an earlier run (a loader glob would mix them in)."""
    pattern = re.compile(rf"{re.escape(prefix)}_(val|train)_\d{{6}}\.bin")
    kept = {os.path.basename(p) for p in keep}
    removed = []
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        if pattern.fullmatch(name) and name not in kept:
            os.unlink(os.path.join(out_dir, name))
            removed.append(os.path.join(out_dir, name))
    return removed


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Progress:
    """tqdm bar on a terminal; otherwise a plain line every 10 s (logs stay readable)."""

    def __init__(self, total_bytes: int, enabled: bool, log: Callable[[str], None]):
        self.total, self.done, self.tokens = total_bytes, 0, 0
        self.enabled, self.log = enabled, log
        self.start = self.last = time.time()
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
            except ImportError:
                pass

    def update(self, nbytes: int, tokens: int) -> None:
        self.done += nbytes
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(nbytes)
            self.bar.set_postfix(tokens=self.tokens, refresh=False)
        elif self.enabled and time.time() - self.last >= 10:
            self.last = time.time()
            rate = self.tokens / max(self.last - self.start, 1e-9)
            self.log(f"tokenizing: {100 * self.done / max(self.total, 1):.0f}% of "
                     f"{self.total / 1e6:.1f} MB, {self.tokens} tokens, {rate / 1e6:.2f}M tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- FineWeb (pre-tokenized shards on the Hugging Face hub) --------------------------------------

@dataclasses.dataclass(frozen=True)
class FinewebVariant:
    repo_id: str
    prefix: str
    train_chunks: int          # 100M-token train chunks the repo holds


FINEWEB_VARIANTS = {
    "10B": FinewebVariant("kjj0/fineweb10B-gpt2", "fineweb", 103),
    "100B": FinewebVariant("kjj0/fineweb100B-gpt2", "fineweb", 1030),
    "edu10B": FinewebVariant("kjj0/finewebedu10B-gpt2", "finewebedu", 99),
}

# fetch(repo_id, filename, local_dir, endpoint) -> path of the downloaded file (inside local_dir)
Fetch = Callable[[str, str, str, "str | None"], str]


class DownloadError(RuntimeError):
    """A download failed; the one-line message says what failed and what to do instead."""
    user_error = True


def fineweb_filenames(n_train_chunks: int, variant: str = "10B") -> list[str]:
    """The val shard, then train chunks 1..n (the reference's ``cached_fineweb*.py`` file list)."""
    prefix = _variant(variant).prefix
    return [shard_name(prefix, i) for i in range(n_train_chunks + 1)]


def _variant(variant: str) -> FinewebVariant:
    if variant not in FINEWEB_VARIANTS:
        raise DataError(f"unknown FineWeb variant '{variant}', expected one of {', '.join(FINEWEB_VARIANTS)}")
    return FINEWEB_VARIANTS[variant]


def download_fineweb(n_train_chunks: int, variant: str = "10B", out_dir: str | None = None, *,
                     repo_id: str | None = None, endpoint: str | None = None, fetch: Fetch | None = None,
                     log: Callable[[str], None] | None = None) -> list[str]:
    """Download the FineWeb val shard and ``n_train_chunks`` train chunks into ``out_dir``.

    Files already complete (valid header, size matching the token count) are skipped; others are
    downloaded into ``out_dir/.download`` (huggingface_hub resumes partial files there), checked,
    then renamed into place, so ``out_dir`` never holds a partial shard under a final name.
    ``fetch`` replaces the hub download (tests use a local fake repository)."""
    spec = _variant(variant)
    log = log or _stderr
    if n_train_chunks < 0 or (repo_id is None and n_train_chunks > spec.train_chunks):
        raise DataError(f"FineWeb {variant} has train chunks 1..{spec.train_chunks}; got {n_train_chunks}")
    repo_id = repo_id or spec.repo_id
    out_dir = out_dir or os.path.join("data", f"fineweb{variant}")   # the reference's data/fineweb10B etc.
    fetch = fetch or _hf_fetch
    staging = os.path.join(out_dir, ".download")
    paths = []
    for name in fineweb_filenames(n_train_chunks, variant):
        final = os.path.join(out_dir, name)
        paths.append(final)
        state = _shard_state(final)
        if state == "complete":
            log(f"{final}: complete, skipped")
            continue
        if state != "missing":
            log(f"{final}: {state}; downloading it again")
        os.makedirs(staging, exist_ok=True)
        log(f"{final}: downloading from {repo_id} ...")
        got = _fetch_one(fetch, repo_id, name, staging, endpoint, out_dir)
        try:
            tokens = read_header(got)
        except ShardError as e:
            raise DownloadError(f"downloaded {name} from {repo_id} is not a complete shard ({e}); "
                                f"run the command again to re-download it") from None
        os.replace(got, final)
        log(f"{final}: downloaded, {tokens} tokens")
    shutil.rmtree(staging, ignore_errors=True)
    return paths


def _shard_state(path: str) -> str:
    if not os.path.exists(path):
        return "missing"
    try:
        read_header(path)
    except ShardError as e:
        return f"incomplete ({str(e).split(': ', 1)[-1]})"
    return "complete"


def _fetch_one(fetch: Fetch, repo_id: str, name: str, staging: str, endpoint: str | None,
               out_dir: str) -> str:
    try:
        return fetch(repo_id, name, staging, endpoint)
    except (KeyboardInterrupt, DownloadError):
        raise
    except Exception as e:  # noqa: BLE001 - every hub/network failure gets the same advice
        where = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        reason = " ".join(str(e).split())[:200] or "no details"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        network = "unset HF_HUB_OFFLINE" if offline else "check the network"
        raise DownloadError(
            f"could not download {name} from the Hugging Face dataset {repo_id} at {where} "
            f"({type(e).__name__}: {reason}); {network} or set HF_ENDPOINT to a reachable mirror, "
            f"or copy the .bin shards into {out_dir} by hand, or make shards from local text with "
            f"`speedrun data text`") from None


def _hf_fetch(repo_id: str, filename: str, local_dir: str, endpoint: str | None) -> str:
    try:
        from huggingface_hub import hf_hub_download  # optional dependency: only this download needs it
    except ImportError:
        raise DownloadError("the FineWeb download needs huggingface_hub: pip install huggingface_hub "
                            "(or the extra speedrun-gpt[fineweb]); or copy the .bin shards by hand") from None
    return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset",
                           local_dir=local_dir, endpoint=endpoint)
