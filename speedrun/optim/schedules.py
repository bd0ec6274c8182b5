"""Training schedules as pure functions of the (0-based) optimizer step: the stage a step is in, and
from it the learning-rate multiplier, Muon momentum, attention windows, batch (global tokens,
micro-batch, document cap) and the loss weights (multi-token prediction, prefix token).

Nothing here holds state, so resuming at step s reproduces the schedule exactly. A schedule is a
table of stages (``schedule.stages``, record 89) or record 45's shorthand, which reads as the same
table: one stage per entry of ``window_stages`` (equal shares, one batch) and the extension stage.
Numbers in the docstrings: record 45 = 2185 scheduled + 40 extension steps (reference-spec 1.5/1.9);
record 89 = 1270 + 15 in three stages (notes r89-training.md section 1).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from speedrun.config import BatchShape, Config, MuonConfig, ScheduleConfig, StageConfig, Window


class StageSpan(NamedTuple):
    """A stage placed on the steps: it runs steps [start, end)."""
    index: int
    start: int
    end: int
    stage: StageConfig
    extension: bool              # the stage after the scheduled steps

    @property
    def window(self) -> Window:
        return Window(*self.stage.windows)


def _short(long_blocks: int, sched: ScheduleConfig) -> int:
    return max(1, math.floor(long_blocks * sched.short_window_ratio))


def stage_spans(sched: ScheduleConfig) -> list[StageSpan]:
    """Every stage with its steps, in order, the extension stage last (see
    ``ScheduleConfig.stage_bounds`` for the rounding). The shorthand gives one stage per
    ``window_stages`` entry, windows (floor(long * short_window_ratio), long), at train.tokens_per_step
    and data.max_doc_len, lr_mul 1, next-token loss only."""
    bounds = sched.stage_bounds()
    if sched.stages:
        stages = sched.stages
    else:
        longs = [*sched.window_stages, sched.extension_window]
        stages = [StageConfig(share=0.0, windows=[_short(w, sched), w]) for w in longs]
    last = len(stages) - 1
    return [StageSpan(i, bounds[i], bounds[i + 1], s, i == last) for i, s in enumerate(stages)]


def stage_at(step: int, sched: ScheduleConfig) -> tuple[StageSpan, float]:
    """The stage of a step and how far into it the step is: t = (step - start) / (end - start),
    0 at its first step and below 1 at its last. Steps from total_steps on (the final
    validation) are in the extension stage at t = 1. Record 89: step 422 -> (stage 0, 422/423),
    step 423 -> (stage 1, 0.0)."""
    spans = stage_spans(sched)
    for span in spans:
        if step < span.end:
            return span, (step - span.start) / (span.end - span.start)
    return spans[-1], 1.0


def lr_multiplier(step: int, sched: ScheduleConfig) -> float:
    """Multiplier of every base lr at a step.

    Stage table (record 89): the stage's lr_mul (piecewise constant), blended linearly into the
    floor final_lr_frac from step c = int(num_scheduled_steps * (1 - cooldown_frac)):
    t = min(1, (step - c) / (num_scheduled_steps - c)), lr = lr_mul * (1 - t) + floor * t; exactly
    the floor in the extension (record 89: 1.0 to step 422, 1.52 at 423..508, 1.027087 at 847,
    0.15 from 1270). No warm-up.

    Shorthand (record 45): 1.0, then linear to final_lr_frac over the last cooldown_frac, in
    x = step / num_scheduled_steps clamped to 0.9999 (as the reference does), so the extension runs
    flat at just above final_lr_frac (0.10018).
    """
    n, floor = sched.num_scheduled_steps, sched.final_lr_frac
    if sched.stages:
        lr = stage_at(step, sched)[0].stage.lr_mul
        cooldown_start = int(n * (1 - sched.cooldown_frac))
        if step >= cooldown_start:
            t = min(1.0, (step - cooldown_start) / (n - cooldown_start)) if n > cooldown_start else 1.0
            lr = lr * (1 - t) + floor * t
        return lr
    x = min(0.9999, step / n)
    if sched.cooldown_frac <= 0 or x < 1 - sched.cooldown_frac:
        return 1.0
    w = (1 - x) / sched.cooldown_frac   # 1 at the start of the cooldown, ~0 at its end
    return w * 1.0 + (1 - w) * floor


def muon_momentum(step: int, muon: MuonConfig, sched: ScheduleConfig) -> float:
    """Momentum momentum_min -> momentum over the warm-up steps, flat, then back to momentum_min
    over the last momentum_cooldown_steps of total_steps (record 45: 0.85 -> 0.95 by step 300,
    flat until step 2175, 0.85 at step 2225; record 89: flat until 1235, 0.852 at 1284)."""
    lo, hi = muon.momentum_min, muon.momentum
    cooldown_start = sched.total_steps - muon.momentum_cooldown_steps
    if step < muon.momentum_warmup_steps:
        frac = step / muon.momentum_warmup_steps
        return lo + frac * (hi - lo)
    if step > cooldown_start and muon.momentum_cooldown_steps > 0:
        frac = min(1.0, (step - cooldown_start) / muon.momentum_cooldown_steps)
        return hi - frac * (hi - lo)
    return hi


def window_blocks(step: int, sched: ScheduleConfig) -> Window:
    """The attention windows (short, long) in blocks for a training step: its stage's.
    Record 45: (1, 3) for steps 0..728, (3, 7) for 729..1456, (5, 11) for 1457..2184, (6, 13) after.
    Record 89: (1, 3) to 422, (3, 7) to 846, (5, 11) to 1269, (6, 13) after."""
    return stage_at(step, sched)[0].window


def window_stages(sched: ScheduleConfig) -> dict[Window, tuple[int, int]]:
    """Every distinct window of the training steps -> (first step, number of steps),
    in step order. Record 45: (1, 3) -> (0, 729), (3, 7) -> (729, 728), (5, 11) -> (1457, 728),
    (6, 13) -> (2185, 40)."""
    stages: dict[Window, tuple[int, int]] = {}
    for span in stage_spans(sched):
        if span.end > span.start:
            first, count = stages.get(span.window, (span.start, 0))
            stages[span.window] = (first, count + span.end - span.start)
    return stages


def final_window_blocks(sched: ScheduleConfig) -> Window:
    """The windows of the final validation only: the long window grows to final_val_window and
    the short window stays that of the last training step (both records: (6, 20)). The model must
    not apply a YaRN update for this change (reference-spec 1.5; r89-training.md 1.1)."""
    return Window(window_blocks(max(0, sched.total_steps - 1), sched).short, sched.final_val_window)


def mtp_weights(step: int, sched: ScheduleConfig) -> list[float]:
    """Loss weights of the next len(weights) tokens (multi-token prediction) at a step:
    start + (end - start) * t inside the stage (t of ``stage_at``), element by element; the number
    of weights is the stage's. Record 89: [1, .5, .25] at 0, [1, .5, .000591] at 422, [1, .5] at
    423, [1, .399764] at 508, [1] from 847. The shorthand: [1.0] (next token only)."""
    span, t = stage_at(step, sched)
    s = span.stage
    return [a + (b - a) * t for a, b in zip(s.mtp_weights_start, s.mtp_weights_end)]


def prefix_weight(step: int, sched: ScheduleConfig) -> float:
    """Loss weight of the next token's prefix token at a step, interpolated as ``mtp_weights``.
    Record 89: 0.25 through stage 0, 0.25 -> 0 over stage 1 (0.199882 at 508), 0 from 847."""
    span, t = stage_at(step, sched)
    s = span.stage
    return s.prefix_weight_start + (s.prefix_weight_end - s.prefix_weight_start) * t


class LossTerms(NamedTuple):
    """The training loss's weighted terms over a whole schedule (what the model and its compiled loss
    are built for): ``num_mtp`` MTP weights every step (the most any stage has; a stage with fewer
    is padded with zero weights, which add exactly nothing, so one compiled graph serves every
    stage), and ``prefix``: some stage weights the prefix token."""
    num_mtp: int
    prefix: bool


def loss_terms(sched: ScheduleConfig) -> LossTerms | None:
    """The weighted terms of a schedule; None when every step is next-token cross-entropy alone
    (weights [1.0], no prefix weight: record 45, the shorthand) and the loss keeps its plain path.
    Record 89: LossTerms(3, True)."""
    stages = sched.stages
    if all(s.mtp_weights_start == [1.0] == s.mtp_weights_end and not s.prefix_weight_start
           and not s.prefix_weight_end for s in stages):
        return None
    return LossTerms(max(len(s.mtp_weights_start) for s in stages),
                     any(s.prefix_weight_start or s.prefix_weight_end for s in stages))


def loss_weights(step: int, sched: ScheduleConfig, terms: LossTerms) -> list[float]:
    """A step's loss weights as the model takes them in one vector: ``mtp_weights`` padded with
    zeros to terms.num_mtp, then ``prefix_weight`` if terms.prefix. Record 89 at step 423:
    [1, .5, 0, .25]; from 847: [1, 0, 0, 0]."""
    weights = mtp_weights(step, sched)
    weights += [0.0] * (terms.num_mtp - len(weights))
    return weights + [prefix_weight(step, sched)] if terms.prefix else weights


def batch_shape(step: int, cfg: Config) -> BatchShape:
    """The batch of a step: global tokens, tokens per micro-batch, document cap (its stage's).
    Record 89 with train.micro_batches_per_step 8: (131072, 16384, 896) to step 422,
    (262144, 32768, 2048) to 846, (393216, 49152, 2048) after."""
    return cfg.batch_shape(stage_at(step, cfg.schedule)[0].stage if cfg.schedule.stages else None)

