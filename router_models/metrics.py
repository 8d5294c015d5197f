"""Quality-cost evaluation of routers (after RouterBench and RouteLLM).

Inputs are plain arrays over one test split of ``n`` prompts and ``m`` experts:
``scores`` [n, m] true quality in 0..1 (no NaN: drop incomplete prompts first),
``costs`` [n, m] true USD per call, and a router's predictions ``q_hat`` / ``c_hat``
[n, m]. Sweeping the willingness-to-pay knob ``lam`` of :func:`policy_choices` turns a
router into *operating points* (mean true cost, mean true score of the chosen experts).
Every metric reads those points against :func:`reference_points` of the split, which
every router of one table shares (weak = cheapest expert, strong = best single expert):

- ``H(c)``: the non-decreasing upper convex hull of the points (:func:`hull`), linear
  between vertices (a router can mix two knob settings at random), flat right of its
  last vertex, unreachable (NaN) left of its first;
- AIQ = 1/(c_max - c_min) * integral_{c_min}^{c_max} H(c) dc, unreachable counting 0;
- PGR(c) = clip((H(c) - q_weak) / (q_strong - q_weak), 0, 1), unreachable 0;
  APGR = 1/(c_strong - c_weak) * integral_{c_weak}^{c_strong} PGR(c) dc;
- CPT(x) = min cost of a raw operating point with quality >= q_weak + x (q_strong - q_weak);
- cost_to_best_single = min cost of a raw operating point with quality >= q_strong, / c_strong.

What falls out of these definitions (pinned by the tests): one expert alone is one point,
so the strong expert's APGR is 0 (its curve is reachable only at c_strong) and the weak
expert's is 0 (PGR 0 everywhere). The oracle's APGR is 1 only when it matches q_strong
at no more than c_weak; when every expert costs the same on every prompt its curve starts
at the weak expert, so its APGR is below 1. Integrals are exact (piecewise linear).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# 0 (best quality, cheaper on ties), 61 log-spaced values, then inf (cheapest expert,
# better on ties). inf rather than a big finite value: no finite lam is guaranteed to
# outweigh a quality gap when two experts' costs differ by a hair. Only policy_choices
# gives lam=inf its meaning; q - inf * c is not it.
LAMBDAS: np.ndarray = np.concatenate(([0.0], np.geomspace(1e-3, 1e3, 61), [np.inf]))

# Quality thresholds (CPT, cost_to_best_single) forgive this much float noise: the same
# choices summed in another order must not miss a bar they meet.
QUALITY_TOL = 1e-9
_TIE_RTOL = 1e-12  # utilities this close (relative) are a tie in policy_choices


def _matrix(name: str, a: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty [n, m] matrix, got shape {arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or inf (drop incomplete prompts before evaluating)")
    return arr


def _points(points: Any) -> np.ndarray:
    arr = np.asarray(points, dtype=float)
    if arr.size == 0:
        return np.empty((0, 2))
    if arr.ndim != 2 or arr.shape[1] != 2 or not np.isfinite(arr).all():
        raise ValueError(f"points must be finite [k, 2] (cost, quality) pairs, got {arr.shape}")
    return arr


def _column_means(a: np.ndarray) -> np.ndarray:
    # one contiguous row per expert: the same summation a gathered choice vector gets
    return np.ascontiguousarray(a.T).mean(axis=1)


def cost_scale_of(c_hat: Any) -> float:
    """The dearest expert's mean predicted cost, ``max_j mean_i c_hat[i, j]``; 1.0 when that
    is not positive (everything predicted free: the knob is moot)."""
    scale = float(_column_means(_matrix("c_hat", c_hat)).max())
    return scale if scale > 0 else 1.0


def policy_choices(q_hat: Any, c_hat: Any, lam: float, cost_scale: float) -> np.ndarray:
    """Willingness to pay: ``argmax_j q_hat[i, j] - lam * c_hat[i, j] / cost_scale`` per prompt.

    ``lam`` is dimensionless: with ``cost_scale`` the dearest expert's mean predicted cost
    (:func:`cost_scale_of`), ``lam = 1`` means that expert's price is worth one unit of
    quality. Ties (within 1e-12 relative) go to the cheaper expert by ``c_hat``, then the
    lower index. ``lam = inf`` picks the cheapest expert, ties to the higher ``q_hat``,
    then the lower index (the limit of large lam). Returns int indices [n].
    """
    q = _matrix("q_hat", q_hat)
    c = _matrix("c_hat", c_hat, q.shape)
    lam, cost_scale = float(lam), float(cost_scale)
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not (cost_scale > 0 and math.isfinite(cost_scale)):
        raise ValueError(f"cost_scale must be positive and finite, got {cost_scale}")
    return _choices(q, c, lam, cost_scale)


def _choices(q: np.ndarray, c: np.ndarray, lam: float, cost_scale: float) -> np.ndarray:
    if math.isinf(lam):
        cheapest = c <= c.min(axis=1, keepdims=True)
        return np.argmax(np.where(cheapest, q, -np.inf), axis=1)
    utility = q - lam * (c / cost_scale)
    best = utility.max(axis=1, keepdims=True)
    tied = utility >= best - _TIE_RTOL * np.maximum(1.0, np.abs(best))
    return np.argmin(np.where(tied, c, np.inf), axis=1)


def curve_points(scores: Any, costs: Any, q_hat: Any, c_hat: Any,
                 lambdas: Any = LAMBDAS) -> np.ndarray:
    """Operating points [k, 2] of a router: for each ``lam`` in ``lambdas``, the chosen
    experts' (mean true cost, mean true score); unique points, sorted by cost then quality.
    ``cost_scale`` is :func:`cost_scale_of` ``(c_hat)``."""
    s = _matrix("scores", scores)
    c = _matrix("costs", costs, s.shape)
    q = _matrix("q_hat", q_hat, s.shape)
    ch = _matrix("c_hat", c_hat, s.shape)
    lams = np.asarray(lambdas, dtype=float).ravel()
    if lams.size == 0:
        raise ValueError("lambdas is empty")
    if not (lams >= 0).all():
        raise ValueError("lambdas must be >= 0")
    scale, rows = cost_scale_of(ch), np.arange(s.shape[0])
    pts = [(c[rows, j].mean(), s[rows, j].mean())
           for j in (_choices(q, ch, float(lam), scale) for lam in lams)]
    return np.unique(np.array(pts), axis=0)


def hull(points: Any) -> np.ndarray:
    """Non-decreasing upper convex hull (RouterBench) of (cost, quality) points, [h, 2].

    Sorted by cost (per cost only the best quality counts), the upper concave envelope is
    kept (points on or under a chord are dropped, so collinear middle points go too), then
    every vertex whose quality is not above the previous kept vertex is dropped. The result
    is strictly increasing in cost and quality, with decreasing slopes.
    """
    p = _points(points)
    if len(p) == 0:
        return p
    p = p[np.lexsort((-p[:, 1], p[:, 0]))]
    p = p[np.r_[True, p[1:, 0] != p[:-1, 0]]]
    upper: list[tuple[float, float]] = []
    for x, y in p:
        while len(upper) >= 2:
            (x0, y0), (x1, y1) = upper[-2], upper[-1]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0:  # (x1, y1) not above chord
                upper.pop()
            else:
                break
        upper.append((float(x), float(y)))
    kept = [upper[0]]
    for x, y in upper[1:]:
        if y > kept[-1][1]:
            kept.append((x, y))
    return np.array(kept)


def hull_quality_at(hull_pts: Any, c: Any) -> Any:
    """``H(c)`` for a hull from :func:`hull`: linear between vertices, flat at the last
    quality right of the last vertex, NaN left of the first (not reachable). Scalar in,
    float out; array in, array out."""
    h = _points(hull_pts)
    x = np.asarray(c, dtype=float)
    if len(h) == 0:
        out = np.full(x.shape, np.nan)
    else:
        out = np.where(x < h[0, 0], np.nan, np.interp(x, h[:, 0], h[:, 1]))
    return float(out) if out.ndim == 0 else out


def _hull_integral(h: np.ndarray, a: float, b: float,
                   transform: Callable[[np.ndarray], np.ndarray],
                   levels: Sequence[float] = ()) -> float:
    """``integral_a^b transform(H(x)) dx``, unreachable x contributing 0. Exact when
    ``transform`` is linear between ``levels``: the grid holds the vertices and the x where
    H crosses a level, so the integrand is linear on every piece and trapezoids are exact."""
    if len(h) == 0 or b <= a:
        return 0.0
    lo = max(a, h[0, 0])
    if lo >= b:
        return 0.0
    xs = [np.array([lo, b]), h[:, 0]]
    x0, x1, y0, y1 = h[:-1, 0], h[1:, 0], h[:-1, 1], h[1:, 1]
    for level in levels:
        k = (y0 < level) & (level < y1)
        xs.append(x0[k] + (level - y0[k]) * (x1[k] - x0[k]) / (y1[k] - y0[k]))
    grid = np.unique(np.clip(np.concatenate(xs), lo, b))
    ys = transform(hull_quality_at(h, grid))
    return float(np.sum((ys[1:] + ys[:-1]) * 0.5 * np.diff(grid)))


def aiq(points: Any, c_min: float, c_max: float) -> float:
    """Average Improvement in Quality (RouterBench):
    ``1/(c_max - c_min) * integral_{c_min}^{c_max} H(c) dc`` with H 0 where unreachable.

    ``c_min`` / ``c_max``: the cheapest and dearest single experts' mean costs on the split.
    When they are equal (every expert costs the same on average) this is the limit, H(c_min)
    (0 if unreachable). Empty points give 0.
    """
    if c_max < c_min:
        raise ValueError(f"c_max {c_max} < c_min {c_min}")
    h = hull(points)
    if c_max == c_min:
        q = hull_quality_at(h, c_min)
        return 0.0 if math.isnan(q) else q
    return _hull_integral(h, c_min, c_max, lambda y: y) / (c_max - c_min)


def _pgr(q: np.ndarray, q_weak: float, q_strong: float) -> np.ndarray:
    pgr = np.clip((q - q_weak) / (q_strong - q_weak), 0.0, 1.0)
    return np.where(np.isnan(q), 0.0, pgr)


def pgr_curve(points: Any, q_weak: float, q_strong: float, c: Any) -> Any:
    """Performance Gap Recovered at cost(s) ``c``:
    ``PGR(c) = clip((H(c) - q_weak) / (q_strong - q_weak), 0, 1)``, 0 where unreachable;
    NaN when ``q_strong <= q_weak`` (no gap to recover)."""
    x = np.asarray(c, dtype=float)
    if not q_strong > q_weak:
        out = np.full(x.shape, np.nan)
    else:
        out = _pgr(np.asarray(hull_quality_at(hull(points), x)), q_weak, q_strong)
    return float(out) if out.ndim == 0 else out


def apgr(points: Any, q_weak: float, q_strong: float, c_weak: float, c_strong: float) -> float:
    """Average PGR (RouteLLM, generalised to many experts with weak = cheapest expert,
    strong = best single expert):
    ``APGR = 1/(c_strong - c_weak) * integral_{c_weak}^{c_strong} PGR(c) dc``.

    NaN when ``q_strong <= q_weak`` (no gap), and NaN when ``c_strong <= c_weak`` (the best
    expert is also the cheapest: there is no cost interval to average over).
    """
    if not q_strong > q_weak or not c_strong > c_weak:
        return math.nan
    h = hull(points)
    area = _hull_integral(h, c_weak, c_strong, lambda y: _pgr(y, q_weak, q_strong),
                          levels=(q_weak, q_strong))
    return area / (c_strong - c_weak)


def _cheapest_reaching(points: Any, target: float) -> float | None:
    p = _points(points)
    ok = p[:, 1] >= target - QUALITY_TOL
    return float(p[ok, 0].min()) if ok.any() else None


def cpt(points: Any, frac: float, q_weak: float, q_strong: float) -> float | None:
    """Call-Performance Threshold, generalised to cost: the lowest mean cost per query of a
    raw operating point (not the interpolated hull) with quality
    ``>= q_weak + frac * (q_strong - q_weak)``; None if no point reaches it."""
    if not 0.0 <= frac <= 1.0:
        raise ValueError(f"frac must be in [0, 1], got {frac}")
    return _cheapest_reaching(points, q_weak + frac * (q_strong - q_weak))


def cost_to_best_single(points: Any, q_best: float, c_best: float) -> float | None:
    """``min{cost : raw operating point with quality >= q_best} / c_best``; None if never
    reached; NaN if ``c_best <= 0`` (a free best expert leaves no ratio)."""
    cheapest = _cheapest_reaching(points, q_best)
    if cheapest is None:
        return None
    return cheapest / c_best if c_best > 0 else math.nan


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class CurveReport:
    """One router's curve and metrics on one split. ``points``: [[cost, quality], ...]
    sorted by cost; ``expert``: the column index, set only on the ``best_single`` baseline."""

    name: str
    points: list[list[float]]
    aiq: float
    apgr: float
    cpt50: float | None
    cpt80: float | None
    cost_to_best_single: float | None
    expert: int | None = None

    def hull_points(self) -> np.ndarray:
        return hull(self.points)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: keys name, aiq, apgr, cpt50, cpt80, cost_to_best_single, points
        (+ expert when set); NaN becomes None."""
        out: dict[str, Any] = {
            "name": self.name,
            "aiq": _json_float(self.aiq),
            "apgr": _json_float(self.apgr),
            "cpt50": _json_float(self.cpt50),
            "cpt80": _json_float(self.cpt80),
            "cost_to_best_single": _json_float(self.cost_to_best_single),
            "points": [[float(c), float(q)] for c, q in self.points],
        }
        if self.expert is not None:
            out["expert"] = int(self.expert)
        return out


