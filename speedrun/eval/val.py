"""Validation loss of a trained model on any token shards, computed as the trainer's validation
does (the fixed first N tokens of the shards in chunks, documents separated at each BOS, mean
per-token cross-entropy), so a checkpoint's number here matches the one in its training log when
the data, token count and chunk length are the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from speedrun.eval.loading import EvalError


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
    from speedrun.data.embedded import embedded_shards
    return embedded_shards()[1]


@torch.no_grad()
def loss_sum_and_count(model, batches, device) -> torch.Tensor:
    """(summed per-token loss, token count) over val batches, float64 on ``device``: each chunk's
    mean loss (fp32, as the model's eval path gives it) weighted by its tokens. The trainer's
    validation and ``speedrun eval val`` both use this, so their numbers agree."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        loss = model(batch.inputs, batch.targets, batch.cu_seqlens, reduction="mean")
        total[0] += loss.double() * batch.targets.numel()
        total[1] += batch.targets.numel()
    return total


@torch.no_grad()
def evaluate_val(model, pattern: str, num_tokens: int, sequence_tokens: int,
                 bos_id: int = 50256) -> ValResult:
    from speedrun.data.loader import ValLoader
    if sequence_tokens < 1 or num_tokens < 1 or num_tokens % sequence_tokens:
        raise EvalError(f"--tokens {num_tokens}: expected a positive multiple of the chunk length "
                        f"--sequence-tokens {sequence_tokens}")
    device = model.embed.weight.device
    t0 = time.perf_counter()
    loader = ValLoader(pattern, num_tokens=num_tokens, sequence_tokens=sequence_tokens,
                       bos_id=bos_id, device=str(device))
    total = loss_sum_and_count(model, loader, device)
    return ValResult(float(total[0] / total[1]), num_tokens, pattern, time.perf_counter() - t0)
