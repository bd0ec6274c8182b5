"""Statistics for multi-seed runs: is a recipe's mean final loss below a target, and do two recipes
differ? Pure functions on lists of floats (no scipy): Student's t distribution from the regularized
incomplete beta function, a one-sample one-sided t-test against the target, the speedrun's
significance rules, and Welch's two-sample t-test for ablations.

The speedrun's rules (reference-spec section 2): a track-1 record must reach the target (3.28) with
p < 0.01 that its mean validation loss is below it; the optimization track asks
(target - mean) * sqrt(n) >= 0.004. Both are reported; which one applies is the user's call.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

RECORD_P = 0.01             # track 1: p-value a new record needs
TRACK3_MARGIN = 0.004       # track 3: (target - mean) * sqrt(n) must reach this


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0

    def nonzero(v: float) -> float:
        return v if abs(v) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - qab * x / qap)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        # one even and one odd term of the fraction per iteration
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 / nonzero(1.0 + aa * d)
            c = nonzero(1.0 + aa / c)
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta: no convergence for a={a}, b={b}, x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # the continued fraction converges for x < (a + 1) / (a + b + 2); use the symmetry otherwise
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df > 0 degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t distribution: degrees of freedom must be > 0, got {df}")
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (0 < q < 1), by bisection on t_sf."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t quantile: q must be in (0, 1), got {q}")
    lo, hi = -1.0, 1.0
    while t_sf(lo, df) < 1.0 - q:
        lo *= 2.0
    while t_sf(hi, df) > 1.0 - q:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass
class TargetTest:
    """One-sample, one-sided: H0 mean >= target against H1 mean < target."""
    n: int
    mean: float
    std: float | None            # sample standard deviation (n - 1)
    target: float
    t: float | None
    p_value: float | None        # P(a mean this low | true mean = target); None below 2 runs
    ci95: tuple[float, float] | None
    record_significant: bool     # p < RECORD_P (track 1)
    track3_score: float          # (target - mean) * sqrt(n), compared with TRACK3_MARGIN
    track3_ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


def below_target(values: list[float], target: float) -> TargetTest:
    """Is the mean of ``values`` (final losses of n seeds) below ``target``?"""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("significance: no values (no finished runs)")
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"significance: non-finite loss among {values}")
    n = len(values)
    mean, std = _mean_std(values)
    score = (target - mean) * math.sqrt(n)
    t = p = ci = None
    if std is not None:
        if std == 0.0:
            t = -math.inf if mean < target else (math.inf if mean > target else 0.0)
            p = 0.0 if mean < target else 1.0
            ci = (mean, mean)
        else:
            sem = std / math.sqrt(n)
            t = (mean - target) / sem
            p = 1.0 - t_sf(t, n - 1)
            half = t_ppf(0.975, n - 1) * sem
            ci = (mean - half, mean + half)
    return TargetTest(n=n, mean=mean, std=std, target=target, t=t, p_value=p, ci95=ci,
                      record_significant=p is not None and p < RECORD_P,
                      track3_score=score, track3_ok=score >= TRACK3_MARGIN)


@dataclass
class Comparison:
    """Welch's two-sample t-test of A against B (two-sided)."""
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float            # mean_a - mean_b
    t: float
    df: float
    p_value: float
    ci95: tuple[float, float]

    def as_dict(self) -> dict:
        return asdict(self)


def compare(a: list[float], b: list[float]) -> Comparison:
    """Welch's t-test: do two sets of final losses (e.g. an ablation and its baseline) differ?"""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"comparison: each side needs at least 2 runs, got {len(a)} and {len(b)}")
    mean_a, std_a = _mean_std([float(v) for v in a])
    mean_b, std_b = _mean_std([float(v) for v in b])
    va, vb = std_a ** 2 / len(a), std_b ** 2 / len(b)
    diff = mean_a - mean_b
    if va + vb == 0.0:  # no spread on either side: the sign of the difference is certain
        t = 0.0 if diff == 0 else math.copysign(math.inf, diff)
        return Comparison(len(a), len(b), mean_a, mean_b, diff, t, math.inf, 1.0 if diff == 0 else 0.0,
                          (diff, diff))
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / ((va ** 2 / (len(a) - 1) if va else 0.0) + (vb ** 2 / (len(b) - 1) if vb else 0.0))
    t = diff / se
    p = min(1.0, 2.0 * t_sf(abs(t), df))
    half = t_ppf(0.975, df) * se
    return Comparison(len(a), len(b), mean_a, mean_b, diff, t, df, p, (diff - half, diff + half))