def reference_points(scores: Any, costs: Any) -> dict[str, Any]:
    """What every router of one table is measured against, from per-expert means:
    ``c_min`` / ``c_max`` (cheapest / dearest expert's mean cost), ``weak`` (cheapest
    expert; ties -> higher mean score, then lower index), ``strong`` (best single expert:
    highest mean score; ties -> cheaper, then lower index), and ``q_weak``, ``c_weak``,
    ``q_strong``, ``c_strong`` (their mean score and cost)."""
    s = _matrix("scores", scores)
    c = _matrix("costs", costs, s.shape)
    ms, mc, idx = _column_means(s), _column_means(c), np.arange(s.shape[1])
    weak = int(np.lexsort((idx, -ms, mc))[0])
    strong = int(np.lexsort((idx, mc, -ms))[0])
    return {"c_min": float(mc.min()), "c_max": float(mc.max()), "weak": weak, "strong": strong,
            "q_weak": float(ms[weak]), "c_weak": float(mc[weak]),
            "q_strong": float(ms[strong]), "c_strong": float(mc[strong])}


def report_from_points(name: str, points: Any, ref: dict[str, Any],
                       expert: int | None = None) -> CurveReport:
    """Metrics of operating points against ``ref`` (:func:`reference_points`)."""
    p = np.unique(_points(points), axis=0)
    return CurveReport(
        name=name,
        points=p.tolist(),
        aiq=aiq(p, ref["c_min"], ref["c_max"]),
        apgr=apgr(p, ref["q_weak"], ref["q_strong"], ref["c_weak"], ref["c_strong"]),
        cpt50=cpt(p, 0.5, ref["q_weak"], ref["q_strong"]),
        cpt80=cpt(p, 0.8, ref["q_weak"], ref["q_strong"]),
        cost_to_best_single=cost_to_best_single(p, ref["q_strong"], ref["c_strong"]),
        expert=expert,
    )


