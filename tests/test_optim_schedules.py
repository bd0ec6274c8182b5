"""Schedules against the records' numbers: record 45 (reference-spec 1.5, 1.9) through the
shorthand, record 89 (notes r89-training.md sections 1-2) through the stage table."""
import dataclasses
import json
import math
import os

import pytest

from speedrun.config import Config, MuonConfig, ScheduleConfig
from speedrun.optim.schedules import (
    batch_shape,
    final_window_blocks,
    lr_multiplier,
    mtp_weights,
    muon_momentum,
    prefix_weight,
    stage_at,
    stage_spans,
    window_blocks,
    window_stages,
)

S, M = ScheduleConfig(), MuonConfig()


@pytest.mark.parametrize("step,expected", [
    (0, 1.0), (1092, 1.0),                                 # flat while step/2185 < 0.5
    (1093, 1 - 0.9 * (1 - (1 - 1093 / 2185) / 0.5)),       # first decayed step: 0.99959
    (1500, 0.1 + 0.9 * (1 - 1500 / 2185) / 0.5),           # 0.66384
    (2184, 0.1 + 0.9 * (1 - 2184 / 2185) / 0.5),           # 0.10082
    (2185, 0.1 + 0.9 * 0.0001 / 0.5),                      # x clamped to 0.9999: 0.10018
    (2224, 0.1 + 0.9 * 0.0001 / 0.5),                      # flat through the extension
])
def test_lr_multiplier(step, expected):
    assert lr_multiplier(step, S) == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_values_and_shape():
    assert lr_multiplier(1093, S) == pytest.approx(0.99959, abs=1e-5)
    assert lr_multiplier(2185, S) == pytest.approx(0.10018, abs=1e-5)
    values = [lr_multiplier(s, S) for s in range(S.total_steps)]
    assert all(a >= b for a, b in zip(values, values[1:]))           # never increases
    assert lr_multiplier(100, ScheduleConfig(cooldown_frac=0.0)) == 1.0


@pytest.mark.parametrize("step,expected", [
    (0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95), (2175, 0.95),
    (2200, 0.90), (2224, 0.95 - 0.1 * 49 / 50), (2225, 0.85),
])
def test_muon_momentum(step, expected):
    assert muon_momentum(step, M, S) == pytest.approx(expected, abs=1e-12)


R89_SCHED = ScheduleConfig(num_scheduled_steps=1270, num_extension_steps=15)   # record 89: 1285 steps


def _public_momentum(step: int) -> float:
    """Record 89's get_muon_momentum (r89-training 1.5), written from its formula: warm-up over 300
    steps 0.85 -> 0.95, cool-down over the last 50 of the 1285 steps with a strict '>'."""
    cd_start = 1285 - 50
    if step < 300:
        return 0.85 + step / 300 * (0.95 - 0.85)
    if step > cd_start:
        return 0.95 - (step - cd_start) / 50 * (0.95 - 0.85)
    return 0.95


@pytest.mark.parametrize("step,expected", [(0, 0.85), (300, 0.95), (1235, 0.95), (1236, 0.948),
                                           (1270, 0.88), (1284, 0.852)])
def test_muon_momentum_record89_values(step, expected):
    assert muon_momentum(step, M, R89_SCHED) == pytest.approx(expected, abs=1e-12)


def test_muon_momentum_is_record89_formula_bit_for_bit():
    """Same schedule shape as record 45 (the cool-down anchored on total_steps): with record 89's
    step counts and the unchanged momentum fields every step's value is the public formula's."""
    assert all(muon_momentum(s, M, R89_SCHED) == _public_momentum(s) for s in range(R89_SCHED.total_steps))


@pytest.mark.parametrize("step,expected", [
    (0, (1, 3)), (728, (1, 3)), (729, (3, 7)), (1456, (3, 7)), (1457, (5, 11)), (2184, (5, 11)),
    (2185, (6, 13)), (2224, (6, 13)),
])
def test_window_blocks(step, expected):
    assert window_blocks(step, S) == expected


def test_window_stage_boundaries_match_float_formula():
    for step in range(S.num_scheduled_steps):
        assert window_blocks(step, S)[1] == S.window_stages[int(3 * (step / 2185))]


def test_window_stages_of_the_record():
    stages = window_stages(ScheduleConfig())
    assert stages == {(1, 3): (0, 729), (3, 7): (729, 728), (5, 11): (1457, 728), (6, 13): (2185, 40)}
    assert list(stages) == [(1, 3), (3, 7), (5, 11), (6, 13)]   # in step order


def test_final_window():
    assert final_window_blocks(S) == (6, 20)
    assert final_window_blocks(ScheduleConfig(num_extension_steps=0)) == (5, 20)
    assert window_blocks(0, ScheduleConfig(window_stages=[1], short_window_ratio=0.5)) == (1, 1)


