"""Load a trained model for evaluation: from a checkpoint directory, a run directory (its latest
checkpoint) or an exported model directory (``speedrun export``), onto a device, in eval mode, with
the attention windows and YaRN state that the trainer's validation uses at that point.

Why windows need care: a checkpoint stores weights only (no buffers), but the rotary frequencies and
attention scale were rescaled by YaRN at every window change during training. They are rebuilt by
replaying the schedule's window changes, exactly as the trainer does on resume; a finished run then
gets the final validation's longer window without a YaRN update (reference-spec 1.5).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch

from speedrun.config import ActivationDtype, Config, ModelConfig, Window, choices
from speedrun.model import GPT
from speedrun.optim.schedules import final_window_blocks
from speedrun.train.checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS
from speedrun.train.checkpoint import (
    check_files,
    find_checkpoint,
    load_model_weights,
    load_weights,
    model_config,
    read_meta,
)
from speedrun.train.trainer import replay_windows, resolve_dtype
from speedrun.utils import available_memory

FORMAT = "speedrun-gpt"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


class EvalError(ValueError):
    """Bad input to an eval command (model path, data file, flags); the message is one line."""
    user_error = True


@dataclass
class LoadedModel:
    model: GPT
    config: Config | None      # the training config (None for an export without one)
    step: int | None           # optimizer steps the weights were trained for
    source: str                # the checkpoint or export directory actually read
    embed_from_head: bool = False   # the source's embedding was still tied to its lm_head

    def describe(self) -> str:
        return self.source + (f" (step {self.step})" if self.step is not None else "")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {name}: no CUDA GPU is visible")
    return device


def eval_model_config(model_cfg: ModelConfig) -> ModelConfig:
    """The model config for inference: the attention backend is chosen for this machine ('auto':
    flex on CUDA, sdpa on CPU). All backends compute the same function; a run trained with
    FlashAttention must still load where FlashAttention is not installed."""
    return dataclasses.replace(model_cfg, attention_backend="auto")


def apply_eval_windows(model: GPT, schedule, step: int) -> None:
    """Windows + YaRN state of the trainer's validation for a model trained ``step`` steps.

    Mid-run (step < total steps): the windows of step ``step``, reached by replaying every window
    change of steps 0..step with YaRN updates (Trainer.apply_window). Finished run: the last
    training step's windows, then the final validation window without a YaRN update."""
    total = schedule.total_steps
    replay_windows(model, schedule, min(step, total - 1))
    if step >= total:
        model.set_window(final_window_blocks(schedule), update_yarn=False)


def load_model(path: str, device: str | torch.device = "auto", dtype: str = "auto") -> LoadedModel:
    """A ready model (eval mode, eval windows) from a checkpoint, run or export directory."""
    if not os.path.exists(path):
        raise EvalError(f"{path}: no such checkpoint, run or export directory")
    device = resolve_device(device) if isinstance(device, str) else device
    if dtype not in choices(ActivationDtype):
        raise EvalError(f"--dtype {dtype}: expected one of {', '.join(choices(ActivationDtype))}")
    torch_dtype = resolve_dtype(dtype, device.type)
    if is_export_dir(path):
        return load_export(path, device, torch_dtype)
    return load_checkpoint_model(path, device, torch_dtype)


def load_checkpoint_model(path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    cfg = model_config(ckpt, meta)
    check_files(ckpt, meta, [CHECKPOINT_WEIGHTS])
    cfg.model.check_fits(available_memory(device), dtype.itemsize, str(device), source=f"{ckpt}/meta.json")
    model = GPT(eval_model_config(cfg.model), dtype=dtype).to(device)
    load_model_weights(model, ckpt)
    step = int(meta.get("step", cfg.schedule.total_steps))
    apply_eval_windows(model, cfg.schedule, step)
    # a run still tied at this step embeds with its lm_head: make that the embedding's own value, so
    # the loaded model (and an export of it) is self-contained
    tied = model.embed_tied = cfg.embed_tied_at(step)
    model.untie_embed()
    model.eval()
    return LoadedModel(model, cfg, step, ckpt, embed_from_head=tied)


def is_export_dir(path: str) -> bool:
    """True for a directory written by ``export_model`` (a run's own config.json has no format tag)."""
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_export(path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    config_path = os.path.join(path, CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{config_path}: unreadable ({e})") from None
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise EvalError(f"{config_path}: format version {config['format_version']} is newer than this "
                        f"speedrun understands ({FORMAT_VERSION}); upgrade speedrun")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise EvalError(f"{config_path}: expected an object with the model config under 'model'")
    model_cfg = Config.from_dict({"model": config["model"]}, source=config_path).model.validate(config_path)
    training = config.get("training_config")
    train_cfg = Config.from_dict(training, source=config_path) if training else None
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise EvalError(f"{weights}: missing")
    model_cfg.check_fits(available_memory(device), dtype.itemsize, str(device), source=config_path)
    model = GPT(eval_model_config(model_cfg), dtype=dtype).to(device)
    model.embed_tied = False   # an export holds the embedding's own weights (export_model)
    load_weights(model, weights, buffers=True, error=EvalError)
    window = config.get("window") or {}
    long, short = window.get("long_blocks"), window.get("short_blocks")
    if long is not None and short is not None:
        # the buffers already hold the YaRN state: record its window first, then set the
        # windows without another update
        model.set_window(Window(short, window.get("yarn_blocks") or long), update_yarn=False)
        model.set_window(Window(short, long), update_yarn=False)
    elif train_cfg is not None:
        apply_eval_windows(model, train_cfg.schedule, config.get("source", {}).get("step") or 0)
    model.eval()
    return LoadedModel(model, train_cfg, config.get("source", {}).get("step"), path)


def load_exported(path: str, device: str | torch.device = "cpu", dtype: str = "auto"):
    """A ready ``GPT`` (eval mode, eval windows) from an export directory; for convenience a
    checkpoint or run directory is accepted too."""
    return load_model(os.fspath(path), device=device, dtype=dtype).model