def evaluate_router(name: str, scores: Any, costs: Any, q_hat: Any, c_hat: Any,
                    lambdas: Any = LAMBDAS, ref: dict[str, Any] | None = None) -> CurveReport:
    """:func:`curve_points` over ``lambdas``, then every metric against ``ref`` (by default
    :func:`reference_points` of ``scores`` / ``costs``; pass one ``ref`` for a whole table)."""
    if ref is None:
        ref = reference_points(scores, costs)
    return report_from_points(name, curve_points(scores, costs, q_hat, c_hat, lambdas), ref)


def oracle_points(scores: Any, costs: Any) -> np.ndarray:
    """The oracle's operating points: :func:`policy_choices` fed the true scores and costs
    at *every* ``lam >= 0``, not only a grid (a grid can step over a frontier vertex, and
    then a router could beat the oracle).

    Per prompt, the options' upper hull from the cheapest (ties: better) to the cheapest
    best option is a chain of upgrades (dc > 0, ds > 0) with falling slopes ds/dc; as lam
    falls from inf to 0 the policy takes upgrades in order of slope, largest first. Points:
    the lam=inf choice, then the running means after each group of equal slope; the last
    is the lam=0 choice. Up to n(m-1)+1 points; O(n m^2 + N log N).
    """
    s = _matrix("scores", scores)
    c = _matrix("costs", costs, s.shape)
    n, m = s.shape
    rows = np.arange(n)
    cur = policy_choices(s, c, np.inf, 1.0)
    start = np.array([c[rows, cur].sum(), s[rows, cur].sum()])
    steps: list[np.ndarray] = []  # rows of (dc, ds, slope)
    for _ in range(m - 1):
        cur_s, cur_c = s[rows, cur][:, None], c[rows, cur][:, None]
        better = s > cur_s  # all dearer: cur is the best option no dearer than itself
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            slope = np.where(better, (s - cur_s) / (c - cur_c), -np.inf)
        best = slope.max(axis=1)
        has = best > -np.inf
        if not has.any():
            break
        # among equal best slopes take the dearest: the collinear ones between are never chosen
        nxt = np.argmax(np.where(better & (slope >= best[:, None]), c, -np.inf), axis=1)
        r, j = rows[has], nxt[has]
        steps.append(np.column_stack([c[r, j] - c[r, cur[r]], s[r, j] - s[r, cur[r]], best[has]]))
        cur = np.where(has, nxt, cur)
    if not steps:
        return start[None, :] / n
    seg = np.concatenate(steps)
    seg = seg[np.argsort(-seg[:, 2], kind="stable")]  # stable: a prompt's chain stays in order
    group_end = np.r_[seg[1:, 2] != seg[:-1, 2], True]
    running = start + np.cumsum(seg[:, :2], axis=0)
    return np.unique(np.vstack([start, running[group_end]]) / n, axis=0)


