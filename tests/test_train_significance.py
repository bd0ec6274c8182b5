"""Multi-seed statistics (eval/significance.py) against tables, closed forms and a direct
numerical integration of Student's t density."""
import math

import pytest

from speedrun.train import significance as S


def t_sf_by_integration(t, df, steps=200000):
    """P(T > t) by integrating the density over [t, t + 2000] (Simpson), independent of betainc."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    pdf = lambda x: c * (1 + x * x / df) ** (-(df + 1) / 2)  # noqa: E731
    a, b = t, t + 2000.0
    h = (b - a) / steps
    total = pdf(a) + pdf(b) + sum((4 if i % 2 else 2) * pdf(a + i * h) for i in range(1, steps))
    return total * h / 3


@pytest.mark.parametrize("t, df, p", [(1.0, 1, 0.25), (2.015048, 5, 0.05), (2.262157, 9, 0.025),
                                      (3.169273, 10, 0.005), (1.959964, 1e7, 0.025), (0.0, 3, 0.5)])
def test_t_tail_matches_tables(t, df, p):
    assert S.t_sf(t, df) == pytest.approx(p, rel=1e-5, abs=1e-9)
    assert S.t_sf(-t, df) == pytest.approx(1 - p, rel=1e-5)


@pytest.mark.parametrize("t, df", [(0.7, 2), (1.8, 4), (2.5, 7), (4.0, 3)])
def test_t_tail_matches_integration(t, df):
    assert S.t_sf(t, df) == pytest.approx(t_sf_by_integration(t, df), rel=1e-6, abs=1e-9)


def test_quantile_inverts_the_tail_and_betainc_identities():
    for q, df in ((0.975, 9), (0.95, 3), (0.995, 30), (0.2, 5)):
        assert S.t_sf(S.t_ppf(q, df), df) == pytest.approx(1 - q, rel=1e-9)
    assert S.t_ppf(0.975, 9) == pytest.approx(2.262157, abs=1e-6)
    for x in (0.1, 0.5, 0.93):
        assert S.betainc(1, 1, x) == pytest.approx(x)
        assert S.betainc(3.5, 1, x) == pytest.approx(x ** 3.5)
        assert S.betainc(2.5, 0.5, x) == pytest.approx(1 - S.betainc(0.5, 2.5, 1 - x))
    with pytest.raises(ValueError, match="x must be in"):
        S.betainc(1, 1, 1.5)
    with pytest.raises(ValueError, match="degrees of freedom"):
        S.t_sf(1.0, 0)


def test_below_target_by_hand():
    losses = [3.275, 3.278, 3.276, 3.277]
    r = S.below_target(losses, 3.28)
    mean = sum(losses) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in losses) / 3)
    t = (mean - 3.28) / (std / 2)
    assert (r.n, r.mean, r.std, r.t) == (4, pytest.approx(mean), pytest.approx(std), pytest.approx(t))
    assert r.p_value == pytest.approx(S.t_sf(-t, 3))
    assert r.ci95[0] == pytest.approx(mean - S.t_ppf(0.975, 3) * std / 2)
    assert r.record_significant and r.p_value < 0.01
    assert r.track3_score == pytest.approx((3.28 - mean) * 2) and r.track3_ok


def test_below_target_edge_cases():
    one = S.below_target([3.27], 3.28)
    assert one.p_value is None and one.std is None and not one.record_significant
    assert one.track3_score == pytest.approx(0.01) and one.track3_ok
    same = S.below_target([3.27, 3.27], 3.28)
    assert same.p_value == 0.0 and same.ci95 == (3.27, 3.27)
    above = S.below_target([3.29, 3.30, 3.31], 3.28)
    assert above.p_value > 0.9 and not above.record_significant and not above.track3_ok
    with pytest.raises(ValueError, match="no values"):
        S.below_target([], 3.28)
    with pytest.raises(ValueError, match="non-finite"):
        S.below_target([3.2, float("nan")], 3.28)


def test_welch_by_hand():
    a, b = [3.27, 3.28, 3.275], [3.29, 3.295, 3.30, 3.292]
    c = S.compare(a, b)
    ma, mb = sum(a) / 3, sum(b) / 4
    va = sum((x - ma) ** 2 for x in a) / 2 / 3
    vb = sum((x - mb) ** 2 for x in b) / 3 / 4
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
    t = (ma - mb) / math.sqrt(va + vb)
    assert (c.t, c.df, c.difference) == (pytest.approx(t), pytest.approx(df), pytest.approx(ma - mb))
    assert c.p_value == pytest.approx(2 * S.t_sf(abs(t), df))
    assert c.ci95[0] < c.difference < c.ci95[1] < 0
    same = S.compare(a, a)
    assert same.difference == 0 and same.p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 2 runs"):
        S.compare([3.27], b)
