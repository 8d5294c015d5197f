"""router_models.metrics on hand-made cases with known answers, plus hypothesis properties."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from router_models.metrics import (
    LAMBDAS,
    CurveReport,
    aiq,
    apgr,
    baselines,
    cost_to_best_single,
    cpt,
    curve_points,
    evaluate_router,
    hull,
    hull_quality_at,
    oracle_points,
    pgr_curve,
    plot_curves,
    policy_choices,
    reference_points,
    single_expert_points,
)


def random_instance(seed: int, n: int = 40, m: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, size=(n, m)).astype(float)
    costs = rng.uniform(0.5, 1.5, size=(n, m)) * np.geomspace(1e-4, 1e-2, m)
    return scores, costs


# --- hull and its interpolation ---------------------------------------------------------

def test_hull_of_known_points():
    pts = [(1, 0.2), (1, 0.1), (1.5, 0.1), (2, 0.6), (2, 0.4), (2.5, 0.3), (3, 0.7),
           (4, 0.9), (5, 0.85), (6, 0.9), (3, 0.75)]
    # (3, .75) lies on the chord (2, .6)-(4, .9): collinear, not a vertex; (6, .9) not above (4, .9)
    np.testing.assert_allclose(hull(pts), [[1, 0.2], [2, 0.6], [4, 0.9]])


def test_hull_drops_everything_after_the_peak_and_keeps_the_cheaper_of_equal_quality():
    np.testing.assert_allclose(hull([(1, 0.5), (2, 0.8), (3, 0.8), (4, 0.7)]), [[1, 0.5], [2, 0.8]])
    np.testing.assert_allclose(hull([(3, 0.9), (1, 0.9)]), [[1, 0.9]])
    assert hull([]).shape == (0, 2)


def test_hull_quality_at_interpolates_is_flat_right_and_unreachable_left():
    h = hull([(1, 0.5), (2, 0.8)])
    assert hull_quality_at(h, 1.5) == pytest.approx(0.65)
    assert hull_quality_at(h, 10.0) == pytest.approx(0.8)
    assert math.isnan(hull_quality_at(h, 0.99))
    np.testing.assert_allclose(hull_quality_at(h, [1.0, 2.0]), [0.5, 0.8])


# --- AIQ ----------------------------------------------------------------------------------

def test_aiq_by_hand():
    assert aiq([(1, 0.5), (2, 0.8), (3, 0.8)], 1, 3) == pytest.approx((0.65 + 0.8) / 2)


def test_aiq_unreachable_region_counts_zero():
    # nothing below cost 2: [1, 2] counts 0, [2, 3] averages 0.9
    assert aiq([(2, 0.8), (3, 1.0)], 1, 3) == pytest.approx(0.45)
    assert aiq([(5, 1.0)], 1, 3) == 0.0
    assert aiq([], 1, 3) == 0.0


def test_aiq_of_one_point_left_of_the_interval_is_its_quality():
    assert aiq([(0.5, 0.7)], 1, 3) == pytest.approx(0.7)


def test_aiq_degenerate_interval_is_the_hull_value():
    assert aiq([(1, 0.5), (2, 0.8)], 1.5, 1.5) == pytest.approx(0.65)
    assert aiq([(2, 0.8)], 1, 1) == 0.0
    with pytest.raises(ValueError):
        aiq([(1, 0.5)], 2, 1)


# --- APGR, CPT, cost to best single -----------------------------------------------------------

def test_apgr_with_clipping_by_hand():
    # weak (1, .4), strong (3, .8); hull (1, .2) -> (3, 1.0): H(c) = .2 + .4 (c - 1)
    # PGR = 0 until c = 1.5, linear to 1 at c = 2.5, then clipped at 1
    pts = [(1, 0.2), (3, 1.0)]
    assert pgr_curve(pts, 0.4, 0.8, 2.0) == pytest.approx(0.5)
    np.testing.assert_allclose(pgr_curve(pts, 0.4, 0.8, [0.5, 1.2, 2.9]), [0.0, 0.0, 1.0])
    assert apgr(pts, 0.4, 0.8, 1.0, 3.0) == pytest.approx((0 * 0.5 + 0.5 * 1 + 1 * 0.5) / 2)


def test_apgr_nan_without_a_gap_or_a_cost_interval():
    assert math.isnan(apgr([(1, 0.5)], 0.5, 0.5, 1, 2))
    assert math.isnan(apgr([(1, 0.5)], 0.4, 0.8, 2, 2))
    assert math.isnan(apgr([(1, 0.5)], 0.4, 0.8, 3, 2))
    assert np.isnan(pgr_curve([(1, 0.5)], 0.5, 0.5, [1.0, 2.0])).all()


def test_cpt_and_cost_to_best_single_on_raw_points():
    pts = [(1, 0.5), (1.5, 0.6), (2, 0.8), (3, 0.85), (4, 0.9), (5, 0.95)]
    # gap .5 -> .9: 50% needs .7, 80% needs .82
    assert cpt(pts, 0.5, 0.5, 0.9) == 2
    assert cpt(pts, 0.8, 0.5, 0.9) == 3
    assert cpt(pts, 0.0, 0.5, 0.9) == 1
    # raw points, not the hull: the hull reaches .7 at cost ~1.67, no point does before 2
    assert hull_quality_at(hull(pts), 1.9) > 0.7
    assert cost_to_best_single(pts, 0.9, 2.0) == 2.0
    assert cost_to_best_single(pts, 0.95, 5.0) == 1.0
    assert cpt(pts, 1.0, 0.5, 1.0) is None
    assert cost_to_best_single(pts, 0.99, 5.0) is None
    assert math.isnan(cost_to_best_single([(0, 0.9)], 0.9, 0.0))


# --- policy ---------------------------------------------------------------------------------

def test_policy_lambda_zero_picks_best_and_ties_go_cheaper_then_lower_index():
    q = np.array([[0.2, 0.9, 0.5], [0.7, 0.7, 0.1], [0.6, 0.6, 0.6]])
    c = np.array([[1.0, 5.0, 2.0], [3.0, 2.0, 1.0], [2.0, 1.0, 1.0]])
    np.testing.assert_array_equal(policy_choices(q, c, 0.0, 5.0), [1, 1, 1])


def test_policy_huge_lambda_picks_cheapest_ties_to_better_then_lower_index():
    q = np.array([[0.2, 0.9, 0.5], [0.7, 0.8, 0.8], [0.3, 0.3, 0.3]])
    c = np.array([[1.0, 5.0, 2.0], [3.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(policy_choices(q, c, np.inf, 5.0), [0, 1, 0])
    assert LAMBDAS[-1] == np.inf and LAMBDAS[0] == 0 and len(LAMBDAS) == 63
    np.testing.assert_array_equal(policy_choices(q[:1], c[:1], 1e6, 5.0), [0])


def test_policy_exact_utility_tie_goes_to_the_cheaper():
    q, c = np.array([[0.0, 0.5]]), np.array([[0.0, 1.0]])
    assert policy_choices(q, c, 0.5, 1.0)[0] == 0  # 0 - 0 == .5 - .5
    assert policy_choices(q, c, 0.49, 1.0)[0] == 1


def test_policy_rejects_bad_knobs():
    with pytest.raises(ValueError):
        policy_choices([[0.1]], [[1.0]], -1.0, 1.0)
    with pytest.raises(ValueError):
        policy_choices([[0.1]], [[1.0]], 1.0, 0.0)
    with pytest.raises(ValueError):
        curve_points([[np.nan]], [[1.0]], [[0.1]], [[1.0]])


# --- reference points, baselines, oracle -----------------------------------------------------

def test_reference_points_ties():
    scores = np.array([[0.5, 0.9, 0.9, 0.1], [0.5, 0.9, 0.9, 0.3]])
    costs = np.array([[1.0, 3.0, 2.0, 1.0], [1.0, 3.0, 2.0, 1.0]])
    ref = reference_points(scores, costs)
    assert (ref["weak"], ref["strong"]) == (0, 2)  # cheapest tie -> better; best tie -> cheaper
    assert (ref["c_min"], ref["c_max"], ref["q_strong"], ref["c_strong"]) == (1.0, 3.0, 0.9, 2.0)


def test_single_experts_alone_have_apgr_zero():
    scores, costs = random_instance(1)
    ref = reference_points(scores, costs)
    weak = [(ref["c_weak"], ref["q_weak"])]
    strong = [(ref["c_strong"], ref["q_strong"])]
    args = (ref["q_weak"], ref["q_strong"], ref["c_weak"], ref["c_strong"])
    assert ref["c_strong"] > ref["c_weak"] and ref["q_strong"] > ref["q_weak"]
    assert apgr(weak, *args) == 0.0  # PGR 0 everywhere
    assert apgr(strong, *args) == 0.0  # reachable only at c_strong itself
    best = baselines(scores, costs)["best_single"]
    assert best.apgr == 0.0 and best.cost_to_best_single == 1.0 and best.expert == ref["strong"]
    assert best.aiq == pytest.approx(
        ref["q_strong"] * (ref["c_max"] - ref["c_strong"]) / (ref["c_max"] - ref["c_min"]))


def test_oracle_apgr_is_one_only_when_it_matches_strong_at_weak_cost():
    # per-prompt cost differences let the oracle beat the strong expert at below weak's cost
    scores = np.array([[1.0, 1.0], [0.0, 1.0]])
    costs = np.array([[1.0, 3.0], [1.0, 0.5]])
    assert baselines(scores, costs)["oracle"].apgr == pytest.approx(1.0)
    # constant prices: the oracle's curve starts at the weak expert, so APGR < 1 (here the ramp)
    scores = np.array([[0.0, 1.0], [0.0, 1.0]])
    costs = np.array([[1.0, 3.0], [1.0, 3.0]])
    oracle = baselines(scores, costs)["oracle"]
    np.testing.assert_allclose(oracle.points, [[1, 0], [3, 1]])
    assert oracle.apgr == pytest.approx(0.5)


def test_oracle_on_random_instance_dominates_baselines_and_the_grid_sweep():
    scores, costs = random_instance(7, n=60, m=5)
    ref = reference_points(scores, costs)
    base = baselines(scores, costs)
    oracle = base["oracle"]
    assert 0.0 < oracle.apgr <= 1.0
    for other in (base["random"], base["best_single"]):
        assert oracle.aiq >= other.aiq and oracle.apgr >= other.apgr
    grid = curve_points(scores, costs, scores, costs)
    h = oracle.hull_points()
    assert (hull_quality_at(h, grid[:, 0]) >= grid[:, 1] - 1e-12).all()
    # first point: per prompt cheapest; last point: per prompt the cheapest best
    rows = np.arange(len(scores))
    first = policy_choices(scores, costs, np.inf, 1.0)
    last = policy_choices(scores, costs, 0.0, 1.0)
    np.testing.assert_allclose(oracle.points[0], [costs[rows, first].mean(), scores[rows, first].mean()])
    np.testing.assert_allclose(oracle.points[-1], [costs[rows, last].mean(), scores[rows, last].mean()])
    assert oracle.points[-1][1] >= ref["q_strong"]
    assert oracle.cost_to_best_single is not None and oracle.cost_to_best_single < 1.0


def test_oracle_takes_a_vertex_the_grid_steps_over():
    # expert 1 wins only for lam in (0.98, 1): between grid values 10**-0.1 and 1
    scores, costs = np.array([[0.0, 0.5, 0.99]]), np.array([[0.0, 1.0, 2.0]])
    grid = curve_points(scores, costs, scores, costs)
    assert [1.0, 0.5] not in grid.tolist()
    assert [1.0, 0.5] in oracle_points(scores, costs).tolist()
    # a router that lands on that vertex would beat a grid-only oracle, not this one
    router = evaluate_router("r", scores, costs, [[0.0, 0.5, 0.6]], costs)
    assert [1.0, 0.5] in router.points
    assert aiq(grid, 0.0, 2.0) < router.aiq == pytest.approx(baselines(scores, costs)["oracle"].aiq)


def test_random_baseline_lies_on_the_segment_uniform_to_best_single():
    scores, costs = random_instance(3)
    ref = reference_points(scores, costs)
    uniform = np.array([costs.mean(), scores.mean()])
    best = np.array([ref["c_strong"], ref["q_strong"]])
    pts = np.array(baselines(scores, costs)["random"].points)
    assert len(pts) == 21
    d = best - uniform
    cross = (pts[:, 0] - uniform[0]) * d[1] - (pts[:, 1] - uniform[1]) * d[0]
    np.testing.assert_allclose(cross, 0.0, atol=1e-15)
    ends = sorted([uniform.tolist(), best.tolist()])  # points are sorted by cost
    np.testing.assert_allclose(pts[[0, -1]], ends)


def test_evaluate_router_report_and_to_dict():
    scores, costs = random_instance(5)
    rng = np.random.default_rng(0)
    report = evaluate_router("noisy", scores, costs, scores + rng.normal(0, 0.3, scores.shape), costs)
    d = report.to_dict()
    assert set(d) == {"name", "aiq", "apgr", "cpt50", "cpt80", "cost_to_best_single", "points"}
    assert d["name"] == "noisy" and 0 <= d["aiq"] <= 1 and len(d["points"]) >= 2
    assert set(baselines(scores, costs)["best_single"].to_dict()) == set(d) | {"expert"}
    # one expert: no gap, no interval: NaN becomes None, and the JSON is strict
    one = evaluate_router("one", scores[:, :1], costs[:, :1], scores[:, :1], costs[:, :1]).to_dict()
    assert one["apgr"] is None and one["cpt50"] == pytest.approx(costs[:, 0].mean())
    json.dumps(one, allow_nan=False)


# --- hypothesis properties -------------------------------------------------------------------

point_lists = st.lists(st.tuples(st.floats(0.01, 10), st.floats(0, 1)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(point_lists, st.tuples(st.floats(0.01, 10), st.floats(0, 1)),
       st.floats(0.0, 5.0), st.floats(0.01, 10))
def test_adding_a_point_never_lowers_aiq(pts, extra, c_min, width):
    before = aiq(pts, c_min, c_min + width)
    assert aiq(pts + [extra], c_min, c_min + width) >= before - 1e-12


@settings(max_examples=150, deadline=None)
@given(point_lists)
def test_hull_is_increasing_and_concave(pts):
    h = hull(pts)
    assert len(h) >= 1
    assert (np.diff(h[:, 0]) > 0).all() and (np.diff(h[:, 1]) > 0).all()
    slopes = np.diff(h[:, 1]) / np.diff(h[:, 0])
    assert (np.diff(slopes) <= 1e-9 * (1 + np.abs(slopes[1:]))).all()
    grid = np.linspace(h[0, 0], h[-1, 0] + 1, 50)
    assert (np.diff(hull_quality_at(h, grid)) >= -1e-12).all()
    # every point is on or under the hull where the hull is reachable
    p = np.array(pts)
    assert (hull_quality_at(h, p[:, 0]) >= p[:, 1] - 1e-9).all()


@st.composite
def routed_instances(draw):
    n, m = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    grid = st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])
    scores = draw(hnp.arrays(float, (n, m), elements=st.one_of(grid, st.floats(0, 1))))
    costs = draw(hnp.arrays(float, (n, m), elements=st.sampled_from([0.0, 1e-4, 1e-3, 2e-3, 1e-2])
                            | st.floats(0, 1e-2)))
    q_hat = draw(hnp.arrays(float, (n, m), elements=st.floats(-1, 2)))
    c_hat = draw(hnp.arrays(float, (n, m), elements=st.floats(0, 1e-2)))
    return scores, costs, q_hat, c_hat


@settings(max_examples=100, deadline=None)
@given(routed_instances())
def test_oracle_aiq_and_apgr_bound_any_router(inst):
    scores, costs, q_hat, c_hat = inst
    ref = reference_points(scores, costs)
    oracle = baselines(scores, costs)["oracle"]
    for q, c in ((q_hat, c_hat), (scores, costs), (q_hat, costs), (scores, c_hat)):
        router = evaluate_router("r", scores, costs, q, c, ref=ref)
        assert oracle.aiq >= router.aiq - 1e-9
        if not math.isnan(router.apgr):
            assert oracle.apgr >= router.apgr - 1e-9


# --- plot and import weight ---------------------------------------------------------------------

def test_plot_curves_writes_a_png(tmp_path):
    scores, costs = random_instance(2)
    reports = list(baselines(scores, costs).values())
    reports.append(evaluate_router("noisy", scores, costs, scores * 0.5 + 0.25, costs))
    out = plot_curves(reports, single_expert_points(scores, costs, ["a", "b", "c", "d"]),
                      tmp_path / "curves.png", title="test split")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_expert_names_on_the_plot_do_not_overlap():
    # Three experts at almost the same cost and quality: their names are spread apart.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from router_models.metrics import _spread_labels

    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    dots = [("mistralai/mixtral-8x7b-chat", 0.50, 0.700), ("zero-one-ai/Yi-34B-Chat", 0.51, 0.705),
            ("gpt-3.5-turbo-1106", 0.52, 0.698), ("far-away", 0.1, 0.1)]
    labels = [ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4)) for n, x, y in dots]
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert boxes[0].overlaps(boxes[1])          # as first placed
    _spread_labels(fig, labels)
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert labels[3].get_position() == (4, 4)    # a name with room keeps its place


def test_plot_curves_with_a_free_expert(tmp_path):
    scores, costs = random_instance(4)
    costs[:, 0] = 0.0
    out = plot_curves(list(baselines(scores, costs).values()), single_expert_points(scores, costs),
                      tmp_path / "free.png")
    assert out.stat().st_size > 0


def test_import_is_light():
    code = ("import sys, router_models.metrics; "
            "print(sorted(m for m in ('matplotlib', 'fastapi', 'httpx', 'redis') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_curve_report_is_frozen():
    r = CurveReport("x", [[1.0, 0.5]], 0.5, 0.0, None, None, None)
    with pytest.raises(AttributeError):
        r.aiq = 1.0  # type: ignore[misc]
