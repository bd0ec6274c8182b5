"""``speedrun export``: a trained model as a self-contained directory that loads without the run::

    <out>/model.safetensors   every weight (in its trained storage dtype) plus the rotary/YaRN
                              buffers, so the model computes exactly what validation measured
    <out>/config.json         format tag, model config, attention windows, training config, source
    <out>/tokenizer.json      the tokenizer to use: GPT-2 BPE ("gpt2"), eot id, vocabulary size

The directory is written under a temporary name and renamed into place (a crash never leaves a
half export that looks complete). ``load_exported`` (``speedrun.load``) rebuilds a ready GPT.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import torch

from speedrun.config import Config
from speedrun.eval.loading import EvalError, LoadedModel, apply_eval_windows, eval_model_config

FORMAT = "speedrun-gpt"
FORMAT_VERSION = 1
WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def is_export_dir(path: str) -> bool:
    """True for a directory written by ``export_model`` (a run's own config.json has no format tag)."""
    try:
        with open(os.path.join(path, CONFIG), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def tokenizer_reference(vocab_size: int) -> dict:
    from speedrun.data.tokenizer import EOT_ID, EOT_TEXT, RANKS_SHA256
    return {"name": "gpt2", "library": "tiktoken", "eot_id": EOT_ID, "eot_text": EOT_TEXT,
            "vocab_size": vocab_size, "ranks_sha256": RANKS_SHA256,
            "note": "token ids equal tiktoken.get_encoding('gpt2'); speedrun.data.tokenizer works offline"}


def export_model(path: str, out: str) -> str:
    """Export the model of a checkpoint / run / export directory ``path`` into directory ``out``."""
    from safetensors.torch import load_file, save_file
    from speedrun.eval.loading import load_model
    loaded = load_model(path, device="cpu", dtype="float32")   # windows + YaRN state, checked weights
    model = loaded.model
    # weights as stored (a GPU run keeps bf16 embeddings); buffers from the loaded model
    stored = load_file(os.path.join(loaded.source, WEIGHTS))
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = stored.get(name, tensor).detach().contiguous().cpu()
    cfg = model.cfg
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(cfg),
        "window": {"long_blocks": model.long_blocks, "short_blocks": model.short_blocks,
                   "yarn_blocks": getattr(model, "_yarn_blocks", model.long_blocks)},
        "tokenizer": tokenizer_reference(cfg.vocab_size),
        "source": {"path": os.path.abspath(loaded.source), "step": loaded.step},
        "training_config": loaded.config.to_dict() if loaded.config is not None else None,
    }
    _check_target(out)
    staging = os.path.abspath(out).rstrip(os.sep) + f".incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        save_file(state, os.path.join(staging, WEIGHTS), metadata={"format": FORMAT})
        from speedrun.utils import atomic_write_text, current_umask
        os.chmod(os.path.join(staging, WEIGHTS), 0o666 & ~current_umask())  # safetensors leaves it private
        atomic_write_text(os.path.join(staging, CONFIG), json.dumps(config, indent=1) + "\n")
        atomic_write_text(os.path.join(staging, TOKENIZER),
                          json.dumps(config["tokenizer"], indent=1) + "\n")
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_target(out: str) -> None:
    """Only an earlier export or an empty directory may be replaced: never someone's other files."""
    if os.path.isfile(out):
        raise EvalError(f"--out {out}: is a file; give a directory")
    if os.path.isdir(out) and os.listdir(out) and not is_export_dir(out):
        raise EvalError(f"--out {out}: directory exists and is not an earlier export; "
                        "choose a new or empty directory")


def _swap_into_place(staging: str, out: str) -> None:
    out = os.path.abspath(out).rstrip(os.sep)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    old = None
    if os.path.exists(out):
        old = out + f".old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def load_export(path: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from safetensors.torch import load_file
    from speedrun.model import GPT
    config_path = os.path.join(path, CONFIG)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise EvalError(f"{config_path}: unreadable ({e})") from None
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise EvalError(f"{config_path}: format version {config['format_version']} is newer than this "
                        f"speedrun understands ({FORMAT_VERSION}); upgrade speedrun")
    model_cfg = Config.from_dict({"model": config.get("model", {})}, source=config_path).model
    training = config.get("training_config")
    train_cfg = Config.from_dict(training, source=config_path) if training else None
    model = GPT(eval_model_config(model_cfg), dtype=dtype).to(device)
    weights = os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights):
        raise EvalError(f"{weights}: missing")
    state = load_file(weights, device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise EvalError(f"{weights}: weights do not match the config ({detail})") from None
    window = config.get("window") or {}
    long, short = window.get("long_blocks"), window.get("short_blocks")
    if long is not None and short is not None:
        # the buffers already hold the YaRN state: record its window first, then set the
        # windows without another update
        model.set_window(window.get("yarn_blocks") or long, short, update_yarn=False)
        model.set_window(long, short, update_yarn=False)
    elif train_cfg is not None:
        apply_eval_windows(model, train_cfg.schedule, config.get("source", {}).get("step") or 0)
    model.eval()
    return LoadedModel(model, train_cfg, config.get("source", {}).get("step"), path)


def load_exported(path: str, device: str | torch.device = "cpu", dtype: str = "auto"):
    """A ready ``GPT`` (eval mode, eval windows) from an export directory; for convenience a
    checkpoint or run directory is accepted too."""
    from speedrun.eval.loading import load_model
    return load_model(os.fspath(path), device=device, dtype=dtype).model
