"""HellaSwag validation accuracy (Zellers et al. 2019; 10,042 items), scored as llm.c's and
modded-nanogpt's ``evals/hellaswag.py`` do: for each item, the context followed by each of its 4
endings; the prediction is the ending with the lowest *mean* loss per ending token
(length-normalized accuracy, the number usually quoted), and also the one with the lowest *summed*
loss (the sum accuracy). Chance is 25%.

Owns: the data file (download from the public source + cache, or a local ``.jsonl`` /
``.jsonl.gz``; every malformed line is reported with its file and line number), tokenization of
items, packing many items into one forward, and scoring.

Rows: ``<|endoftext|>`` (the BOS every training document starts with), the context tokens, then
the tokens of " " + ending (context and ending tokenized separately, as llm.c does). Rows are
packed into one sequence as separate documents (``cu_seqlens``), so attention never crosses rows.
Smear (the one-token look-back on embeddings) does cross document boundaries, so every row is
preceded by one extra ``<|endoftext|>``: each row's BOS then sees the same predecessor wherever it
sits in the pack, and an item's score does not depend on what it was batched with.
"""
from __future__ import annotations

import gzip
import json
import os
import time
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from speedrun.data.embedded import cache_root
from speedrun.data.tokenizer import EOT_ID
from speedrun.data.tokenizer import encode as encode_text
from speedrun.eval.loading import EvalError
from speedrun.utils import atomic_open

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
NUM_ITEMS = 10042
NUM_ENDINGS = 4
CACHE_NAME = "hellaswag_val.jsonl"
DOWNLOAD_TIMEOUT_S = 30


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int
    where: str = ""            # "file:line", for messages


@dataclass
class Rendered:
    """An item as tokens: the context and the 4 endings (each " " + ending)."""
    context: list[int]
    endings: list[list[int]]
    label: int

    def row_tokens(self) -> int:
        """Tokens of all 4 rows including the separator and BOS of each."""
        return sum(2 + len(self.context) + len(e) for e in self.endings)


@dataclass
class Result:
    items: int
    correct_norm: int          # by mean loss per ending token
    correct_sum: int           # by summed ending loss
    seconds: float = 0.0

    @property
    def acc_norm(self) -> float:
        return self.correct_norm / max(1, self.items)

    @property
    def acc_sum(self) -> float:
        return self.correct_sum / max(1, self.items)


# ---- data ------------------------------------------------------------------------------------------

def cache_path(cache_dir: str | None = None) -> str:
    return os.path.join(cache_root(cache_dir), "hellaswag", CACHE_NAME)


def data_file(path: str | None = None, cache_dir: str | None = None, url: str = URL) -> str:
    """The file to read: ``path`` if given, else the cached download, else download it now."""
    if path:
        if not os.path.isfile(path):
            raise EvalError(f"{path}: HellaSwag data file not found")
        return path
    cached = cache_path(cache_dir)
    if os.path.isfile(cached):
        return cached
    try:
        download(url, cached)
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        reason = getattr(e, "reason", None) or e
        raise EvalError(f"HellaSwag data: no --data file given and the download of {url} failed "
                        f"({reason}); pass --data FILE with a local copy of hellaswag_val.jsonl "
                        f"(.jsonl or .jsonl.gz)") from None
    return cached


