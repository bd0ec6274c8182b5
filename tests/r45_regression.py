"""The record-45 regression fixture: what a small record-45-shaped model computes on the CPU in
float32, captured once (before the record-89 switches went in) and compared bitwise ever after.

``compute()`` runs the real pieces end to end: the model's init under ``torch.manual_seed(0)``, the
real optimizers (NorMuon + DistAdam, every-other-step Adam, bf16 state) over a few optimizer steps
of two micro-batches each with the trainer's step protocol, then the eval logits of the oracle
batch. ``python tests/r45_regression.py`` rewrites the fixture file; only do that when a change of
record 45's numbers is intended (and say so in the commit).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_model_gpt import batch, small_cfg  # noqa: E402

from speedrun.config import OptimConfig, Window  # noqa: E402
from speedrun.model import GPT  # noqa: E402
from speedrun.optim.build import build_optimizers  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "r45_regression.pt")
STEPS = 6
MICRO = 2


def compute() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(small_cfg(), torch.float32)
    # the zero-initialized parts (head, output projections, gates) get signal; added on top of the
    # init, so the init itself (its random draws) stays part of what is compared. The scalars keep
    # their init (their layout is the model's business, not this fixture's).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p is not model.scalars:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.set_window(Window(1, 3))
    model.train()
    opt = build_optimizers(model, OptimConfig())
    losses = []
    for step in range(STEPS):
        opt.begin_step(step)
        total = torch.zeros(())
        for micro in range(MICRO):
            ids, targets, cu = batch(T=96, seed=100 + step * MICRO + micro)
            if micro == MICRO - 1:
                opt.before_last_backward()
            loss = model(ids, targets, cu)
            (loss / MICRO).backward()
            total += loss.detach()
        opt.step(step, lr_mult=1.0 - 0.05 * step, momentum=0.85 + 0.01 * step)
        opt.zero_grad(step)
        losses.append(total)
    model.eval()
    ids, targets, cu = batch()
    with torch.no_grad():
        logits = model(ids, None, cu)
        eval_loss = model(ids, targets, cu, reduction="mean")
    return {"train_losses": torch.stack(losses), "eval_logits": logits, "eval_loss": eval_loss}


if __name__ == "__main__":
    torch.set_num_threads(2)
    values = compute()
    torch.save(values, FIXTURE)
    print(f"wrote {FIXTURE}: train losses {values['train_losses'].tolist()}, "
          f"eval loss {values['eval_loss'].item()}")
