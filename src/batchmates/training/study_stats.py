"""The statistics of a study: t-intervals, paired differences against a baseline, and the verdict rules.

Every figure is a fraction (0.913 = 91.3%); the study's tables print percentages and percentage points.

* :func:`t_interval`: mean and two-sided 95% Student-t confidence interval ``mean ± t(0.975, n−1)·s/√n``
  (``s`` the sample standard deviation, n−1); ``nan`` bounds for fewer than two values.
* :func:`paired_comparison`: the variant's and the baseline's values on the seeds both have, the per-seed
  differences ``d = variant − baseline``, their t-interval, the paired t-test (``scipy.stats.ttest_rel``) and the
  Wilcoxon signed-rank test (``scipy.stats.wilcoxon``; with 5 seeds its smallest two-sided p is 0.0625, so it
  can support, never decide, a verdict), both two-sided.
* :func:`verdict`: the rules below, from the interval of ``d`` alone (the tests are reported beside it).

Verdict rules (``lo``, ``hi``: the 95% interval of the mean paired difference; ``margin`` ≥ 0, in the metric's
units, stated per claim in the study file):

* relation ``">"`` (the variant is better): **reproduced** when ``lo > 0``; **not reproduced** when
  ``hi < margin`` (with 95% confidence the gain is below the margin; with the default margin 0 this is "the
  interval excludes 0 in the wrong direction"); **inconclusive** otherwise.
* relation ``">="`` (the variant is at least as good, i.e. not worse by more than ``margin``; a non-inferiority
  claim): **not reproduced** when ``hi < 0`` (significantly worse, however little); **reproduced** when
  ``lo > −margin``; **inconclusive** otherwise. The default margin of a ``">="`` claim is 0.5 percentage points.
* fewer than 2 paired seeds, or a non-finite value: **inconclusive** (``"too few seeds"``).

A claim made of several comparisons (BA²M > SE > none; every corruption severity) is **reproduced** when every
comparison is, **not reproduced** when any comparison is, and **inconclusive** otherwise (:func:`combine`).

Paper: none (library infrastructure); the claims themselves are quoted in the study file.

Library choices: the rules above; paired by seed (every variant of a study runs on the same seeds, so the seed's
share of the variance — initialisation, data order, augmentation draws — cancels in ``d``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

__all__ = ["t_interval", "paired_comparison", "verdict", "combine", "REPRODUCED", "NOT_REPRODUCED",
           "INCONCLUSIVE", "RELATIONS", "DEFAULT_MARGIN"]

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
RELATIONS = (">", ">=")
#: Default margin per relation (fractions: 0.005 = 0.5 percentage points).
DEFAULT_MARGIN = {">": 0.0, ">=": 0.005}


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> dict[str, float]:
    """``{"mean", "lo", "hi", "half", "sd", "n"}``: the two-sided Student-t interval of the mean of ``values``."""
    from scipy import stats

    vals = _finite(values)
    n = len(vals)
    if n == 0:
        return {"mean": math.nan, "lo": math.nan, "hi": math.nan, "half": math.nan, "sd": math.nan, "n": 0}
    mean = statistics.fmean(vals)
    if n < 2:
        return {"mean": mean, "lo": math.nan, "hi": math.nan, "half": math.nan, "sd": math.nan, "n": 1}
    sd = statistics.stdev(vals)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half": half, "sd": sd, "n": n}


def paired_comparison(variant: dict[int, float | None], baseline: dict[int, float | None]) -> dict[str, Any]:
    """Paired statistics of ``variant − baseline`` over the seeds both have (``{seed: value}`` each).

    Returns ``seeds``, ``diff`` (the :func:`t_interval` of the differences), ``t_test`` and ``wilcoxon``
    (``{"statistic", "p"}``, two-sided; ``nan`` when undefined: fewer than 2 seeds, or all differences zero).
    """
    from scipy import stats

    seeds = sorted(s for s in set(variant) & set(baseline)
                   if _finite([variant[s]]) and _finite([baseline[s]]))
    a = [float(variant[s]) for s in seeds]  # type: ignore[arg-type]
    b = [float(baseline[s]) for s in seeds]  # type: ignore[arg-type]
    diffs = [x - y for x, y in zip(a, b)]
    out: dict[str, Any] = {"seeds": seeds, "diff": t_interval(diffs),
                           "t_test": {"statistic": math.nan, "p": math.nan},
                           "wilcoxon": {"statistic": math.nan, "p": math.nan}}
    if len(seeds) >= 2 and any(d != 0 for d in diffs):
        t = stats.ttest_rel(a, b)
        out["t_test"] = {"statistic": float(t.statistic), "p": float(t.pvalue)}
        w = stats.wilcoxon(a, b)
        out["wilcoxon"] = {"statistic": float(w.statistic), "p": float(w.pvalue)}
    return out


def verdict(diff: dict[str, float], relation: str, margin: float | None = None) -> tuple[str, str]:
    """``(verdict, reason)`` of one comparison from the interval ``diff`` of ``variant − baseline``."""
    if relation not in RELATIONS:
        raise ValueError(f"relation must be one of {list(RELATIONS)}; got {relation!r}")
    margin = DEFAULT_MARGIN[relation] if margin is None else float(margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (in the metric's units); got {margin}")
    lo, hi = diff.get("lo", math.nan), diff.get("hi", math.nan)
    if diff.get("n", 0) < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, "too few seeds"
    pp = lambda v: f"{100 * v:+.2f} pp"  # noqa: E731
    ci = f"95% CI [{pp(lo)}, {pp(hi)}]"
    if relation == ">":
        if lo > 0:
            return REPRODUCED, f"{ci} is above 0"
        if hi < margin:
            return NOT_REPRODUCED, (f"{ci} is below 0" if hi < 0 else f"{ci} is below the margin {pp(margin)}")
        return INCONCLUSIVE, f"{ci} contains 0" if margin == 0 else f"{ci} reaches 0 and the margin {pp(margin)}"
    if hi < 0:
        return NOT_REPRODUCED, f"{ci} is below 0 (significantly worse)"
    if lo > -margin:
        return REPRODUCED, f"{ci} is above −{100 * margin:.2f} pp (the margin)"
    return INCONCLUSIVE, f"{ci} reaches below −{100 * margin:.2f} pp (the margin)"


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a claim made of several comparisons (see the module docstring)."""
    if not verdicts:
        return INCONCLUSIVE
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    if all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    return INCONCLUSIVE
