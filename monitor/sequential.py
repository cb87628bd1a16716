"""Always-valid comparison of two error rates: look at a running A/B test as often as you like.

A fixed-horizon z-test is only valid when read once, at a sample size chosen in advance. A
canary dashboard reads it after every batch, and each look is another chance of a false alarm:
peeking every 100 calls up to 20,000 pushes a nominal 5 % test past 30 % (see
``bench/README_sequential.md``). The mixture sequential probability ratio test (mSPRT) of
Johari, Pekelis and Walsh, "Always valid inference: continuous monitoring of A/B tests"
(Operations Research 70(3), 2022; arXiv:1512.04922) fixes that:

* The difference of error rates ``d = rate_b - rate_a`` is approximately normal with variance
  ``v = p_a (1 - p_a) / n_a + p_b (1 - p_b) / n_b``. Mixing the likelihood ratio of
  ``N(theta, v)`` against ``N(theta0, v)`` over a prior ``theta ~ N(theta0, tau**2)`` gives

      Lambda = sqrt(v / (v + tau**2)) * exp(tau**2 * (d - theta0)**2 / (2 * v * (v + tau**2)))

  a martingale under ``theta = theta0``; by Ville's inequality it exceeds ``1 / alpha`` at
  *any* look with probability at most ``alpha``.
* The always-valid p-value is the running minimum of ``min(1, 1 / Lambda)``, so it never goes
  up, and ``p <= alpha`` can be acted on at whichever look it happens (act on the first).
* Inverting ``Lambda < 1 / alpha`` over ``theta0`` gives ``d +- w`` with
  ``w**2 = v (v + tau**2) / tau**2 * (2 log(1 / alpha) + log((v + tau**2) / v))``; the running
  intersection of these intervals is a confidence sequence that covers the true difference at
  every look at once with probability ``1 - alpha``.

The rates in ``v`` are Agresti-Caffo adjusted, ``(errors + 1) / (n + 2)``, so an arm with no
errors yet does not claim zero variance. The p-value and the interval use the same ``v``, so
``p <= alpha`` exactly when the confidence sequence excludes 0. ``tau`` is the scale of the
differences you expect (absolute rate units): the test is most efficient near it and valid for
any value. Counts are cumulative per arm; the arms need not be the same size.

The guarantee assumes each arm's error rate is constant. If two looks' intervals are disjoint
(probability <= alpha when it is), :class:`ErrorRateTest` restarts its running p-value and
interval from the newest look and says so in ``reason``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from monitor.errors import ConfigError

FloatArray = npt.NDArray[np.float64]

DECISIONS = ("continue", "challenger_worse", "challenger_better", "equivalent")


@dataclass(frozen=True)
class SequentialResult:
    """One look at an A/B test of error rates; ``a`` is the champion, ``b`` the challenger.

    ``difference`` is ``rate_b - rate_a`` (positive: the challenger errs more). ``p_value`` is
    the always-valid p-value (running minimum over looks) and ``ci`` the always-valid
    ``1 - alpha`` confidence sequence (running intersection) for the difference.
    """

    n_a: int
    n_b: int
    errors_a: int
    errors_b: int
    rate_a: float
    rate_b: float
    difference: float
    p_value: float
    ci: tuple[float, float]
    decision: str
    reason: str
    looks: int

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-serialisable fields (the interval becomes a list)."""
        out = asdict(self)
        out["ci"] = list(self.ci)
        return out


def difference_variance(
    n_a: npt.ArrayLike, errors_a: npt.ArrayLike, n_b: npt.ArrayLike, errors_b: npt.ArrayLike
) -> FloatArray:
    """Variance of ``rate_b - rate_a`` with Agresti-Caffo adjusted rates (vectorised)."""
    na, nb = np.asarray(n_a, dtype=np.float64), np.asarray(n_b, dtype=np.float64)
    pa = (np.asarray(errors_a, dtype=np.float64) + 1.0) / (na + 2.0)
    pb = (np.asarray(errors_b, dtype=np.float64) + 1.0) / (nb + 2.0)
    return np.asarray(pa * (1.0 - pa) / (na + 2.0) + pb * (1.0 - pb) / (nb + 2.0))


