"""The embedded default corpus: 42 works of Shakespeare bundled with the package
(``assets/shakespeare.jsonl.xz``), turned into token shards on first use and cached, so the default
command works offline on a fresh install.

Documents: the loader truncates documents at ``max_doc_len`` and skips their tails, so each work is
cut at paragraph (blank-line) boundaries into documents of at most ``DOC_TOKENS`` tokens
(``prepare.split_document``; token-exact, nothing dropped).

Split: the validation shard holds two whole, unseen plays (``VAL_WORKS``: Macbeth, then Julius Caesar)
cut to exactly ``VAL_TOKENS + 1`` tokens (about 4% of the corpus), so ``val_tokens = 65536`` (a
multiple of 16384) fits with its final target token; the rest of those two plays is not used. The
other 40 works, in file order, form one train shard.

Cache: ``$SPEEDRUN_CACHE/embedded/shakespeare-v1`` (default root ``~/.cache/speedrun``). It is built
in a temporary directory and renamed into place, so concurrent processes never see a partial cache:
the first rename wins and the others use its result.
"""
from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import tempfile

import numpy as np

from speedrun.data.prepare import shard_name, split_document
from speedrun.data.shards import ShardError, read_header, write_shard
from speedrun.data.tokenizer import EOT_ID
from speedrun.utils import current_umask

CORPUS = "shakespeare-v1"        # bump when the preparation below changes: old caches are rebuilt
PREFIX = "shakespeare"
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shakespeare.jsonl.xz")
DOC_TOKENS = 1024
VAL_WORKS = ("macbeth", "julius_caesar")
VAL_TOKENS = 65536
INFO_FILE = "info.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> str:
    """``cache_dir``, else ``$SPEEDRUN_CACHE``, else ``~/.cache/speedrun``."""
    root = cache_dir or os.environ.get("SPEEDRUN_CACHE") or os.path.join("~", ".cache", "speedrun")
    return os.path.abspath(os.path.expanduser(os.fspath(root)))


def embedded_dir(cache_dir: str | os.PathLike | None = None) -> str:
    return os.path.join(cache_root(cache_dir), "embedded", CORPUS)


def embedded_shards(cache_dir: str | os.PathLike | None = None) -> tuple[str, str]:
    """(train_glob, val_glob) of the embedded corpus, preparing the cache on first use."""
    directory = _ensure(cache_dir)
    return (os.path.join(directory, f"{PREFIX}_train_*.bin"),
            os.path.join(directory, f"{PREFIX}_val_*.bin"))


def embedded_info(cache_dir: str | os.PathLike | None = None) -> dict:
    """Counts of the prepared corpus: ``train_tokens``, ``train_documents``, ``val_tokens`` (usable
    by the val loader), ``val_shard_tokens`` (= val_tokens + 1), ``val_documents``, ``dir``, ..."""
    directory = _ensure(cache_dir)
    info = _read_info(directory)
    assert info is not None
    return dict(info, dir=directory)


# ---- cache handling ------------------------------------------------------------------------------

def _ensure(cache_dir) -> str:
    final = embedded_dir(cache_dir)
    if _read_info(final) is not None:
        return final
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{CORPUS}.tmp-", dir=parent)
    try:
        build(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; the cache is ordinary data
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if _read_info(final) is None:
        raise ShardError(f"{final}: the embedded corpus cache is invalid right after preparing it")
    return final


def _install(tmp: str, final: str) -> None:
    """Rename the freshly built directory into place; if another process got there first, keep theirs."""
    if os.path.exists(final) and _read_info(final) is None:  # a broken or outdated cache: move it aside
        stale = f"{final}.stale-{os.getpid()}"
        try:
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it already
    try:
        os.rename(tmp, final)
    except OSError:
        if _read_info(final) is None:  # nobody else produced a valid cache either
            raise


def _asset_hash() -> str:
    with open(ASSET, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_info(directory: str) -> dict | None:
    """The cache's info.json if it describes this corpus version and its shards are intact."""
    try:
        with open(os.path.join(directory, INFO_FILE), encoding="utf-8") as f:
            info = json.load(f)
        if info.get("corpus") != CORPUS or info.get("asset_sha256") != _asset_hash():
            return None
        for name, count in info["shards"].items():
            if read_header(os.path.join(directory, name)) != count:
                return None
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return info


# ---- preparation ---------------------------------------------------------------------------------

def load_works() -> list[dict]:
    """The bundled works in file order: dicts with ``title`` and ``text``."""
    with lzma.open(ASSET, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def build(out_dir: str) -> dict:
    """Write the train and val shards and ``info.json`` into ``out_dir``; return the info."""
    works = load_works()
    titles = [w["title"] for w in works]
    missing = [t for t in VAL_WORKS if t not in titles]
    if missing:
        raise ShardError(f"{ASSET}: validation works {missing} not found in the bundled corpus")
    docs = {w["title"]: split_document(w["text"], DOC_TOKENS) for w in works}
    val = np.concatenate([d for title in VAL_WORKS for d in docs[title]])[:VAL_TOKENS + 1]
    if len(val) != VAL_TOKENS + 1:
        raise ShardError(f"{ASSET}: the validation works hold only {len(val)} tokens, "
                         f"expected at least {VAL_TOKENS + 1}")
    train = np.concatenate([d for w in works if w["title"] not in VAL_WORKS for d in docs[w["title"]]])
    val_name, train_name = shard_name(PREFIX, 0), shard_name(PREFIX, 1)
    write_shard(os.path.join(out_dir, val_name), val)
    write_shard(os.path.join(out_dir, train_name), train)
    info = {
        "corpus": CORPUS,
        "asset_sha256": _asset_hash(),
        "doc_tokens": DOC_TOKENS,
        "works": len(works),
        "val_works": list(VAL_WORKS),
        "train_tokens": int(len(train)),
        "train_documents": int(np.count_nonzero(train == EOT_ID)),
        "val_tokens": VAL_TOKENS,
        "val_shard_tokens": int(len(val)),
        "val_documents": int(np.count_nonzero(val == EOT_ID)),
        "shards": {val_name: int(len(val)), train_name: int(len(train))},
    }
    with open(os.path.join(out_dir, INFO_FILE), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return info