def baselines(scores: Any, costs: Any, seed: int = 0) -> dict[str, CurveReport]:
    """Reference routers on the split, keys ``random``, ``best_single``, ``oracle``.

    - ``oracle``: :func:`oracle_points` (true scores and costs through the policy, every lam).
    - ``best_single``: one point, the best single expert; ``expert`` holds its index.
    - ``random``: per prompt the best single expert with probability p, else a uniformly
      random expert (of all m), p in linspace(0, 1, 21); exact expectations, so its points
      run from the uniform choice's (mean cost, mean score) to the best single point.

    ``seed`` is accepted for a uniform call signature and unused: nothing is sampled.
    The single experts' points for a plot come from :func:`single_expert_points`.
    """
    del seed
    ref = reference_points(scores, costs)
    s, c = np.asarray(scores, dtype=float), np.asarray(costs, dtype=float)
    uniform = np.array([_column_means(c).mean(), _column_means(s).mean()])
    strong = np.array([ref["c_strong"], ref["q_strong"]])
    p = np.linspace(0.0, 1.0, 21)[:, None]
    return {
        "random": report_from_points("random", p * strong + (1 - p) * uniform, ref),
        "best_single": report_from_points("best_single", strong[None, :], ref,
                                          expert=ref["strong"]),
        "oracle": report_from_points("oracle", oracle_points(s, c), ref),
    }