def mixture_log_lr(
    difference: npt.ArrayLike, variance: npt.ArrayLike, tau: float, theta0: float = 0.0
) -> FloatArray:
    """``log Lambda`` of the normal-mixture SPRT of ``theta0`` (vectorised; see module doc)."""
    d = np.asarray(difference, dtype=np.float64)
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    return np.asarray(0.5 * np.log(v / (v + t2)) + t2 * (d - theta0) ** 2 / (2.0 * v * (v + t2)))


def half_width(variance: npt.ArrayLike, tau: float, alpha: float) -> FloatArray:
    """Half-width of the ``1 - alpha`` always-valid interval at one look (vectorised)."""
    v = np.asarray(variance, dtype=np.float64)
    t2 = tau * tau
    return np.asarray(
        np.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log((v + t2) / v)))
    )


def msprt_p_value(n_a: int, errors_a: int, n_b: int, errors_b: int, *, tau: float = 0.01) -> float:
    """The mSPRT p-value ``min(1, 1 / Lambda)`` of "equal error rates" at one look.

    This is one look's value; an always-valid p-value is the running minimum over looks,
    which :class:`ErrorRateTest` keeps.

    >>> f"{msprt_p_value(5000, 50, 5000, 110):.1e}"  # 1.0 % vs 2.2 %
    '9.7e-05'
    >>> round(msprt_p_value(5000, 50, 5000, 80), 3)  # 1.0 % vs 1.6 %: not yet
    0.168
    """
    _check_counts(n_a, errors_a, n_b, errors_b)
    _check_tau(tau)
    if n_a == 0 or n_b == 0:
        return 1.0
    d = errors_b / n_b - errors_a / n_a
    log_lr = float(mixture_log_lr(d, difference_variance(n_a, errors_a, n_b, errors_b), tau))
    return math.exp(-log_lr) if log_lr > 0.0 else 1.0


