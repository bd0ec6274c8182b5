"""Schedules against the record's numbers (reference-spec 1.5, 1.9)."""
import pytest

from speedrun.config import MuonConfig, ScheduleConfig
from speedrun.optim.schedules import (
    batch_size_multiplier,
    final_window_blocks,
    lr_multiplier,
    muon_momentum,
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


R89 = ScheduleConfig(num_scheduled_steps=1270, num_extension_steps=15)   # record 89: 1285 steps


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
    assert muon_momentum(step, M, R89) == pytest.approx(expected, abs=1e-12)


def test_muon_momentum_is_record89_formula_bit_for_bit():
    """Same schedule shape as record 45 (the cool-down anchored on total_steps): with record 89's
    step counts and the unchanged momentum fields every step's value is the public formula's."""
    assert all(muon_momentum(s, M, R89) == _public_momentum(s) for s in range(R89.total_steps))


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


def test_final_window_and_batch_hook():
    assert final_window_blocks(S) == (6, 20)
    assert final_window_blocks(ScheduleConfig(num_extension_steps=0)) == (5, 20)
    assert window_blocks(0, ScheduleConfig(window_stages=[1], short_window_ratio=0.5)) == (1, 1)
    assert all(batch_size_multiplier(s, S) == 1.0 for s in (0, 1000, 2224))
