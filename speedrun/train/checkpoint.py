"""Checkpoints: save and resume a run exactly.

Layout of one checkpoint (a directory, written under a temporary name and renamed when complete, so a
crash never leaves a half checkpoint that looks valid)::

    <run>/checkpoints/step_000500/
        model.safetensors        weights (rank 0; safetensors, never pickled)
        buffers_rank{r}.pt       the model's persistent buffers on rank r: state that is not a weight and
                                 may differ between ranks (the FP8 MLP's delayed scales)
        optim_rank{r}.pt         optimizer state of rank r (sharded state stays sharded)
        rng_rank{r}.pt           torch / CUDA RNG states of rank r
        grads_rank{r}.pt         state a caller adds per rank (the trainer: Adam's pending gradients)
        meta.json                step, world size, elapsed train time, loader position, config, and
                                 ``files``: the size of every other file of the checkpoint
    <run>/checkpoints/latest     name of the newest complete checkpoint (atomic rewrite)

Every file of every rank is written (and fsynced) into the staging folder before rank 0 renames it
into place and points ``latest`` at it: a kill at any moment leaves either the previous checkpoint as
``latest`` or the new one complete. Reading checks the manifest first (a missing or truncated file is
a ``CheckpointError`` naming it), and everything is loaded with ``torch.load(weights_only=True)`` or
safetensors: no arbitrary object is ever unpickled, and a file that is not what we wrote is a one-line
error, not a traceback.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from speedrun.config import Config, ConfigError
from speedrun.utils import atomic_open, atomic_write_bytes, atomic_write_text, fsync_dir

META = "meta.json"
WEIGHTS = "model.safetensors"
REPLACED = ".replaced"    # an earlier save of the same step, kept until its successor is published


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the path."""


@dataclass
class Resumed:
    step: int                  # the next step to run
    train_time_ms: float       # timed training time before the checkpoint
    loader_state: dict
    meta: dict
    path: str                  # the checkpoint directory read
    rank_state: dict           # this rank's extra state saved with ``rank_state`` (e.g. "grads")


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def _crash_point(label: str) -> None:
    """Called between the writes of a save. Does nothing; the tests replace it to stop the process at
    each point of the save and check that what is left on disk resumes correctly."""


def save_checkpoint(run_dir: str, step: int, model, optimizers, loader_state: dict, world,
                    train_time_ms: float, config: dict, extra: dict | None = None,
                    rank_state: dict | None = None) -> str:
    """Write the checkpoint of a run whose next step is ``step``. All ranks must call it.

    ``rank_state``: more objects of this rank to keep (tensors and plain containers), each saved as
    ``{name}_rank{r}.pt`` and given back by ``load_checkpoint`` in ``Resumed.rank_state``.
    A failed write on any rank (e.g. a full disk) fails the save on every rank (they agree through a
    collective instead of a barrier, so no rank waits forever), removes the staging folder and leaves
    the previous checkpoint as ``latest``."""
    final = checkpoint_dir(run_dir, step)
    staging = final + ".incomplete"
    if world.is_main:
        _remove_leftovers(os.path.dirname(final))
        os.makedirs(staging)
    world.barrier()
    failure = None
    try:
        # the model's persistent buffers too: the rotary/YaRN state and the FP8 MLP's scales
        objects = {"optim": optimizers.state_dict(), "rng": _rng_state(), "buffers": _buffer_state_dict(model),
                   **(rank_state or {})}
        for name, obj in objects.items():
            # through our own handle: torch.save / safetensors to a path report a full disk as an
            # opaque library error without the file's name; atomic_open names it
            with atomic_open(os.path.join(staging, f"{name}_rank{world.rank}.pt")) as f:
                torch.save(obj, f)
            _crash_point(f"{name}_rank{world.rank}")
        if world.is_main:
            from safetensors.torch import save
            weights = save(_plain_state_dict(model))
            atomic_write_bytes(os.path.join(staging, WEIGHTS), weights)
            del weights
            _crash_point(WEIGHTS)
    except Exception as e:   # noqa: BLE001 - every rank must reach the agreement below
        failure = e          # (a kill or a second Ctrl-C is no Exception: nothing runs after it anyway)
    if _any_rank_failed(world, failure is not None):
        if world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if failure is not None:
            raise failure
        raise CheckpointError(f"{final}: another rank failed to write its part of the checkpoint; "
                              f"the previous checkpoint stays the latest")
    if world.is_main:
        try:
            # the manifest: every file and its size, so a reader can tell a complete checkpoint
            files = {name: os.path.getsize(os.path.join(staging, name))
                     for name in sorted(os.listdir(staging)) if name != META}
            meta = {"step": step, "world_size": world.world_size, "train_time_ms": train_time_ms,
                    "loader": loader_state, "config": config, "saved_at": time.time(),
                    "python_rng": list(_python_rng_state()), "files": files, **(extra or {})}
            atomic_write_text(os.path.join(staging, META), json.dumps(meta, indent=1))
            _crash_point(META)
            fsync_dir(staging)
            replaced = final + REPLACED
            if os.path.isdir(final):    # an earlier save of this step (a run resumed before it):
                shutil.rmtree(replaced, ignore_errors=True)   # set aside, not deleted, until the
                os.replace(final, replaced)                   # new one is in place: `latest` may name it
                _crash_point("set aside")
            os.replace(staging, final)
            fsync_dir(os.path.dirname(final))
            _crash_point("published")
            atomic_write_text(os.path.join(run_dir, "checkpoints", "latest"), os.path.basename(final) + "\n")
            shutil.rmtree(replaced, ignore_errors=True)
        except Exception:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    world.barrier()
    return final