class ErrorRateTest:
    """Sequential test of a challenger's error rate against the champion's, valid at every look.

    Feed cumulative counts after each batch; act on ``decision`` as soon as it is not
    ``"continue"``. ``margin`` (absolute rate units), when set, also allows ``"equivalent"``:
    the whole confidence sequence lies within ``(-margin, margin)``. For a one-sided "not
    worse by more than margin" check, read ``result.ci[1] < margin``. Looks before both arms
    hold ``min_samples`` calls report ``p_value=1`` and do not enter the running minimum,
    because the normal approximation is poor on a handful of calls.

    >>> test = ErrorRateTest(alpha=0.05, tau=0.01)
    >>> test.update(1000, 10, 1000, 12).decision
    'continue'
    >>> r = test.update(5000, 50, 5000, 110)
    >>> r.decision, round(r.difference, 3), r.ci[0] > 0
    ('challenger_worse', 0.012, True)
    """

    def __init__(
        self,
        alpha: float = 0.05,
        tau: float = 0.01,
        min_samples: int = 100,
        margin: float | None = None,
    ) -> None:
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha < 1.0):
            raise ConfigError(f"alpha={alpha!r} is invalid: use a probability in (0, 1), e.g. 0.05")
        _check_tau(tau)
        if not (isinstance(min_samples, int) and min_samples >= 1):
            raise ConfigError(f"min_samples={min_samples!r} is invalid: use an integer >= 1")
        if margin is not None and not (isinstance(margin, (int, float)) and 0.0 < margin < 1.0):
            raise ConfigError(
                f"margin={margin!r} is invalid: use an absolute rate difference in (0, 1), "
                "e.g. 0.005, or None"
            )
        self.alpha = float(alpha)
        self.tau = float(tau)
        self.min_samples = min_samples
        self.margin = margin
        self._p = 1.0
        self._lo, self._hi = -1.0, 1.0
        self._last = (0, 0, 0, 0)
        self.looks = 0
        self.restarted_at: int | None = None

    def update(self, n_a: int, errors_a: int, n_b: int, errors_b: int) -> SequentialResult:
        """Look at the test with cumulative counts; returns the always-valid state.

        Raises:
            ConfigError: a count is negative, errors exceed calls, or a count went down
                since the previous look (counts are cumulative).
        """
        _check_counts(n_a, errors_a, n_b, errors_b)
        counts = n_a, errors_a, n_b, errors_b = int(n_a), int(errors_a), int(n_b), int(errors_b)
        self._check_monotone(counts)
        self._last = counts
        self.looks += 1
        rate_a = errors_a / n_a if n_a else 0.0
        rate_b = errors_b / n_b if n_b else 0.0
        diff = rate_b - rate_a
        if min(n_a, n_b) >= self.min_samples:
            self._absorb(diff, float(difference_variance(*counts)))
        decision, reason = self._decide(n_a, n_b)
        return SequentialResult(
            n_a, n_b, errors_a, errors_b, rate_a, rate_b, diff, self._p, (self._lo, self._hi),
            decision, reason, self.looks,
        )  # fmt: skip

    def _check_monotone(self, counts: tuple[int, int, int, int]) -> None:
        names = ("n_a", "errors_a", "n_b", "errors_b")
        for name, new, old in zip(names, counts, self._last):
            if new < old:
                raise ConfigError(
                    f"{name}={new} is below the previous look's {old}: pass cumulative counts "
                    "(totals since the test started), or start a new ErrorRateTest"
                )

    def _absorb(self, diff: float, variance: float) -> None:
        """Fold one look into the running-minimum p-value and the running-intersection CI."""
        log_lr = float(mixture_log_lr(diff, variance, self.tau))
        p_now = math.exp(-log_lr) if log_lr > 0.0 else 1.0
        w = float(half_width(variance, self.tau, self.alpha))
        lo, hi = max(self._lo, diff - w), min(self._hi, diff + w)
        if lo > hi:
            # Disjoint looks happen with probability <= alpha, or when rates drift: trust the
            # newest look alone, for the interval and the p-value alike, so they agree.
            lo, hi, self._p = diff - w, diff + w, p_now
            self.restarted_at = self.looks
        self._p = min(self._p, p_now)
        self._lo, self._hi = max(lo, -1.0), min(hi, 1.0)

    def _decide(self, n_a: int, n_b: int) -> tuple[str, str]:
        decision, reason = self._verdict(n_a, n_b)
        if self.restarted_at is not None:
            reason += (
                f" (running state restarted at look {self.restarted_at}: earlier looks "
                "disagreed, so the error rates may be drifting)"
            )
        return decision, reason

    def _verdict(self, n_a: int, n_b: int) -> tuple[str, str]:
        lo, hi, p = self._lo, self._hi, self._p
        ci = f"{100 * (1 - self.alpha):.0f}% CS [{lo:+.4f}, {hi:+.4f}]"
        if min(n_a, n_b) < self.min_samples:
            return "continue", (
                f"waiting for data: {min(n_a, n_b)} of {self.min_samples} calls in the smaller arm"
            )
        if p <= self.alpha and lo > 0.0:
            return "challenger_worse", f"challenger errs more: p={p:.3g} <= {self.alpha}, {ci}"
        if p <= self.alpha and hi < 0.0:
            return "challenger_better", f"challenger errs less: p={p:.3g} <= {self.alpha}, {ci}"
        if self.margin is not None and -self.margin < lo and hi < self.margin:
            return "equivalent", f"{ci} lies within +-{self.margin}"
        return "continue", f"no decision yet: p={p:.3g} > {self.alpha}, {ci}"


def _check_counts(n_a: int, errors_a: int, n_b: int, errors_b: int) -> None:
    for arm, n, e in (("a", n_a, errors_a), ("b", n_b, errors_b)):
        if not (isinstance(n, (int, np.integer)) and isinstance(e, (int, np.integer))):
            raise ConfigError(
                f"n_{arm}={n!r}, errors_{arm}={e!r} must be integer counts of calls and errors"
            )
        if not 0 <= e <= n:
            raise ConfigError(
                f"n_{arm}={n}, errors_{arm}={e} is impossible: need 0 <= errors <= calls"
            )


def _check_tau(tau: float) -> None:
    if not (isinstance(tau, (int, float)) and 0.0 < tau < 1.0):
        raise ConfigError(
            f"tau={tau!r} is invalid: use the expected size of a rate difference in (0, 1), "
            "e.g. 0.01 for one percentage point"
        )


__all__ = [
    "DECISIONS",
    "ErrorRateTest",
    "SequentialResult",
    "difference_variance",
    "half_width",
    "mixture_log_lr",
    "msprt_p_value",
]