def download(url: str, dest: str) -> None:
    """Fetch ``url`` into ``dest`` atomically (a broken download never becomes the cache)."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_open(dest, "wb") as f:
        while chunk := response.read(1 << 20):
            f.write(chunk)


def _open_text(path: str):
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def load_items(path: str, limit: int | None = None) -> list[Item]:
    """Items of a HellaSwag JSON-lines file (rowanz/hellaswag layout: ``ctx``, ``endings`` (4
    strings), ``label`` (0-3, an int or a digit string)); blank lines are skipped."""
    items: list[Item] = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if not line.strip():
                    continue
                items.append(parse_item(line, f"{path}:{lineno}"))
    except FileNotFoundError:
        raise EvalError(f"{path}: HellaSwag data file not found") from None
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: unreadable ({e})") from None
    if not items:
        raise EvalError(f"{path}: no HellaSwag items in the file")
    return items


def parse_item(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise EvalError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    expected = "expected an object with ctx (string), endings (4 strings) and label (0-3)"
    if not isinstance(record, dict):
        raise EvalError(f"{where}: {expected}")
    context, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if (not isinstance(context, str) or not isinstance(endings, list) or len(endings) != NUM_ENDINGS
            or not all(isinstance(e, str) for e in endings) or isinstance(label, bool)
            or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS):
        missing = [k for k in ("ctx", "endings", "label") if k not in record]
        raise EvalError(f"{where}: {expected}" + (f"; missing {', '.join(missing)}" if missing else ""))
    return Item(context, endings, label, where)


def render(item: Item, encode: Callable[[str], list[int]] | None = None) -> Rendered:
    encode = encode or encode_text
    return Rendered(encode(item.context), [encode(" " + e) for e in item.endings], item.label)


# ---- packing ---------------------------------------------------------------------------------------

@dataclass
class Pack:
    """Rows of several items in one sequence of exactly ``len(inputs)`` tokens."""
    inputs: Tensor             # (T,) int32
    targets: Tensor            # (T,) int64: the next token (ignored outside ending spans)
    cu_seqlens: Tensor         # (n,) int32 document starts, then T
    spans: list[list[tuple[int, int]]]   # per item, per ending: [start, end) of its losses
    labels: list[int]


def pack_items(rendered: Sequence[Rendered], batch_tokens: int) -> Iterator[Pack]:
    """Group consecutive items into packs of at most ``batch_tokens`` tokens, every pack padded to
    exactly that size (one shape: compiled kernels are built once). An item larger than that gets
    a pack of its own, rounded up to a multiple of 128 tokens."""
    group: list[Rendered] = []
    used = 0
    for r in rendered:
        need = r.row_tokens()
        if group and used + need > batch_tokens:
            yield _pack(group, batch_tokens)
            group, used = [], 0
        group.append(r)
        used += need
    if group:
        yield _pack(group, max(batch_tokens, -(-used // 128) * 128))


def _pack(group: Sequence[Rendered], size: int) -> Pack:
    tokens: list[int] = []
    starts: list[int] = [0]             # position 0: the first separator is its own document
    spans: list[list[tuple[int, int]]] = []
    for r in group:
        item_spans = []
        for ending in r.endings:
            tokens.append(EOT_ID)       # separator: the fixed predecessor of the row's BOS
            starts.append(len(tokens))
            tokens.append(EOT_ID)       # the row's BOS
            tokens += r.context
            first = len(tokens)
            tokens += ending
            # the loss at position p scores token p + 1: the ending's tokens are scored by the
            # losses at first-1 .. last-1
            item_spans.append((first - 1, len(tokens) - 1))
        spans.append(item_spans)
    if len(tokens) > size:
        size = -(-len(tokens) // 128) * 128
    if len(tokens) < size:
        starts.append(len(tokens))      # padding: one more document
        tokens += [EOT_ID] * (size - len(tokens))
    starts.append(size)
    ids = torch.tensor(tokens, dtype=torch.int32)
    targets = torch.cat([ids[1:].long(), torch.tensor([EOT_ID])])
    return Pack(ids, targets, torch.tensor(starts, dtype=torch.int32), spans, [r.label for r in group])


# ---- scoring ---------------------------------------------------------------------------------------

TokenLosses = Callable[[Tensor, Tensor, Tensor], Tensor]


def model_token_losses(model) -> TokenLosses:
    """(inputs, targets, cu_seqlens) -> per-token fp32 losses, through the model's eval path."""
    device = model.embed.weight.device

    @torch.no_grad()
    def losses(inputs: Tensor, targets: Tensor, cu_seqlens: Tensor) -> Tensor:
        return model(inputs.to(device), targets.to(device), cu_seqlens.to(device), reduction="none")
    return losses


def ending_losses(pack: Pack, token_losses: TokenLosses) -> tuple[Tensor, Tensor]:
    """(items, 4) summed loss over each ending's tokens, and (items, 4) its token counts."""
    losses = token_losses(pack.inputs, pack.targets, pack.cu_seqlens).float().cpu()
    sums = torch.tensor([[float(losses[a:b].sum()) for a, b in item] for item in pack.spans])
    lengths = torch.tensor([[b - a for a, b in item] for item in pack.spans], dtype=torch.float32)
    return sums, lengths


def score_pack(pack: Pack, token_losses: TokenLosses) -> tuple[int, int]:
    """(correct by mean loss, correct by summed loss) of the items in one pack."""
    sums, lengths = ending_losses(pack, token_losses)
    labels = torch.tensor(pack.labels)
    by_mean = (sums / lengths.clamp_min(1)).argmin(dim=1)
    by_sum = sums.argmin(dim=1)
    return int((by_mean == labels).sum()), int((by_sum == labels).sum())


def evaluate(items: Sequence[Item], token_losses: TokenLosses, batch_tokens: int = 4096,
             encode: Callable[[str], list[int]] | None = None,
             progress: Callable[[int, Result], None] | None = None) -> Result:
    """Accuracy of the scorer ``token_losses`` (see model_token_losses) on ``items``."""
    t0 = time.perf_counter()
    result = Result(0, 0, 0)
    rendered = [render(item, encode) for item in items]
    for pack in pack_items(rendered, batch_tokens):
        norm, plain = score_pack(pack, token_losses)
        result.items += len(pack.labels)
        result.correct_norm += norm
        result.correct_sum += plain
        result.seconds = time.perf_counter() - t0
        if progress is not None:
            progress(len(rendered), result)
    result.seconds = time.perf_counter() - t0
    return result


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward: the CPU's sdpa twin builds a dense T x T mask, so it gets short packs."""
    return 16384 if device.type == "cuda" else 2048