# ---- record 45 through the shorthand: every step as the formulas of reference-spec 1.5 -----------

def r45_lr(step, n=2185, cooldown=0.5, floor=0.1):
    x = min(0.9999, step / n)
    if x < 1 - cooldown:
        return 1.0
    w = (1 - x) / cooldown
    return w * 1.0 + (1 - w) * floor


def r45_windows(step, n=2185, longs=(3, 7, 11), extension=13):
    long = extension if step >= n else longs[min(len(longs) - 1, len(longs) * step // n)]
    return (max(1, math.floor(long * 0.5)), long)


def test_record_124m_shorthand_is_record_45_at_every_step():
    """The shorthand gives record 45's lr, momentum, windows, batch and next-token-only loss at every
    step, bit for bit, and reads as a table of 3 window stages and the extension at one batch."""
    cfg = Config.load(os.path.join(os.path.dirname(__file__), "..", "speedrun", "configs",
                                   "record_124m.json")).validate()
    s, m = cfg.schedule, cfg.optim.muon
    assert s.stages == [] and s.stage_bounds() == [0, 729, 1457, 2185, 2225]
    for step in range(s.total_steps + 1):
        assert lr_multiplier(step, s) == r45_lr(step), step
        assert window_blocks(step, s) == r45_windows(step), step
        # the reference's get_muon_momentum, its operations in its order
        mu = 0.85 + (step / 300) * (0.95 - 0.85) if step < 300 else (
            0.95 - min(1.0, (step - 2175) / 50) * (0.95 - 0.85) if step > 2175 else 0.95)
        assert muon_momentum(step, m, s) == mu, step
        assert batch_shape(step, cfg) == (262144, 32768, 2048)
        assert mtp_weights(step, s) == [1.0] and prefix_weight(step, s) == 0.0
    assert [(sp.start, sp.end, tuple(sp.window)) for sp in stage_spans(s)] == [
        (0, 729, (1, 3)), (729, 1457, (3, 7)), (1457, 2185, (5, 11)), (2185, 2225, (6, 13))]


# ---- record 89 through the stage table ------------------------------------------------------------

R89_FRAGMENT = os.path.join(os.path.dirname(__file__), "fixtures", "record_89_schedule.json")


def r89_config() -> Config:
    """Record 89's schedule, batch and data parts (tests/fixtures/record_89_schedule.json) on our
    default model."""
    with open(R89_FRAGMENT) as f:
        return Config.from_dict(json.load(f)).validate()


R89 = r89_config()


def test_r89_stage_boundaries():
    s = R89.schedule
    assert s.stage_bounds() == [0, 423, 847, 1270, 1285]
    assert [(sp.start, sp.end, sp.extension) for sp in stage_spans(s)] == [
        (0, 423, False), (423, 847, False), (847, 1270, False), (1270, 1285, True)]
    # the untie at a stage: after the first odd step of that stage (Config.untie_step)
    untie = [dataclasses.replace(R89, model=dataclasses.replace(R89.model, tie_embed=True, untie_at_stage=i)).untie_step()
             for i in range(3)]
    assert untie == [1, 423, 847]
    assert stage_at(1285, s) == (stage_spans(s)[3], 1.0)       # the final validation step
    assert stage_at(422, s)[1] == 422 / 423 and stage_at(423, s)[1] == 0.0


# (step, stage, lr, windows, MTP weights, prefix weight, batch, micro-batch, document cap), the
# values of r89-training.md's tables 1.1, 1.3, 1.4 (written there from the public code's formulas)
R89_STEPS = [
    (0, 0, 1.0, (1, 3), [1, .5, .25], .25, 131072, 16384, 896),
    (300, 0, 1.0, (1, 3), [1, .5, .072695], .25, 131072, 16384, 896),
    (422, 0, 1.0, (1, 3), [1, .5, .000591], .25, 131072, 16384, 896),
    (423, 1, 1.52, (3, 7), [1, .5], .25, 262144, 32768, 2048),
    (508, 1, 1.52, (3, 7), [1, .399764], .199882, 262144, 32768, 2048),
    (509, 1, 1.518202, (3, 7), [1, .398585], .199292, 262144, 32768, 2048),
    (846, 1, 0.912310, (3, 7), [1, .001179], .000590, 262144, 32768, 2048),
    (847, 2, 1.027087, (5, 11), [1], 0, 393216, 49152, 2048),
    (1000, 2, 0.709843, (5, 11), [1], 0, 393216, 49152, 2048),
    (1269, 2, 0.152073, (5, 11), [1], 0, 393216, 49152, 2048),
    (1270, 3, 0.15, (6, 13), [1], 0, 393216, 49152, 2048),
    (1284, 3, 0.15, (6, 13), [1], 0, 393216, 49152, 2048),
]


@pytest.mark.parametrize("step,stage,lr,windows,mtp,prefix,batch,micro,cap", R89_STEPS)
def test_r89_values_at_and_around_every_stage_edge(step, stage, lr, windows, mtp, prefix, batch, micro, cap):
    s = R89.schedule
    assert stage_at(step, s)[0].index == stage
    assert lr_multiplier(step, s) == pytest.approx(lr, abs=5e-7)
    assert window_blocks(step, s) == windows
    assert mtp_weights(step, s) == pytest.approx(mtp, abs=5e-7)
    assert prefix_weight(step, s) == pytest.approx(prefix, abs=5e-7)
    shape = batch_shape(step, R89)
    assert shape == (batch, micro, cap)
    assert shape.micro_batches == 8 and shape.grad_accum(8) == 1 and shape.grad_accum(1) == 8
    assert shape.grad_accum(2) == 4


def test_r89_lr_formula_exactly():
    """lr = lr_mul (1 - t) + 0.15 t, t = (step - 508) / 762 from step 508, lr_mul by stage."""
    s = R89.schedule
    for step in range(s.total_steps + 1):
        mul = 1.0 if step < 423 else 1.52 if step < 847 else 1.73 if step < 1270 else 1.0
        t = min(1.0, (step - 508) / 762) if step >= 508 else None
        assert lr_multiplier(step, s) == (mul if t is None else mul * (1 - t) + 0.15 * t), step
    assert lr_multiplier(1270, s) == 0.15


@pytest.mark.parametrize("step,expected", [
    (0, 0.85), (300, 0.95), (1235, 0.95), (1236, 0.948), (1270, 0.88), (1284, 0.852)])
def test_r89_momentum(step, expected):
    assert muon_momentum(step, R89.optim.muon, R89.schedule) == pytest.approx(expected, abs=1e-12)


def test_r89_windows_and_tokens():
    s = R89.schedule
    assert final_window_blocks(s) == (6, 20)
    assert window_stages(s) == {(1, 3): (0, 423), (3, 7): (423, 424), (5, 11): (847, 423), (6, 13): (1270, 15)}
    total = sum(batch_shape(step, R89).tokens_per_step for step in range(s.total_steps))
    assert total == 338_821_120                                   # r89-training.md 1.6


def test_stage_weights_interpolate_without_reaching_the_end():
    """t = (step - start) / length: the start value at the first step, the end value never."""
    s = R89.schedule
    for step in range(0, 423):
        assert mtp_weights(step, s)[2] == 0.25 + (0.0 - 0.25) * (step / 423)
    for step in range(423, 847):
        assert prefix_weight(step, s) == 0.25 + (0.0 - 0.25) * ((step - 423) / 424)
        assert mtp_weights(step, s) == [1.0, 0.5 + (0.0 - 0.5) * ((step - 423) / 424)]
    assert min(prefix_weight(step, s) for step in range(847)) > 0


def test_r89_loss_terms_and_padded_weights():
    """Record 89's table: 3 MTP weights at most and a prefix term; each step's vector is its MTP
    weights padded with zeros to 3, then its prefix weight (r89-training.md 1.3)."""
    from speedrun.optim.schedules import LossTerms, loss_terms, loss_weights
    s = R89.schedule
    terms = loss_terms(s)
    assert terms == LossTerms(3, True)
    assert loss_weights(0, s, terms) == [1.0, 0.5, 0.25, 0.25]
    assert loss_weights(423, s, terms) == [1.0, 0.5, 0.0, 0.25]
    assert loss_weights(508, s, terms) == pytest.approx([1.0, 0.399764, 0.0, 0.199882], abs=5e-7)
    for step in (847, 1000, 1284):
        assert loss_weights(step, s, terms) == [1.0, 0.0, 0.0, 0.0]
    for step in range(s.total_steps):
        w = loss_weights(step, s, terms)
        assert len(w) == 4 and w[:len(mtp_weights(step, s))] == mtp_weights(step, s) and w[3] == prefix_weight(step, s)
    # record 45 (the shorthand) and a table of next-token-only stages: no terms, the plain loss
    assert loss_terms(ScheduleConfig()) is None
    plain = r89_config().schedule
    for st in plain.stages:
        st.mtp_weights_start = st.mtp_weights_end = [1.0]
        st.prefix_weight_start = st.prefix_weight_end = 0.0
    assert loss_terms(plain) is None
    plain.stages[2].mtp_weights_end = [0.5]        # a scheduled next-token weight is a weighted term
    assert loss_terms(plain) == LossTerms(1, False)