def _remove_leftovers(folder: str) -> None:
    """Folders a killed save left behind: staging folders (never published, and the run has redone
    their steps since) and earlier saves of a step whose new save was published. Only one save of a
    run is under way at a time, so none of them is in use."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".incomplete") or (name.endswith(REPLACED) and
                                            os.path.isdir(path[:-len(REPLACED)])):
            shutil.rmtree(path, ignore_errors=True)


def _any_rank_failed(world, failed: bool) -> bool:
    if world.world_size == 1:
        return failed
    return world.all_reduce_mean(1.0 if failed else 0.0) > 0


def run_dir_of(ckpt: str) -> str | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_*``), else None."""
    parent = os.path.dirname(os.path.normpath(ckpt))
    if os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent) or "."
    return None


def find_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, or a run directory (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        found = os.path.join(path, "checkpoints", name)
        if name and os.path.isfile(os.path.join(found, META)):
            return found
        if name and os.path.isfile(os.path.join(found + REPLACED, META)):
            return found + REPLACED   # killed while this step was saved again: the earlier save
        raise CheckpointError(f"{latest}: names checkpoint '{name}' but {found} is missing or incomplete")
    if os.path.isdir(path) and os.path.basename(os.path.normpath(path)).endswith(".incomplete"):
        raise CheckpointError(f"{path}: an unfinished checkpoint (the save was interrupted); "
                              "resume from the run directory or a complete step_* checkpoint")
    if any(os.path.exists(os.path.join(path, name)) for name in ("config.json", "metrics.jsonl")):
        raise CheckpointError(f"{path}: this run has no checkpoint (it stopped before its first save); "
                              f"start it again with --save-path {path} --overwrite")
    raise CheckpointError(f"{path}: not a checkpoint (no {META}) and not a run directory "
                          "(no checkpoints/latest)")


def read_meta(ckpt: str) -> dict:
    """meta.json of a checkpoint, with the fields every reader relies on checked."""
    path = os.path.join(ckpt, META)
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    _check_field(meta, "step", path, lambda v: _is_int(v) and v >= 0, "a whole number >= 0", optional=True)
    _check_field(meta, "config", path, lambda v: isinstance(v, dict), "the run's config (an object)",
                 optional=True)
    _check_field(meta, "files", path, lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and os.path.basename(k) == k and _is_int(n) and n >= 0 for k, n in v.items()),
        "an object of file name -> size in bytes", optional=True)
    return meta


def check_files(ckpt: str, meta: dict, names: list[str]) -> None:
    """Every file in ``names`` is there, with the size the manifest recorded where it has one; else a
    CheckpointError naming the first bad file. (A reader checks what it reads: sampling needs the
    weights only, so a checkpoint whose optimizer files were deleted to save space still samples.)"""
    listed = meta.get("files")
    for name in names:
        path = os.path.join(ckpt, name)
        if not os.path.isfile(path):
            why = "is listed in meta.json but missing" if listed and name in listed else "is missing"
            raise CheckpointError(f"{path}: {why}; this checkpoint is incomplete (an interrupted save or "
                                  f"a partial copy): resume from another checkpoint of the run")
        if listed and name in listed and os.path.getsize(path) != listed[name]:
            raise CheckpointError(f"{path}: {os.path.getsize(path)} bytes, but {listed[name]} were "
                                  f"written (meta.json); the file is truncated or was replaced")


def rank_files(meta: dict, rank: int) -> list[str]:
    """The per-rank files of ``rank`` a resume needs: every ``*_rank{rank}.pt`` in the manifest, or,
    for a checkpoint without one, the optimizer state and the RNG."""
    listed = meta.get("files")
    if listed is None:
        return [f"optim_rank{rank}.pt", f"rng_rank{rank}.pt"]
    return sorted(n for n in listed if n.endswith(f"_rank{rank}.pt"))


