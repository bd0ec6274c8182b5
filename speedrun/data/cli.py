"""``speedrun data``: make shards from local text (``text``), download FineWeb (``fineweb``), inspect
shards (``info``) and prepare the bundled corpus (``embedded``)."""
from __future__ import annotations

import argparse
import os
import re

import numpy as np


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="make, download and inspect token shards",
                                   description="Make, download and inspect .bin token shards.")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: _usage(parser))

    text = actions.add_parser(
        "text", help="tokenize text / JSON-lines files into shards",
        description="Tokenize plain-text files, directories (recursively *.txt, *.jsonl, *.json) and "
                    "JSON-lines files into shards. Each document (a text file, or one JSON record) is "
                    "prefixed with <|endoftext|> (50256). Shard 0 is the val split.")
    text.add_argument("inputs", nargs="+", metavar="INPUT")
    text.add_argument("--out", required=True, metavar="DIR", help="output directory")
    text.add_argument("--field", default="text", help="JSON field holding the text (default: text)")
    text.add_argument("--val-tokens", type=parse_count, default=None, metavar="N",
                      help="tokens in the val shard (default: min(1M, a tenth of the corpus); 0 = none)")
    text.add_argument("--shard-tokens", type=parse_count, default=100_000_000, metavar="N",
                      help="tokens per train shard (default 100M)")
    text.add_argument("--prefix", default=None, help="shard name prefix (default: the first input's name)")
    text.add_argument("--doc-tokens", type=parse_count, default=0, metavar="N",
                      help="cut long documents at paragraph/line boundaries into documents of at most N "
                           "tokens (useful for books: the loader truncates documents at max_doc_len); "
                           "default 0 = keep documents whole")
    text.add_argument("--workers", type=int, default=None, metavar="N",
                      help="tokenizer processes (default: all cores); the output does not depend on it")
    text.add_argument("--quiet", action="store_true", help="no progress output")
    text.set_defaults(func=cmd_text)

    fineweb = actions.add_parser(
        "fineweb", help="download pre-tokenized FineWeb shards from the Hugging Face hub",
        description="Download the FineWeb val shard and N train chunks of 100M tokens "
                    "(needs huggingface_hub and network; HF_ENDPOINT selects a mirror).")
    fineweb.add_argument("chunks", type=int, metavar="N", help="train chunks (10B: 1..103; 9 cover the record)")
    fineweb.add_argument("--variant", default="10B", choices=["10B", "100B", "edu10B"])
    fineweb.add_argument("--out", default=None, metavar="DIR", help="default: data/fineweb<variant>")
    fineweb.add_argument("--repo-id", default=None, help=argparse.SUPPRESS)
    fineweb.set_defaults(func=cmd_fineweb)

    info = actions.add_parser("info", help="tokens and documents per shard",
                              description="Per shard: tokens, documents (BOS count), mean/max document "
                                          "length; then totals.")
    info.add_argument("pattern", metavar="PATH", help="a shard file, a directory or a glob")
    info.add_argument("--bos-id", type=int, default=50256)
    info.set_defaults(func=cmd_info)

    embedded = actions.add_parser("embedded", help="prepare the bundled Shakespeare corpus",
                                  description="Prepare the bundled corpus into cached shards and print "
                                              "where they are.")
    embedded.add_argument("--cache-dir", default=None,
                          help="cache root (default: $SPEEDRUN_CACHE or ~/.cache/speedrun)")
    embedded.set_defaults(func=cmd_embedded)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def parse_count(text: str) -> int:
    """``1000000``, ``1_000_000``, ``1e6``, ``1M``, ``100k``, ``2G`` -> int."""
    match = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?(?:[eE][0-9]+)?)\s*([kKmMgGbB]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a token count such as 1000000, 1e6 or 1M, got {text!r}")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[match.group(2).lower()]
    value = float(match.group(1).replace("_", "")) * scale
    if value != int(value):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}")
    return int(value)


def cmd_text(args) -> int:
    from speedrun.data.prepare import prepare_text
    summary = prepare_text(args.inputs, args.out, field=args.field, val_tokens=args.val_tokens,
                           shard_tokens=args.shard_tokens, prefix=args.prefix,
                           max_doc_tokens=args.doc_tokens, workers=args.workers, progress=not args.quiet)
    for path, count in zip(summary.shards, summary.shard_tokens):
        print(f"wrote {path} ({count} tokens)")
    for path in summary.removed:
        print(f"removed stale {path}")
    print(summary)
    if summary.longest_document > 2048 and not args.doc_tokens:
        print(f"note: the longest document has {summary.longest_document} tokens; the train loader uses "
              f"only the first max_doc_len (2048) tokens of each; --doc-tokens 1024 cuts long texts "
              f"into documents at paragraph boundaries instead")
    return 0


def cmd_fineweb(args) -> int:
    from speedrun.data.prepare import download_fineweb
    paths = download_fineweb(args.chunks, args.variant, args.out, repo_id=args.repo_id)
    directory = os.path.dirname(paths[0]) or "."
    print(f"FineWeb {args.variant}: {len(paths)} shards in {directory} (val + {args.chunks} train)")
    return 0


def shard_stats(path: str, bos_id: int = 50256) -> dict:
    """tokens, documents (BOS count), mean/max document length (BOS to next BOS or end of shard)."""
    from speedrun.data.shards import read_shard
    tokens = read_shard(path)
    starts = np.flatnonzero(tokens == bos_id)
    lengths = np.diff(np.append(starts, len(tokens)))
    return {"tokens": len(tokens), "documents": len(starts),
            "mean": float(lengths.mean()) if len(lengths) else 0.0,
            "max": int(lengths.max()) if len(lengths) else 0,
            "lead": int(starts[0]) if len(starts) else len(tokens)}   # tokens before the first BOS


def cmd_info(args) -> int:
    from speedrun.data.shards import shard_paths
    paths = shard_paths(args.pattern)
    rows, totals = [], {"tokens": 0, "documents": 0, "max": 0}
    for path in paths:
        stats = shard_stats(path, args.bos_id)
        rows.append((os.path.basename(path), stats))
        totals["tokens"] += stats["tokens"]
        totals["documents"] += stats["documents"]
        totals["max"] = max(totals["max"], stats["max"])
    width = max(len("total"), *(len(name) for name, _ in rows))
    print(f"{'shard':<{width}} {'tokens':>13} {'documents':>10} {'mean doc':>9} {'max doc':>8}")
    for name, s in rows:
        print(f"{name:<{width}} {s['tokens']:>13,} {s['documents']:>10,} {s['mean']:>9.1f} {s['max']:>8,}")
    docs = totals["documents"]
    lead = sum(s["lead"] for _, s in rows)
    mean = (totals["tokens"] - lead) / docs if docs else 0.0
    print(f"{'total':<{width}} {totals['tokens']:>13,} {docs:>10,} {mean:>9.1f} {totals['max']:>8,}"
          f"   ({len(rows)} shards)")
    return 0


def cmd_embedded(args) -> int:
    from speedrun.data.embedded import embedded_info, embedded_shards
    train, val = embedded_shards(args.cache_dir)
    info = embedded_info(args.cache_dir)
    print(f"embedded corpus {info['corpus']}: {info['works']} works of Shakespeare in {info['dir']}")
    print(f"train: {train}  ({info['train_tokens']:,} tokens, {info['train_documents']:,} documents)")
    print(f"val:   {val}  ({info['val_shard_tokens']:,} tokens = val_tokens {info['val_tokens']:,} + 1, "
          f"{info['val_documents']:,} documents; held-out works: {', '.join(info['val_works'])})")
    return 0
