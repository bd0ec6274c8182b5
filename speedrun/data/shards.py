"""The ``.bin`` token shard format of llm.c / modded-nanogpt: write, memory-mapped read, validate.

Layout (all little-endian): a header of 256 int32 = 1024 bytes ``[MAGIC, VERSION, token count, 0, ...]``
followed by ``token count`` uint16 token ids. Files written here load in the reference scripts and
theirs load here unchanged. Every malformed file raises :class:`ShardError` with a one-line message
naming the file and what was expected.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np

from speedrun.utils import atomic_open

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")      # explicit little-endian so big-endian hosts read the same bytes
MAX_TOKEN_ID = 2**16 - 1


class DataError(ValueError):
    """Bad data input (shards, text, loader settings); the message is one line for the user."""
    user_error = True


class ShardError(DataError):
    """A shard file or shard pattern is malformed; the message names the file and what was expected."""


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int]) -> None:
    """Write ``tokens`` as one shard, atomically (temp file + rename: no half-written shards)."""
    path = os.fspath(path)
    array = _as_token_array(tokens, path)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(array))
    with atomic_open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(array.tobytes())


def _as_token_array(tokens: np.ndarray | Sequence[int], path: str) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ShardError(f"{path}: expected a 1-D sequence of token ids, got shape {array.shape}")
    if array.size == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    if array.dtype.kind not in "iu":
        raise ShardError(f"{path}: expected integer token ids, got dtype {array.dtype}")
    if array.dtype == TOKEN_DTYPE:
        return array
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > MAX_TOKEN_ID:
        bad = low if low < 0 else high
        raise ShardError(f"{path}: token id {bad} out of range; the shard format stores uint16 ids "
                         f"0..{MAX_TOKEN_ID}")
    return array.astype(TOKEN_DTYPE)


def read_header(path: str | os.PathLike) -> int:
    """Validate the header and the file size; return the token count. Reads only 1024 bytes."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ShardError(f"{path}: is a directory, expected a .bin shard file")
    size = os.path.getsize(path)    # FileNotFoundError for a missing file, on purpose
    if size == 0:
        raise ShardError(f"{path}: empty file, expected a {HEADER_BYTES}-byte shard header "
                         f"(magic {MAGIC}) followed by uint16 tokens")
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise ShardError(f"{path}: truncated header ({len(raw)} bytes), expected {HEADER_BYTES} bytes "
                         f"starting with magic {MAGIC}")
    magic, version, count = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        raise ShardError(f"{path}: wrong magic number {magic}, expected {MAGIC} (not a token shard?)")
    if version != VERSION:
        raise ShardError(f"{path}: unsupported shard version {version}, expected {VERSION}")
    if count < 0:
        raise ShardError(f"{path}: negative token count {count} in the header")
    body = size - HEADER_BYTES
    if body < 2 * count:
        raise ShardError(f"{path}: truncated body: header says {count} tokens ({2 * count} bytes) "
                         f"but the file has {body} bytes after the header")
    if body != 2 * count:
        raise ShardError(f"{path}: header token count {count} does not match the body size "
                         f"({body} bytes = {body / 2:g} tokens)")
    return count


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Memory-map a shard's tokens as a read-only little-endian uint16 array (after validating it)."""
    path = os.fspath(path)
    count = read_header(path)
    if count == 0:  # np.memmap cannot map zero bytes
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def shard_paths(pattern: str | os.PathLike) -> list[str]:
    """Sorted shard files for a file, a directory (its ``*.bin`` files) or a glob pattern."""
    pattern = os.path.expanduser(os.fspath(pattern))
    if os.path.isfile(pattern):
        return [pattern]
    if os.path.isdir(pattern):
        paths = sorted(p for p in glob.glob(os.path.join(glob.escape(pattern), "*.bin")) if os.path.isfile(p))
        if not paths:
            raise ShardError(f"{pattern}: directory has no .bin shard files")
        return paths
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        if any(c in pattern for c in "*?["):
            raise ShardError(f"{pattern}: no shard files match this pattern")
        raise ShardError(f"{pattern}: no such shard file or directory")
    return paths
