"""``speedrun sample``, ``speedrun eval hellaswag|val`` and ``speedrun export``: use a trained model.

Every ``--checkpoint`` takes a checkpoint directory, a run directory (its latest checkpoint) or an
exported model directory.
"""
from __future__ import annotations

import argparse
import sys

from speedrun.config import ActivationDtype, choices
from speedrun.utils import HelpFormatter

MODEL_HELP = "a checkpoint directory, a run directory (its latest checkpoint) or an exported model"


def _model_arguments(p: argparse.ArgumentParser, device: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help=MODEL_HELP)
    if device:
        p.add_argument("--device", default="auto", help="auto (cuda if visible), cpu, cuda, cuda:N")
        p.add_argument("--dtype", default="auto", choices=choices(ActivationDtype),
                       help="activation dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def register(subparsers) -> None:
    sample = subparsers.add_parser(
        "sample", help="generate text from a trained model",
        description="Generate text after a prompt, printing tokens as they are decoded. The prompt "
                    "follows <|endoftext|>, as every training document does; generation stops at "
                    "--max-tokens or when the model ends the document.",
        formatter_class=HelpFormatter)
    _model_arguments(sample)
    sample.add_argument("--prompt", default="", help="text to continue")
    sample.add_argument("--max-tokens", type=int, default=200, metavar="N", help="tokens to generate at most")
    sample.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (argmax)")
    sample.add_argument("--top-k", type=int, default=200, metavar="K", help="sample among the K most likely (0 = all)")
    sample.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="sample within the smallest set of tokens of probability >= P (1 = all)")
    sample.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one)")
    sample.add_argument("--ignore-eot", action="store_true",
                        help="keep going after <|endoftext|> instead of stopping")
    sample.set_defaults(func=cmd_sample)

    evaluate = subparsers.add_parser("eval", help="evaluate a trained model (HellaSwag, val loss)",
                                     description="Evaluate a trained model.")
    actions = evaluate.add_subparsers(dest="eval_command", metavar="TASK")
    evaluate.set_defaults(func=lambda args: _usage(evaluate))

    hs = actions.add_parser(
        "hellaswag", help="HellaSwag validation accuracy (10,042 items)",
        description="HellaSwag validation accuracy: for each item the ending with the lowest mean "
                    "loss per token (acc_norm) and with the lowest summed loss (acc). Data: --data, "
                    "else the cached download of the public file, else it is downloaded.",
        formatter_class=HelpFormatter)
    _model_arguments(hs)
    hs.add_argument("--data", metavar="FILE", help="local hellaswag_val.jsonl or .jsonl.gz")
    hs.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    hs.add_argument("--batch-tokens", type=int, metavar="T",
                    help="tokens per forward (default: 16384 on CUDA, 2048 on CPU)")
    hs.add_argument("--cache-dir", help="download cache root (default: $SPEEDRUN_CACHE or ~/.cache/speedrun)")
    hs.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    hs.set_defaults(func=cmd_hellaswag)

    val = actions.add_parser(
        "val", help="validation loss on token shards",
        description="Mean cross-entropy on the first --tokens tokens of the shards, in chunks of "
                    "--sequence-tokens, as the trainer's validation computes it.")
    _model_arguments(val)
    val.add_argument("--data-path", metavar="GLOB",
                     help="val shards (default: the training config's, or the embedded val split)")
    val.add_argument("--tokens", metavar="N", help="tokens to evaluate (default: the config's train.val_tokens)")
    val.add_argument("--sequence-tokens", metavar="N",
                     help="tokens per forward (default: the config's train.val_sequence_tokens, or "
                          "--tokens when smaller; on the CPU keep it to a few thousand)")
    val.set_defaults(func=cmd_val)

    export = subparsers.add_parser(
        "export", help="export a trained model: safetensors + JSON config + tokenizer reference",
        description="Write a self-contained model directory (model.safetensors, config.json, "
                    "tokenizer.json) that speedrun.load(DIR) turns back into a ready GPT.")
    _model_arguments(export, device=False)
    export.add_argument("--out", required=True, metavar="DIR", help="output directory (new, empty or an earlier export)")
    export.set_defaults(func=cmd_export)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _describe(loaded) -> str:
    m = loaded.model
    windows = ("no window" if m.window is None
               else f"windows long {m.window.long} / short {m.window.short} blocks")
    return f"{loaded.describe()}, {windows}, {m.embed.weight.device}"