def single_expert_points(scores: Any, costs: Any,
                         names: Sequence[str] | None = None) -> list[tuple[str, float, float]]:
    """(name, mean cost, mean score) per expert, for :func:`plot_curves`; names default to
    ``expert 0``, ``expert 1``, ..."""
    s = _matrix("scores", scores)
    c = _matrix("costs", costs, s.shape)
    names = list(names) if names is not None else [f"expert {j}" for j in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} names for {s.shape[1]} experts")
    return [(str(nm), float(mc), float(ms))
            for nm, mc, ms in zip(names, _column_means(c), _column_means(s))]


def _dense_costs(x: np.ndarray, per_segment: int = 24) -> np.ndarray:
    """Fill each segment so that a line linear in cost draws true on a log axis."""
    fill = [np.geomspace(a, b, per_segment) if a > 0 else np.linspace(a, b, per_segment)
            for a, b in zip(x[:-1], x[1:]) if b > a]
    return np.unique(np.concatenate([x, *fill]))


LABEL_OFFSETS = ((4, 4), (4, -11), (4, 15), (4, -22), (-4, 4), (4, 26))   # points from the dot


def _spread_labels(fig, labels: list) -> None:
    """Move each expert's name to the first of ``LABEL_OFFSETS`` where it overlaps no name
    placed before it (highest dots first); one that fits nowhere keeps the first offset."""
    renderer = fig.canvas.get_renderer()
    placed = []
    for text in sorted(labels, key=lambda t: -t.xy[1]):
        for dx, dy in LABEL_OFFSETS:
            text.set_position((dx, dy))
            text.set_horizontalalignment("right" if dx < 0 else "left")
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        else:
            text.set_position(LABEL_OFFSETS[0])
            text.set_horizontalalignment("left")
            box = text.get_window_extent(renderer)
        placed.append(box)


