"""``speedrun export``: a trained model as a self-contained directory that loads without the run::

    <out>/model.safetensors   every weight (in its trained storage dtype) plus the rotary/YaRN
                              buffers, so the model computes exactly what validation measured
    <out>/config.json         format tag, model config, attention windows, training config, source
    <out>/tokenizer.json      the tokenizer to use: GPT-2 BPE ("gpt2"), eot id, vocabulary size

The directory is written under a temporary name and renamed into place (a crash never leaves a
half export that looks complete). Reading one back (``speedrun.load``) is eval/loading.py's job.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

from safetensors.torch import load_file, save

from speedrun.data.tokenizer import EOT_ID, EOT_TEXT, RANKS_SHA256
from speedrun.eval.loading import (
    CONFIG,
    FORMAT,
    FORMAT_VERSION,
    TOKENIZER,
    WEIGHTS,
    EvalError,
    is_export_dir,
    load_model,
)
from speedrun.utils import atomic_write_bytes, atomic_write_text, probe_writable


def tokenizer_reference(vocab_size: int) -> dict:
    return {"name": "gpt2", "library": "tiktoken", "eot_id": EOT_ID, "eot_text": EOT_TEXT,
            "vocab_size": vocab_size, "ranks_sha256": RANKS_SHA256,
            "note": "token ids equal tiktoken.get_encoding('gpt2'); speedrun.data.tokenizer works offline"}


def export_model(path: str, out: str) -> str:
    """Export the model of a checkpoint / run / export directory ``path`` into directory ``out``."""
    _check_target(out)    # the cheap checks of the output first: nothing is loaded for a bad --out
    probe_writable(os.path.dirname(os.path.abspath(out)), name=out)
    loaded = load_model(path, device="cpu", dtype="float32")   # windows + YaRN state, checked weights
    model = loaded.model
    # weights as stored (a GPU run keeps bf16 embeddings); buffers from the loaded model
    stored = load_file(os.path.join(loaded.source, WEIGHTS))
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = stored.get(name, tensor).detach().contiguous().cpu()
    if loaded.embed_from_head:   # the source still embedded with its lm_head: that is its embedding
        state["embed.weight"] = state["lm_head.weight"].clone()
    cfg = model.cfg
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(cfg),
        "window": ({"long_blocks": model.window.long, "short_blocks": model.window.short,
                    "yarn_blocks": model.yarn_blocks} if model.window is not None else None),
        "tokenizer": tokenizer_reference(cfg.vocab_size),
        "source": {"path": os.path.abspath(loaded.source), "step": loaded.step},
        "training_config": loaded.config.to_dict() if loaded.config is not None else None,
    }
    staging = os.path.abspath(out).rstrip(os.sep) + f".incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        # serialized here and written by us: a full disk is then an OSError naming the file (the
        # library's own writer reports it without one), and the file gets normal permissions
        atomic_write_bytes(os.path.join(staging, WEIGHTS), save(state, metadata={"format": FORMAT}))
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
