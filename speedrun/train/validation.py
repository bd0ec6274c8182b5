"""The validation loss: the fixed first N tokens of the val shards in chunks (documents separated at
each BOS), mean per-token cross-entropy. The trainer's validation and ``speedrun eval val`` both sum
through ``loss_sum_and_count``, so a checkpoint's number there matches its training log when the
data, token count and chunk length are the same.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def loss_sum_and_count(model, batches, device) -> torch.Tensor:
    """(summed per-token loss, token count) over val batches, float64 on ``device``: each chunk's
    mean loss (fp32, as the model's eval path gives it) weighted by its tokens."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        loss = model(batch.inputs, batch.targets, batch.cu_seqlens, reduction="mean")
        total[0] += loss.double() * batch.targets.numel()
        total[1] += batch.targets.numel()
    return total
