"""Small shared helpers: atomic file writes (temp file + fsync + rename, so a crash never leaves a
half-written file behind) and human-readable number formatting."""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help with "(default: X)" added where the help does not say its default already and
    there is one worth showing (not None, not a False switch): argparse's own defaults formatter
    prints it twice for the first kind and "(default: None)" for the second."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        nothing = default is None or default is False or default == "" or default == argparse.SUPPRESS
        if "default" in text.lower() or nothing or not action.option_strings or action.nargs == 0:
            return text
        return f"{text} (default: %(default)s)"


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; a finished file gets normal permissions
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            # a failed write (a full disk) does not say which file: name the one being written
            raise OSError(e.errno, e.strerror, path) from None
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def human_bytes(n: float) -> str:
    """20484096 -> '19.5 MiB'; 5.6e14 -> '524,288.0 GiB'."""
    if n >= 2**30:
        return f"{n / 2**30:,.1f} GiB"
    return f"{n / 2**20:,.1f} MiB"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file inside ``path`` durable (where the platform can open a directory)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def available_memory(device) -> int | None:
    """Bytes that can still be allocated on ``device`` (a torch.device or its name): free GPU memory,
    or the host's available RAM (MemAvailable: free plus reclaimable cache); None where unknown."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if kind != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def missing_parents(path: str | os.PathLike) -> list[str]:
    """The folders of ``path`` (itself included) that do not exist yet, innermost first."""
    missing, current = [], os.path.abspath(os.fspath(path))
    while not os.path.exists(current):
        missing.append(current)
        current = os.path.dirname(current)
    return missing


def probe_writable(directory: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """Fail at once, before hours of work, if files cannot be created in ``directory`` (a read-only
    file system, no permission, a file in the way): creates it and a test file, then removes both
    again, so it leaves nothing behind. The OSError names ``name`` (default: the directory)."""
    made = missing_parents(directory)
    try:
        for folder in reversed(made):
            os.mkdir(folder)
        probe = os.path.join(os.fspath(directory), f".speedrun-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fspath(name if name is not None else directory)) from None
    finally:
        for folder in made:
            try:
                os.rmdir(folder)
            except OSError:
                pass
