"""Statistics of the summary: Welch's t-test across seeds with its confidence interval, Holm's
correction over a family of comparisons, and the minimum detectable difference at a seed spread."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

ALPHA = 0.05  # two-sided; p-values are Holm-corrected within each question's family of comparisons
POWER = 0.80  # the power at which the minimum detectable difference is stated


@dataclass(frozen=True)
class Welch:
    """Welch's two-sided t-test of `a` against `b` across seeds; p is None when not testable.

    `ci`: the 95 % confidence interval of mean(a) - mean(b) (Welch); `mdd`: the smallest difference
    this many seeds at this spread detect with 80 % power at α = 0.05 (two-sided, per comparison);
    `p_holm`: p after Holm's correction over its family of `family_size` comparisons (see holm()).
    """

    a: str
    b: str
    xa: tuple[float, ...]
    xb: tuple[float, ...]
    t: float | None
    p: float | None
    why_not: str = ""
    ci: tuple[float, float] | None = None
    mdd: float | None = None
    p_holm: float | None = None
    family_size: int = 1

    @property
    def diff(self) -> float:
        return statistics.fmean(self.xa) - statistics.fmean(self.xb)

    @property
    def separated(self) -> bool:
        return self.p_holm is not None and self.p_holm < ALPHA

    def flipped(self) -> "Welch":
        """The same test read as `b` against `a`."""
        ci = None if self.ci is None else (-self.ci[1], -self.ci[0])
        return replace(self, a=self.b, b=self.a, xa=self.xb, xb=self.xa, t=None if self.t is None else -self.t,
                       ci=ci)

    def _p_text(self) -> str:
        if self.family_size > 1:
            return f"Holm-adjusted p = {format_p(self.p_holm)} of {self.family_size} (raw p = {format_p(self.p)})"
        return f"p = {format_p(self.p)}"

    def sentence(self, unit: str = "points", digits: int = 1) -> str:
        """One clause: which side is above (Holm-adjusted p < ALPHA), or that the seeds do not separate
        them and how large a difference they could have seen."""
        n = f"n = {len(self.xa)} vs {len(self.xb)}"
        d = f"{self.diff:+.{digits}f} {unit}".strip()
        if self.p is None:
            return f"`{self.a}` against `{self.b}`: Δ = {d}, not testable ({self.why_not})"
        if self.separated:
            w = self if self.diff > 0 else self.flipped()
            lo, hi = w.ci
            return (f"`{w.a}` is above `{w.b}` by {w.diff:.{digits}f} {unit}".rstrip()
                    + f" (95% CI {lo:.{digits}f} to {hi:.{digits}f}; Welch's t = {w.t:.2f}, {w._p_text()}, {n})")
        lo, hi = self.ci
        return (f"the seeds do not separate `{self.a}` and `{self.b}` (Δ = {d}, 95% CI {lo:+.{digits}f} to "
                f"{hi:+.{digits}f}; {self._p_text()}, Welch's t = {self.t:.2f}, {n}): a difference below "
                f"{self.mdd:.{digits}f} {unit} could not be seen at this seed spread".replace("  ", " "))

    def verdict(self, paper_a_above_b: bool) -> str:
        """This run's direction against the paper's, as a phrase."""
        if not self.separated:
            return "not separated, so this run neither confirms nor contradicts the paper"
        if (self.diff > 0) == paper_a_above_b:
            return "the same direction as the paper"
        return "the opposite direction to the paper"


def format_p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def min_detectable_difference(xa: Sequence[float], xb: Sequence[float], alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """The difference in means that a two-sided two-sample t-test at `alpha` detects with `power`, at
    these sample sizes and their pooled standard deviation (statsmodels' TTestIndPower)."""
    from statsmodels.stats.power import TTestIndPower

    na, nb = len(xa), len(xb)
    pooled = math.sqrt(((na - 1) * statistics.variance(xa) + (nb - 1) * statistics.variance(xb)) / (na + nb - 2))
    d = TTestIndPower().solve_power(effect_size=None, nobs1=na, alpha=alpha, power=power, ratio=nb / na,
                                    alternative="two-sided")
    return float(d) * pooled


def welch(a: str, xa: Sequence[float], b: str, xb: Sequence[float]) -> Welch:
    """Welch's t-test and its 95 % CI (scipy.stats.ttest_ind, equal_var=False) with the minimum detectable
    difference; refuses n < 2 or no spread. A family of one until holm() corrects it."""
    xa, xb = tuple(float(v) for v in xa), tuple(float(v) for v in xb)
    if not xa or not xb:
        return Welch(a, b, xa or (math.nan,), xb or (math.nan,), None, None, "a side has no runs")
    if min(len(xa), len(xb)) < 2:
        return Welch(a, b, xa, xb, None, None, f"n = {len(xa)} vs {len(xb)}: Welch's test needs 2 seeds per side")
    if statistics.variance(xa) == 0 and statistics.variance(xb) == 0:
        return Welch(a, b, xa, xb, None, None, "no spread across seeds on either side")
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        # one side without spread (equal values) is a valid Welch test; scipy warns about its moments
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        res = ttest_ind(xa, xb, equal_var=False)
        ci = res.confidence_interval(1 - ALPHA)
    t, p = float(res.statistic), float(res.pvalue)
    if not math.isfinite(p):
        return Welch(a, b, xa, xb, None, None, "the test statistic is undefined for these values")
    return Welch(a, b, xa, xb, t, p, ci=(float(ci.low), float(ci.high)), mdd=min_detectable_difference(xa, xb),
                 p_holm=p)


def holm(tests: Sequence[Welch]) -> list[Welch]:
    """The tests with Holm's step-down correction over the testable ones (statsmodels' multipletests)."""
    from statsmodels.stats.multitest import multipletests

    testable = [i for i, t in enumerate(tests) if t.p is not None]
    out = list(tests)
    if testable:
        adjusted = multipletests([tests[i].p for i in testable], alpha=ALPHA, method="holm")[1]
        for i, q in zip(testable, adjusted):
            out[i] = replace(tests[i], p_holm=float(q), family_size=len(testable))
    return out


def family_note(what: str, tests: Sequence[Welch]) -> str:
    """The sentence that names a Holm family ('' when none of its tests could be run)."""
    k = sum(t.p is not None for t in tests)
    return f"*Holm family:* {what} ({k} test{'s' if k != 1 else ''})." if k else ""


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """'mean ± sample std' (std 0 for a single seed, as in the tables)."""
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.{digits}f} ± {s:.{digits}f}"
