"""Python bytecode caching for speedrun's processes (the command line, its workers and helpers).

Why: importing torch, dynamo and inductor compiles about 2,300 modules. A normal ``pip install`` caches
their bytecode at install time, but environments that install without it (``uv`` does not compile by
default) and set ``PYTHONDONTWRITEBYTECODE=1`` (common in container images) make every process compile
them again from source: 6-9 s of CPU per process on the lent H100 machine, paid again by the
parallel warm-up helper and every torchrun worker, and a third of a warm start there.

What: when torch's own bytecode is not cached next to its source and Python would not write it
there (writes disabled, or a read-only install), the command line points ``sys.pycache_prefix`` at
``~/.cache/speedrun/pycache`` (``$XDG_CACHE_HOME`` respected) and allows bytecode writes, for itself
and, through the environment, for the processes it starts. Nothing is written next to any source
file, so an image that disabled bytecode writes to keep its install tree clean stays clean.
Python checks each cached file against its source's size and modification time, so a stale entry is
never used. ``SPEEDRUN_PYCACHE=off`` leaves Python's settings alone; ``SPEEDRUN_PYCACHE=DIR`` uses DIR
in any case.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ENV = "SPEEDRUN_PYCACHE"


def default_dir(environ=os.environ) -> str:
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "speedrun", "pycache")


def bytecode_missing(package: str = "torch") -> bool:
    """True when ``package``'s bytecode is not cached where this interpreter looks for it and the
    interpreter will not cache it there itself (bytecode writes off, or a read-only package folder)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return False   # not installed, or not from source: nothing to cache
    if os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return False
    return sys.dont_write_bytecode or not os.access(os.path.dirname(spec.origin), os.W_OK)


def cache_bytecode(environ=os.environ) -> str | None:
    """Turn the bytecode cache on where it is missing (see the module docstring), for this process
    and, through ``environ``, for its children. Returns the cache folder, or None if left alone.
    Call before importing torch."""
    choice = environ.get(ENV, "").strip() or "auto"   # set but empty: the default
    if choice.lower() == "off" or sys.pycache_prefix is not None:
        return None   # turned off, or the user already chose where bytecode goes
    if choice.lower() == "auto":
        if not bytecode_missing():
            return None
        folder = default_dir(environ)
    else:
        folder = os.path.abspath(os.path.expanduser(choice))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        if choice.lower() != "auto":   # asked for by name: say why it cannot be used
            raise ValueError(f"{ENV}={choice}: cannot create the bytecode cache folder ({e.strerror})")
        return None   # an unwritable cache home: run as Python would have without us
    sys.pycache_prefix = folder
    sys.dont_write_bytecode = False
    environ["PYTHONPYCACHEPREFIX"] = folder
    environ.pop("PYTHONDONTWRITEBYTECODE", None)
    return folder
