"""Checkpoints: save and resume a run exactly.

Layout of one checkpoint (a directory, written under a temporary name and renamed when complete, so a
crash never leaves a half checkpoint that looks valid)::

    <run>/checkpoints/step_000500/
        model.safetensors        weights (rank 0; safetensors, never pickled)
        buffers_rank{r}.pt       the model's persistent buffers on rank r: state that is not a weight and
                                 may differ between ranks (the FP8 MLP's delayed scales)
        optim_rank{r}.pt         optimizer state of rank r (sharded state stays sharded)
        rng_rank{r}.pt           torch / CUDA RNG states of rank r
        meta.json                step, world size, elapsed train time, loader position, config
    <run>/checkpoints/latest     name of the newest complete checkpoint (atomic rewrite)

Everything is loaded with ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass

import torch

from speedrun.utils import atomic_write_text, current_umask


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit this run; the message names the path."""


@dataclass
class Resumed:
    step: int                  # the next step to run
    train_time_ms: float       # timed training time before the checkpoint
    loader_state: dict
    meta: dict


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:06d}")


def save_checkpoint(run_dir: str, step: int, model, optimizers, loader_state: dict, world,
                    train_time_ms: float, config: dict, extra: dict | None = None) -> str:
    """Write the checkpoint of a run whose next step is ``step``. All ranks must call it."""
    final = checkpoint_dir(run_dir, step)
    staging = final + ".incomplete"
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    world.barrier()
    torch.save(optimizers.state_dict(), os.path.join(staging, f"optim_rank{world.rank}.pt"))
    torch.save(_rng_state(), os.path.join(staging, f"rng_rank{world.rank}.pt"))
    torch.save(_buffer_state_dict(model), os.path.join(staging, f"buffers_rank{world.rank}.pt"))
    if world.is_main:
        from safetensors.torch import save_file
        path = os.path.join(staging, "model.safetensors")
        save_file(_plain_state_dict(model), path)
        os.chmod(path, 0o666 & ~current_umask())  # safetensors writes 0600; a checkpoint is a normal file
        meta = {"step": step, "world_size": world.world_size, "train_time_ms": train_time_ms,
                "loader": loader_state, "config": config, "saved_at": time.time(),
                "python_rng": list(_python_rng_state()), **(extra or {})}
        atomic_write_text(os.path.join(staging, "meta.json"), json.dumps(meta, indent=1))
    world.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        atomic_write_text(os.path.join(run_dir, "checkpoints", "latest"), os.path.basename(final) + "\n")
    world.barrier()
    return final


def find_checkpoint(path: str) -> str:
    """Accept a checkpoint directory, or a run directory (its latest checkpoint)."""
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    latest = os.path.join(path, "checkpoints", "latest")
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            name = f.read().strip()
        found = os.path.join(path, "checkpoints", name)
        if os.path.isfile(os.path.join(found, "meta.json")):
            return found
        raise CheckpointError(f"{latest}: names checkpoint '{name}' but {found} is missing or incomplete")
    raise CheckpointError(f"{path}: not a checkpoint (no meta.json) and not a run directory "
                          "(no checkpoints/latest)")


def read_meta(ckpt: str) -> dict:
    try:
        with open(os.path.join(ckpt, "meta.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt}/meta.json: unreadable ({e})") from None


def load_model_weights(model, ckpt: str) -> None:
    from safetensors.torch import load_file
    path = os.path.join(ckpt, "model.safetensors")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    state = load_file(path, device=str(next(model.parameters()).device))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not _is_buffer(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_checkpoint(path: str, model, optimizers, world) -> Resumed:
    """Restore model, optimizer shard, RNG of this rank; return where the run continues."""
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("world_size") != world.world_size:
        raise CheckpointError(f"{ckpt}: saved with world size {meta.get('world_size')}, this run has "
                              f"{world.world_size}; resume with the same number of processes")
    load_model_weights(model, ckpt)
    device = next(model.parameters()).device
    load_model_buffers(model, os.path.join(ckpt, f"buffers_rank{world.rank}.pt"), device)
    optim_path = os.path.join(ckpt, f"optim_rank{world.rank}.pt")
    optimizers.load_state_dict(torch.load(optim_path, map_location=device, weights_only=True))
    rng = torch.load(os.path.join(ckpt, f"rng_rank{world.rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    random.setstate(_as_python_state(meta["python_rng"]))
    return Resumed(step=int(meta["step"]), train_time_ms=float(meta["train_time_ms"]),
                   loader_state=meta["loader"], meta=meta)


def load_model_buffers(model, path: str, device) -> None:
    """The rank's persistent buffers, where the checkpoint has them (older ones do not)."""
    if not os.path.isfile(path):
        return
    state = torch.load(path, map_location=device, weights_only=True)
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