def _extra_rank_files(ckpt: str, meta: dict, rank: int) -> list[str]:
    """The rank's files besides optimizer and RNG state: from the manifest, or (a checkpoint written
    before there was one) whatever ``*_rank{rank}.pt`` files the folder holds."""
    suffix = f"_rank{rank}.pt"
    names = rank_files(meta, rank) if meta.get("files") is not None else sorted(
        n for n in os.listdir(ckpt) if n.endswith(suffix))
    return [n for n in names if n[:-len(suffix)] not in ("optim", "rng")]


def model_config(ckpt: str, meta: dict) -> Config:
    """The training config a checkpoint records (meta.json), checked like a config file."""
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{ckpt}/{META}: no training config recorded")
    try:
        return Config.from_dict(meta["config"], source=f"{ckpt}/{META}").validate()
    except ConfigError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(ckpt) else f"{ckpt}/{META}: {message}") from None


# Config fields a resumed run may change: where and how often it reports and saves, how far it goes,
# which data files it reads (the loader checks the shard names at the saved position), and the speed
# switches whose twins compute the same function. Anything else is the recipe: changing it mid-run
# would make the run neither the old recipe nor the new one.
RESUMABLE_FIELDS = frozenset({
    "train.save_every", "train.val_every", "train.log_every", "train.max_steps", "train.save_path",
    "train.nan_guard", "train.device", "train.compile", "train.warmup_compile", "train.parallel_warmup",
    "train.compile_dynamic",
    "train.cuda_graphs", "train.memory_pool",
    "data.train_path", "data.val_path", "data.async_loading",
    "model.attention_backend", "model.fused_loss", "model.fused_mlp",
    "optim.muon.kernel", "optim.adam.kernel",
})


def resume_changes(path: str, cfg: Config) -> dict:
    """Check ``cfg`` against the config the checkpoint at ``path`` was trained with, before anything
    is loaded: a change to the recipe (another --config, a model size, an lr, the seed...) is a
    ConfigError naming the field; the allowed ones (RESUMABLE_FIELDS) come back as
    ``{field: [saved, now]}`` so the run can record them."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    saved = _flatten(model_config(ckpt, meta).to_dict())
    now = _flatten(cfg.to_dict())
    changed = {k: [saved.get(k), now.get(k)] for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    # the model's size first: another --config shows up as the size the weights would not fit
    order = ("model.num_layers", "model.model_dim", "model.vocab_size", "model.num_heads", "model.head_dim",
             "model.mlp_ratio", "model.", "schedule.", "optim.", "train.", "data.")
    recipe = sorted((k for k in changed if k not in RESUMABLE_FIELDS),
                    key=lambda k: next((i for i, p in enumerate(order) if k.startswith(p)), len(order)))
    if recipe:
        first = recipe[0]
        more = f" (and {len(recipe) - 1} more: {', '.join(recipe[1:4])}{', ...' if len(recipe) > 4 else ''})" \
            if len(recipe) > 1 else ""
        raise ConfigError(f"--resume {path}: config field '{first}' is {json.dumps(changed[first][0])} in the "
                          f"checkpoint but {json.dumps(changed[first][1])} here{more}; a resumed run keeps "
                          f"the recipe it was started with (leave out --config and recipe overrides; only "
                          f"run settings such as --save-every, --train.max_steps, --train.val_every, data "
                          f"paths and speed switches may change), or start a new run")
    step = meta.get("step", 0)
    if cfg.train.max_steps and cfg.train.max_steps < step:
        raise ConfigError(f"--resume {path}: config field 'train.max_steps' is {cfg.train.max_steps}, below the "
                          f"checkpoint's step {step}; give at least {step}, or 0 for the whole schedule")
    return changed


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_weights(model, path: str, *, buffers: bool = False, error: type[Exception] = CheckpointError) -> None:
    """Load a safetensors file into ``model``, checking names and shapes from the file's header
    before any data is read: a corrupt or truncated file, or weights of another model size, is a
    one-line ``error`` naming the file (and the tensor), not a library traceback.
    ``buffers``: the file also holds the model's buffers (an export); else parameters only."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise error(f"{path}: missing")
    base = getattr(model, "_orig_mod", model)
    expected = {k: v for k, v in base.state_dict().items() if buffers or not _is_buffer(base, k)}
    device = str(next(base.parameters()).device)
    try:
        with safe_open(path, framework="pt", device=device) as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected) - {k for k in keys if _is_buffer(base, k)})
            if missing or unexpected:
                raise error(f"{path}: weights do not match the model (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}); the file belongs to another model")
            for name, target in expected.items():
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(target.shape):
                    raise error(f"{path}: weights do not match the config: tensor '{name}' has shape "
                                f"{shape}, the config's model has {tuple(target.shape)}")
            state = {name: f.get_tensor(name) for name in keys if name in expected or buffers}
    except SafetensorError as e:
        raise error(f"{path}: not a readable safetensors file ({e}); the file is corrupt or truncated") from None
    except OSError as e:
        raise error(f"{path}: unreadable ({e.strerror or e})") from None
    base.load_state_dict(state, strict=False)


