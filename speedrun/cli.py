"""The ``speedrun`` command line: one sub-command per job, each registered by the part that owns it
(``register(subparsers)`` in ``speedrun.<part>.cli``), so this file stays a dispatcher."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

# sub-command modules, in the order they are listed by --help
_PARTS = ["speedrun.train.cli", "speedrun.data.cli", "speedrun.eval.cli", "speedrun.bench",
          "speedrun.train.seeds"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speedrun", description="Train a GPT the way the NanoGPT speedrun record does.")
    from speedrun import __version__
    parser.add_argument("--version", action="version", version=f"speedrun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # that part is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from speedrun.pycache import cache_bytecode
    try:
        cache_bytecode()   # before anything imports torch (see speedrun/pycache.py)
    except ValueError as e:
        print(f"speedrun: error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not getattr(args, "accepts_overrides", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra  # dotted config overrides, e.g. --optim.muon.lr 0.02
    args._argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (| head)
        sys.stderr.close()
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        # errors raised for bad input carry a one-line message naming the file or field; so do the
        # operating system's about a path (a read-only or full disk, no permission, a file in the way)
        if getattr(args, "debug", False) or not _is_user_error(e):
            raise
        print(f"speedrun {args.command}: error: {_message(e)}", file=sys.stderr)
        return 1


# what the user can act on when the operating system refuses a path
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free space or write somewhere else",
    errno.EROFS: "a read-only file system: write somewhere else",
    errno.EACCES: "no permission: write somewhere else or fix the permissions",
    errno.EPERM: "not permitted: write somewhere else or fix the permissions",
    errno.ENOTDIR: "a file is in the way: a folder of this path is a file",
    errno.EISDIR: "a folder is in the way: expected a file",
    errno.EEXIST: "something is in the way",
    errno.ENOENT: "no such file or directory",
}


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and e.errno is not None and e.filename is not None:
        hint = _OS_HINTS.get(e.errno)
        if not hint or hint.lower() == (e.strerror or "").lower():
            return f"{e.filename}: {e.strerror}"
        return f"{e.filename}: {e.strerror} ({hint})"
    return str(e)


def _is_user_error(e: Exception) -> bool:
    if isinstance(e, OSError) and e.errno is not None and e.filename is not None:
        return True   # the OS refused a named path: one line says which and why
    from speedrun.config import ConfigError
    user_errors: tuple = (ConfigError, FileNotFoundError)
    try:
        from speedrun.data.shards import ShardError
        user_errors += (ShardError,)
    except ImportError:
        pass
    try:  # a missing / incomplete checkpoint given to train --resume or to an eval command
        from speedrun.train.checkpoint import CheckpointError
        user_errors += (CheckpointError,)
    except ImportError:
        pass
    return isinstance(e, user_errors) or getattr(e, "user_error", False)


if __name__ == "__main__":
    sys.exit(main())