def cmd_sample(args) -> int:
    import time

    from speedrun.data.tokenizer import EOT_ID, encode
    from speedrun.eval.generate import TextStream, check_sampling, generate, generation_context
    from speedrun.eval.loading import load_model
    check_sampling(args.temperature, args.top_k, args.top_p, args.max_tokens)
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    prompt_ids = encode(args.prompt)
    generation_context(loaded.model, prompt_ids, args.max_tokens)   # refused before anything is printed
    print(f"model {_describe(loaded)}", file=sys.stderr)
    stream = TextStream()
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    t0, count = time.perf_counter(), 0
    for token in generate(loaded.model, prompt_ids, args.max_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, stop_at_eot=not args.ignore_eot):
        count += 1
        if token == EOT_ID and not args.ignore_eot:
            break                       # the model ended the document: nothing more to print
        out.write(stream.push(token))
        out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    seconds = time.perf_counter() - t0
    print(f"{count} tokens in {seconds:.2f} s ({count / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def cmd_hellaswag(args) -> int:
    from speedrun.eval import hellaswag as hs
    from speedrun.eval.loading import EvalError, load_model
    if args.limit is not None and args.limit < 1:
        raise EvalError(f"--limit {args.limit}: expected >= 1")
    if args.batch_tokens is not None and args.batch_tokens < 16:
        raise EvalError(f"--batch-tokens {args.batch_tokens}: expected >= 16")
    path = hs.data_file(args.data, args.cache_dir)           # data problems before the model loads
    items = hs.load_items(path, args.limit)
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    device = loaded.model.embed.weight.device
    batch_tokens = args.batch_tokens or hs.default_batch_tokens(device)
    print(f"model {_describe(loaded)}", file=sys.stderr)
    print(f"hellaswag: {len(items)} items from {path}", file=sys.stderr)
    if device.type == "cpu" and len(items) > 1000:
        print(f"note: {len(items)} items take several minutes on a CPU; --limit N scores the first N",
              file=sys.stderr)
    step = max(1, len(items) // 10)
    shown = [0]

    def progress(total: int, r) -> None:
        if not args.quiet and (r.items - shown[0] >= step) and r.items < total:
            shown[0] = r.items
            print(f"  {r.items}/{total} items  acc_norm {r.acc_norm:.4f}  acc {r.acc_sum:.4f}  "
                  f"{r.seconds:.1f} s", file=sys.stderr, flush=True)

    result = hs.evaluate(items, hs.model_token_losses(loaded.model), batch_tokens, progress=progress)
    n = result.items
    print(f"hellaswag {n} items: acc_norm {result.acc_norm:.4f} ({result.correct_norm}/{n}, lowest mean "
          f"loss per ending token) | acc {result.acc_sum:.4f} ({result.correct_sum}/{n}, lowest summed "
          f"loss) | {result.seconds:.1f} s")
    return 0


def cmd_val(args) -> int:
    from speedrun.data.cli import parse_count
    from speedrun.eval.loading import EvalError, load_model
    from speedrun.eval.val import default_val_pattern, evaluate_val

    def count(flag: str, text: str | None) -> int | None:
        if text is None:
            return None
        try:
            return parse_count(text)
        except argparse.ArgumentTypeError as e:
            raise EvalError(f"{flag}: {e}") from None

    tokens, seq = count("--tokens", args.tokens), count("--sequence-tokens", args.sequence_tokens)
    loaded = load_model(args.checkpoint, args.device, args.dtype)
    cfg = loaded.config
    pattern = args.data_path or default_val_pattern(cfg)
    if tokens is None:
        if cfg is None:
            raise EvalError("--tokens is needed: this model carries no training config")
        tokens = cfg.train.val_tokens
    if seq is None:
        seq = min(tokens, cfg.train.val_sequence_tokens if cfg is not None else tokens)
    print(f"model {_describe(loaded)}", file=sys.stderr)
    bos = cfg.data.bos_id if cfg is not None else 50256
    result = evaluate_val(loaded.model, pattern, tokens, seq, bos_id=bos)
    print(f"val loss {result.loss:.4f} | {result.tokens:,} tokens of {result.pattern} in chunks of "
          f"{seq:,} | {result.seconds:.1f} s")
    return 0


def cmd_export(args) -> int:
    import os

    from speedrun.eval.export import CONFIG, TOKENIZER, WEIGHTS, export_model
    out = export_model(args.checkpoint, args.out)
    size = os.path.getsize(os.path.join(out, WEIGHTS))
    print(f"exported {args.checkpoint} to {out}: {WEIGHTS} ({size / 2**20:.1f} MiB), {CONFIG}, {TOKENIZER}")
    print(f"load it with: import speedrun; model = speedrun.load({out!r})")
    return 0