def plot_curves(reports: Sequence[CurveReport], single_experts: Sequence[tuple[str, float, float]],
                path: str | Path, title: str | None = None) -> Path:
    """One PNG: each router's operating points and its hull (extended flat to the right
    edge), the oracle as a dashed hull only (its points all lie on it), the single experts
    as labelled dots; cost on a log x axis (symlog when a cost is 0). Uses the Agg canvas
    directly: no pyplot global state, no backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    xs = [p[0] for r in reports for p in r.points] + [e[1] for e in single_experts]
    right = max(xs, default=1.0)
    for r in reports:
        pts, h = _points(r.points), r.hull_points()
        if len(h) == 0:
            continue
        oracle = r.name == "oracle"
        hx = _dense_costs(np.r_[h[:, 0], max(right, h[-1, 0])])
        (line,) = ax.plot(hx, hull_quality_at(h, hx), ls="--" if oracle else "-",
                          color="black" if oracle else None,
                          label=f"{r.name} (AIQ {r.aiq:.3f})" if len(pts) > 1 else f"{r.name} (one point)")
        if not oracle:  # the oracle's points are all on its hull, and can be thousands
            ax.scatter(pts[:, 0], pts[:, 1], s=30 if len(pts) == 1 else 8, marker="*" if
                       len(pts) == 1 else "o", color=line.get_color(), alpha=0.7, zorder=4)
    labels = []
    for name, cost, quality in single_experts:
        ax.scatter([cost], [quality], s=40, color="tab:gray", edgecolors="black", zorder=3)
        labels.append(ax.annotate(name, (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=8))
    positive = [x for x in xs if x > 0]
    if positive and len(positive) == len(xs):
        ax.set_xscale("log")
    elif positive:
        ax.set_xscale("symlog", linthresh=min(positive))
    ax.set_xlabel("mean cost per query (USD)")
    ax.set_ylabel("mean quality")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    _spread_labels(fig, labels)
    if reports:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)   # clear of the dots' names
    fig.savefig(path, dpi=120, bbox_inches="tight")   # the legend, and a name past the right edge
    return Path(path)
