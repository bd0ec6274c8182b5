"""``speedrun eval val``: the validation loss of a trained model on any token shards, computed by
the trainer's own validation (train/validation.py), so a checkpoint's number here matches the one in
its training log when the data, token count and chunk length are the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from speedrun.data.embedded import embedded_shards
from speedrun.data.loader import ValLoader
from speedrun.eval.loading import EvalError
from speedrun.train.validation import loss_sum_and_count


@dataclass
class ValResult:
    loss: float
    tokens: int
    pattern: str
    seconds: float


def default_val_pattern(config) -> str:
    """The training config's val shards, or the embedded corpus's val split when it used that."""
    if config is not None and config.data.val_path:
        return config.data.val_path
    return embedded_shards()[1]


@torch.no_grad()
def evaluate_val(model, pattern: str, num_tokens: int, sequence_tokens: int,
                 bos_id: int = 50256) -> ValResult:
    if sequence_tokens < 1 or num_tokens < 1 or num_tokens % sequence_tokens:
        raise EvalError(f"--tokens {num_tokens}: expected a positive multiple of the chunk length "
                        f"--sequence-tokens {sequence_tokens}")
    device = model.embed.weight.device
    t0 = time.perf_counter()
    loader = ValLoader(pattern, num_tokens=num_tokens, sequence_tokens=sequence_tokens,
                       bos_id=bos_id, device=str(device), vocab_size=model.cfg.vocab_size)
    total = loss_sum_and_count(model, loader, device)
    return ValResult(float(total[0] / total[1]), num_tokens, pattern, time.perf_counter() - t0)
