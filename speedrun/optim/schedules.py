"""Training schedules as pure functions of the (0-based) optimizer step: learning-rate multiplier,
Muon momentum, attention window sizes, and a batch-size hook.

Nothing here holds state, so resuming at step s reproduces the schedule exactly. The numbers in the
docstrings are for the record config (2185 scheduled + 40 extension steps, reference-spec 1.5/1.9).
"""
from __future__ import annotations

import math

from speedrun.config import MuonConfig, ScheduleConfig, Window


def lr_multiplier(step: int, sched: ScheduleConfig) -> float:
    """Multiplier of every base lr: 1.0, then linear to final_lr_frac over the last cooldown_frac.

    x = step / num_scheduled_steps is clamped to 0.9999 (as the reference does), so the extension
    steps run flat at just above final_lr_frac (record: 0.10018). No warm-up.
    """
    x = min(0.9999, step / sched.num_scheduled_steps)
    if sched.cooldown_frac <= 0 or x < 1 - sched.cooldown_frac:
        return 1.0
    w = (1 - x) / sched.cooldown_frac   # 1 at the start of the cooldown, ~0 at its end
    return w * 1.0 + (1 - w) * sched.final_lr_frac


def muon_momentum(step: int, muon: MuonConfig, sched: ScheduleConfig) -> float:
    """Momentum momentum_min -> momentum over the warm-up steps, flat, then back to momentum_min
    over the last momentum_cooldown_steps of total_steps (record: 0.85 -> 0.95 by step 300, flat
    until step 2175, 0.85 at step 2225)."""
    lo, hi = muon.momentum_min, muon.momentum
    cooldown_start = sched.total_steps - muon.momentum_cooldown_steps
    if step < muon.momentum_warmup_steps:
        frac = step / muon.momentum_warmup_steps
        return lo + frac * (hi - lo)
    if step > cooldown_start and muon.momentum_cooldown_steps > 0:
        frac = min(1.0, (step - cooldown_start) / muon.momentum_cooldown_steps)
        return hi - frac * (hi - lo)
    return hi


def _short(long_blocks: int, sched: ScheduleConfig) -> int:
    return max(1, math.floor(long_blocks * sched.short_window_ratio))


def window_blocks(step: int, sched: ScheduleConfig) -> Window:
    """The attention windows (short, long) in blocks for a training step.

    The scheduled steps are split into len(window_stages) equal stages (stage = floor(len * step /
    num_scheduled_steps), integer arithmetic); the extension steps use extension_window.
    Record: (1, 3) for steps 0..728, (3, 7) for 729..1456, (5, 11) for 1457..2184, (6, 13) after.
    """
    stages = sched.window_stages
    if step >= sched.num_scheduled_steps:
        long = sched.extension_window
    else:
        long = stages[min(len(stages) - 1, len(stages) * max(step, 0) // sched.num_scheduled_steps)]
    return Window(_short(long, sched), long)


def window_stages(sched: ScheduleConfig) -> dict[Window, tuple[int, int]]:
    """Every distinct window of the training steps -> (first step, number of steps),
    in step order. Record: (1, 3) -> (0, 729), (3, 7) -> (729, 728), (5, 11) -> (1457, 728),
    (6, 13) -> (2185, 40)."""
    stages: dict[Window, tuple[int, int]] = {}
    for step in range(sched.total_steps):
        window = window_blocks(step, sched)
        first, count = stages.get(window, (step, 0))
        stages[window] = (first, count + 1)
    return stages


def final_window_blocks(sched: ScheduleConfig) -> Window:
    """The windows of the final validation only: the long window grows to final_val_window and
    the short window stays that of the last training step (record: (6, 20)). The model must not
    apply a YaRN update for this change (reference-spec 1.5)."""
    last_long = sched.extension_window if sched.num_extension_steps > 0 else sched.window_stages[-1]
    return Window(_short(last_long, sched), sched.final_val_window)


def batch_size_multiplier(step: int, sched: ScheduleConfig) -> float:
    """Hook for batch-size schedules: the factor on tokens_per_step at this step.

    The v1 record trains at a constant batch, so this is always 1.0. Later records grow the batch
    during training; a schedule belongs here (a pure function of the step), and the trainer and
    loader must then ask for it each step (the loader's batch plan already accepts any size).
    """
    return 1.0