def load_model_weights(model, ckpt: str) -> None:
    load_weights(model, os.path.join(ckpt, WEIGHTS))


def load_tensor_file(path: str, map_location=None):
    """``torch.load(weights_only=True)`` with every failure as a one-line CheckpointError."""
    try:
        with warnings.catch_warnings():   # torch warns about a foreign pickle before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; this checkpoint is incomplete") from None
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds Python objects other than tensors and plain containers; "
                              "refused (checkpoint files are read with weights_only, so loading one "
                              "can never run code). It was not written by speedrun") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint file ({first[:160]}); the file is "
                              "corrupt or truncated") from None


def load_checkpoint(path: str, model, optimizers, world) -> Resumed:
    """Restore model, optimizer shard, RNG of this rank; return where the run continues."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    meta_path = os.path.join(ckpt, META)
    if meta.get("world_size") != world.world_size:
        raise CheckpointError(f"{ckpt}: saved with world size {meta.get('world_size')}, this run has "
                              f"{world.world_size}; resume with the same number of processes")
    for key, ok, what in (("step", _is_int, "a whole number"),
                          ("train_time_ms", lambda v: isinstance(v, (int, float)), "a number"),
                          ("loader", lambda v: isinstance(v, dict), "the loader position (an object)"),
                          ("python_rng", lambda v: isinstance(v, list) and len(v) == 3, "[version, state, gauss]")):
        _check_field(meta, key, meta_path, ok, what)
    check_files(ckpt, meta, [WEIGHTS] + rank_files(meta, world.rank))
    load_model_weights(model, ckpt)
    device = next(model.parameters()).device
    optim_state = load_tensor_file(os.path.join(ckpt, f"optim_rank{world.rank}.pt"), device)
    try:
        optimizers.load_state_dict(optim_state)
    except (KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(f"{ckpt}/optim_rank{world.rank}.pt: does not fit this run's optimizers "
                              f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
    rng = load_tensor_file(os.path.join(ckpt, f"rng_rank{world.rank}.pt"))
    try:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        random.setstate(_as_python_state(meta["python_rng"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: the saved random state is unusable ({e})") from None
    extra = {name[:-len(f"_rank{world.rank}.pt")]: load_tensor_file(os.path.join(ckpt, name), device)
             for name in _extra_rank_files(ckpt, meta, world.rank)}
    if "buffers" in extra:   # checkpoints written before the buffers were saved have none
        load_model_buffers(model, extra.pop("buffers"), os.path.join(ckpt, f"buffers_rank{world.rank}.pt"))
    return Resumed(step=int(meta["step"]), train_time_ms=float(meta["train_time_ms"]),
                   loader_state=meta["loader"], meta=meta, path=ckpt, rank_state=extra)


def _check_field(meta: dict, key: str, path: str, ok: Callable, expected: str, optional: bool = False) -> None:
    if key not in meta:
        if optional:
            return
        raise CheckpointError(f"{path}: field '{key}' is missing, expected {expected}")
    if not ok(meta[key]):
        raise CheckpointError(f"{path}: field '{key}' is {json.dumps(meta[key])[:60]}, expected {expected}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def load_model_buffers(model, state: dict, path: str) -> None:
    """Load the rank's persistent buffers ``state`` (read from ``path``) into the model."""
    base = getattr(model, "_orig_mod", model)
    try:
        base.load_state_dict(state, strict=False)
    except RuntimeError as e:  # e.g. another number of micro-steps per rank: other slot counts
        raise CheckpointError(f"{path}: buffers do not fit this model ({str(e).strip().splitlines()[-1]})") from None


def _buffer_state_dict(model) -> dict:
    base = getattr(model, "_orig_mod", model)
    return {k: v.detach().clone() for k, v in base.state_dict().items() if _is_buffer(base, k)}


def _plain_state_dict(model) -> dict:
    # safetensors refuses shared storage; our weights are not tied, but clone views to be safe
    base = getattr(model, "_orig_mod", model)
    return {k: v.detach().contiguous().cpu() for k, v in base.state_dict().items()
            if not _is_buffer(base, k)}


def _is_buffer(model, key: str) -> bool:
    return key in dict(model.named_buffers())


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _as_python_state(saved):
    version, internal, gauss = saved
    return (version, tuple(internal), gauss)
