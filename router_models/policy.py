"""The cost-aware policy: from predicted quality and cost to one expert and its fallbacks.

Two forms, after RouteLLM and RouterBench:

- willingness to pay (``mode="wtp"``): ``argmax_j q[i, j] - lam * c[i, j] / cost_scale``.
  ``lam`` is dimensionless: ``cost_scale`` is the dearest expert's mean predicted cost on
  the router's training prompts, so ``lam = 1`` means "paying the dearest expert's price
  is worth one unit of quality"; ``lam = 0`` buys the best predicted quality.
- threshold (``mode="threshold"``): the cheapest expert whose predicted quality is at
  least ``min_quality``; when none clears the bar, the best predicted quality.

Either form takes a ``max_cost`` cap (USD per call): experts predicted dearer are left
out unless nothing is under the cap, when the cheapest one is used. The fallback list is
every other allowed expert, best utility first.

:func:`calibrate` picks ``lam`` (or ``min_quality``) on logged prompts so that the
policy hits a target spend per query or a target share of calls to the strongest
expert, RouteLLM's way of turning a router score into a deployable threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from router_models.metrics import _TIE_RTOL, policy_choices

Mode = Literal["wtp", "threshold"]


@dataclass(frozen=True)
class CostAwarePolicy:
    mode: Mode = "wtp"
    lam: float = 0.0
    min_quality: float | None = None
    max_cost: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("wtp", "threshold"):
            raise ValueError(f"mode must be 'wtp' or 'threshold', got {self.mode!r}")
        if not (self.lam >= 0):
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.mode == "threshold" and self.min_quality is None:
            raise ValueError("the threshold form needs min_quality")
        if self.max_cost is not None and not self.max_cost >= 0:
            raise ValueError(f"max_cost must be >= 0, got {self.max_cost}")

    def with_knobs(self, *, lam: float | None = None, max_cost: float | None = None,
                   min_quality: float | None = None) -> "CostAwarePolicy":
        """This policy with request knobs applied; ``min_quality`` switches to the
        threshold form."""
        new = self
        if lam is not None:
            new = replace(new, mode="wtp", lam=float(lam))
        if min_quality is not None:
            new = replace(new, mode="threshold", min_quality=float(min_quality))
        if max_cost is not None:
            new = replace(new, max_cost=float(max_cost))
        return new

    def utilities(self, q: np.ndarray, c: np.ndarray, cost_scale: float) -> np.ndarray:
        """[n, m] score that orders experts for each prompt (higher is better)."""
        q = np.asarray(q, dtype=float)
        c = np.asarray(c, dtype=float)
        if self.mode == "wtp" and math.isinf(self.lam):
            # The limit of large lambda: cheapest first, then quality (no inf * 0 = NaN).
            u = -(c / cost_scale) + 1e-9 * q
        elif self.mode == "wtp":
            u = q - self.lam * (c / cost_scale)  # as policy_choices rounds it
        else:
            # Experts over the bar rank by cheapness, above every expert under the bar,
            # which rank by quality.
            over = q >= float(self.min_quality)
            u = np.where(over, 2.0 + 1.0 / (1.0 + c / cost_scale), q)
        if self.max_cost is not None:
            capped = c > self.max_cost
            # Over the cap only when nothing is under it; then the cheapest wins.
            u = np.where(capped, -1e9 - c / cost_scale, u)
        return u

    def rank(self, q: np.ndarray, c: np.ndarray, cost_scale: float,
             allowed: np.ndarray | None = None) -> np.ndarray:
        """[n, m] expert indices per prompt, best first; disallowed experts are cut off
        (the row is padded with -1). Ties go to the cheaper expert."""
        return order_by_utility(self.utilities(q, c, cost_scale), c, allowed)

    def choose(self, q: np.ndarray, c: np.ndarray, cost_scale: float) -> np.ndarray:
        """[n] chosen expert per prompt (no allowed mask: the evaluation path)."""
        if self.mode == "wtp" and self.max_cost is None:
            return policy_choices(q, c, self.lam, cost_scale)
        return self.rank(q, c, cost_scale)[:, 0]


def order_by_utility(u: np.ndarray, c: np.ndarray, allowed: np.ndarray | None = None) -> np.ndarray:
    """[n, m] expert indices per prompt by utility ``u`` (from
    :meth:`CostAwarePolicy.utilities`), best first, ties to the cheaper by ``c``;
    disallowed experts are cut off (the row is padded with -1)."""
    u = np.asarray(u, dtype=float)
    c = np.asarray(c, dtype=float)
    if allowed is not None:
        u = np.where(np.asarray(allowed, dtype=bool), u, -np.inf)
    # Near-ties with the best count as ties, as in choose()/policy_choices: calibrate
    # puts lambda exactly on a tie, where float noise must not pick the dearer expert.
    best = u.max(axis=1, keepdims=True)
    u = np.where(u >= best - _TIE_RTOL * np.maximum(1.0, np.abs(best)), best, u)
    # lexsort: last key is primary. Utility descending, then cost ascending.
    order = np.stack([np.lexsort((c[i], -u[i])) for i in range(u.shape[0])])
    if allowed is not None:
        dead = np.take_along_axis(np.isneginf(u), order, axis=1)
        order = np.where(dead, -1, order)
    return order


Target = Literal["spend", "strong_share"]


def calibrate(q: np.ndarray, c: np.ndarray, cost_scale: float, *, target: Target,
              value: float, mode: Mode = "wtp", strong: int | None = None,
              steps: int = 60) -> CostAwarePolicy:
    """The policy whose knob hits ``value`` on logged prompts (``q``, ``c`` predicted).

    ``target="spend"``: mean predicted cost per query at most ``value`` USD, as much
    quality as that buys. ``target="strong_share"``: at most ``value`` (0..1) of calls
    go to expert ``strong`` (default: the highest mean predicted quality).
    Spend and strong share both fall as lam rises and as min_quality falls, so a
    bisection on the knob finds the boundary.
    """
    q = np.asarray(q, dtype=float)
    c = np.asarray(c, dtype=float)
    if strong is None:
        strong = int(np.argmax(q.mean(axis=0)))
    rows = np.arange(q.shape[0])

    def measure(policy: CostAwarePolicy) -> float:
        ch = policy.choose(q, c, cost_scale)
        return float(c[rows, ch].mean()) if target == "spend" else float((ch == strong).mean())

    if target not in ("spend", "strong_share"):
        raise ValueError(f"target must be 'spend' or 'strong_share', got {target!r}")
    if mode == "wtp":
        make = lambda k: CostAwarePolicy("wtp", lam=k)  # noqa: E731
        lo, hi = 0.0, 1.0
        while measure(make(hi)) > value and hi < 1e6:
            hi *= 4
        if measure(make(lo)) <= value:
            return make(lo)
        for _ in range(steps):  # invariant: measure(lo) > value >= measure(hi)
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 16
            lo, hi = (mid, hi) if measure(make(mid)) > value else (lo, mid)
        return make(hi)
    make = lambda k: CostAwarePolicy("threshold", min_quality=k)  # noqa: E731
    lo, hi = float(q.min()) - 1e-9, float(q.max()) + 1e-9  # lo: cheapest always clears
    if measure(make(hi)) <= value:
        return make(hi)
    for _ in range(steps):  # invariant: measure(lo) <= value < measure(hi)
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if measure(make(mid)) <= value else (lo, mid)
    return make(lo)
