"""The cost-aware policy: hand-made cases with known choices, and hypothesis properties
(monotone cost and quality in lambda; calibration that meets its target and is tight)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_models.policy import CostAwarePolicy, calibrate

# Three experts, one prompt: "big" is best and dearest, "mid", "small" is cheapest.
Q = np.array([[0.9, 0.8, 0.5]])
C = np.array([[3.0, 2.0, 1.0]])
SCALE = 3.0


def choice(policy: CostAwarePolicy, q=Q, c=C, scale=SCALE) -> int:
    chosen = policy.choose(q, c, scale)
    ranked = policy.rank(q, c, scale)
    assert (chosen == ranked[:, 0]).all()  # both paths agree
    return int(chosen[0])


# ---- willingness to pay ---------------------------------------------------------------

def test_lambda_zero_buys_the_best_quality():
    assert choice(CostAwarePolicy()) == 0


def test_large_lambda_buys_the_cheapest():
    assert choice(CostAwarePolicy(lam=1e3)) == 2


def test_float_noise_does_not_break_a_tie_toward_the_dearer_expert():
    # lam = 0.9: u = (0, 0.8 - 0.6, 0.5 - 0.3): a tie of mid and small that float
    # arithmetic puts 1e-16 apart; the cheaper wins in choose() and in rank() alike
    policy = CostAwarePolicy(lam=0.9)
    assert choice(policy) == 2
    assert CostAwarePolicy(lam=0.9, max_cost=10.0).rank(Q, C, SCALE)[0].tolist() == [2, 1, 0]


def test_lambda_in_between_trades_quality_for_cost():
    # u = q - lam * c / 3: lam = 0.2 -> (.70, .667, .433); lam = 0.45 -> (.45, .50, .35)
    assert choice(CostAwarePolicy(lam=0.2)) == 0
    assert choice(CostAwarePolicy(lam=0.45)) == 1
    assert choice(CostAwarePolicy(lam=1.2)) == 2


def test_rank_orders_by_utility_and_breaks_ties_to_the_cheaper():
    q = np.array([[0.5, 0.5, 0.5], [0.9, 0.8, 0.5]])
    c = np.array([[3.0, 1.0, 2.0], [3.0, 2.0, 1.0]])
    ranked = CostAwarePolicy().rank(q, c, 3.0)
    np.testing.assert_array_equal(ranked, [[1, 2, 0], [0, 1, 2]])


# ---- threshold ---------------------------------------------------------------------------

@pytest.mark.parametrize("bar, expected", [
    (0.4, 2),    # everyone clears: the cheapest
    (0.5, 2),    # the bar is inclusive
    (0.6, 1),    # the cheapest that clears
    (0.85, 0),
    (0.95, 0),   # nobody clears: the best quality
])
def test_threshold_picks_the_cheapest_over_the_bar(bar, expected):
    assert choice(CostAwarePolicy("threshold", min_quality=bar)) == expected


def test_threshold_with_nobody_over_the_bar_ranks_by_quality():
    q = np.array([[0.2, 0.6, 0.4]])
    ranked = CostAwarePolicy("threshold", min_quality=0.7).rank(q, C, SCALE)
    np.testing.assert_array_equal(ranked, [[1, 2, 0]])


# ---- max_cost ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, cap, expected", [
    (CostAwarePolicy(), 2.5, 1),                                    # big excluded
    (CostAwarePolicy(), 2.0, 1),                                    # the cap is inclusive
    (CostAwarePolicy(), 1.5, 2),
    (CostAwarePolicy(), 0.5, 2),                                    # none under: cheapest
    (CostAwarePolicy("threshold", min_quality=0.85), 2.5, 1),       # bar cleared only by big
    (CostAwarePolicy(lam=1e3), 2.5, 2),
])
def test_max_cost_excludes_dearer_experts(policy, cap, expected):
    assert choice(policy.with_knobs(max_cost=cap)) == expected


def test_max_cost_with_nothing_under_the_cap_ranks_by_cheapness():
    ranked = CostAwarePolicy(max_cost=0.1).rank(Q, C, SCALE)
    np.testing.assert_array_equal(ranked, [[2, 1, 0]])


def test_max_cost_is_per_prompt():
    q = np.array([[0.9, 0.1], [0.9, 0.1]])
    c = np.array([[1.0, 0.5], [5.0, 0.5]])   # expert 0 is cheap on prompt 0 only
    np.testing.assert_array_equal(CostAwarePolicy(max_cost=2.0).choose(q, c, 3.0), [0, 1])


# ---- allowed mask --------------------------------------------------------------------------

def test_rank_with_allowed_mask_puts_disallowed_last_as_minus_one():
    q = np.array([[0.9, 0.8, 0.5], [0.9, 0.8, 0.5], [0.9, 0.8, 0.5]])
    c = np.repeat(C, 3, axis=0)
    allowed = np.array([[False, True, True], [True, False, False], [False, False, False]])
    ranked = CostAwarePolicy().rank(q, c, SCALE, allowed=allowed)
    np.testing.assert_array_equal(ranked, [[1, 2, -1], [0, -1, -1], [-1, -1, -1]])


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), m=st.integers(1, 5))
def test_rank_never_returns_a_disallowed_expert(data, n, m):
    q = np.array(data.draw(st.lists(st.lists(st.integers(0, 10), min_size=m, max_size=m),
                                    min_size=n, max_size=n))) / 10
    c = np.array(data.draw(st.lists(st.lists(st.integers(1, 10), min_size=m, max_size=m),
                                    min_size=n, max_size=n))) / 1000
    allowed = np.array(data.draw(st.lists(st.lists(st.booleans(), min_size=m, max_size=m),
                                          min_size=n, max_size=n)))
    policy = data.draw(st.sampled_from([CostAwarePolicy(lam=0.3), CostAwarePolicy(max_cost=0.005),
                                        CostAwarePolicy("threshold", min_quality=0.5)]))
    ranked = policy.rank(q, c, 0.01, allowed=allowed)
    for i in range(n):
        cols = np.flatnonzero(allowed[i])
        k = len(cols)
        assert (ranked[i, k:] == -1).all()
        # the allowed experts in the order they have when they are the only ones
        alone = policy.rank(q[i:i + 1, cols], c[i:i + 1, cols], 0.01)[0] if k else []
        assert ranked[i, :k].tolist() == [int(cols[j]) for j in alone]


# ---- knobs and validation ---------------------------------------------------------------------

def test_with_knobs_switches_forms():
    base = CostAwarePolicy(lam=0.5, max_cost=1.0)
    thr = base.with_knobs(min_quality=0.7)
    assert (thr.mode, thr.min_quality, thr.max_cost) == ("threshold", 0.7, 1.0)
    back = thr.with_knobs(lam=0.2)
    assert (back.mode, back.lam, back.max_cost) == ("wtp", 0.2, 1.0)
    assert base.with_knobs() == base
    assert base.with_knobs(max_cost=3) == CostAwarePolicy(lam=0.5, max_cost=3.0)
    assert base == CostAwarePolicy(lam=0.5, max_cost=1.0)   # frozen: knobs make new policies
    with pytest.raises(AttributeError):
        base.lam = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "greedy"}, "mode must be"),
    ({"lam": -0.1}, "lambda must be >= 0"),
    ({"lam": math.nan}, "lambda must be >= 0"),
    ({"mode": "threshold"}, "needs min_quality"),
    ({"max_cost": -1.0}, "max_cost must be >= 0"),
    ({"max_cost": math.nan}, "max_cost must be >= 0"),
])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CostAwarePolicy(**kwargs)


def test_invalid_knobs_raise():
    with pytest.raises(ValueError, match="lambda"):
        CostAwarePolicy().with_knobs(lam=-1)
    with pytest.raises(ValueError, match="max_cost"):
        CostAwarePolicy().with_knobs(max_cost=-1)


def test_calibrate_invalid_target():
    with pytest.raises(ValueError, match="target must be"):
        calibrate(Q, C, SCALE, target="latency", value=1.0)  # type: ignore[arg-type]


# ---- properties ------------------------------------------------------------------------------------
#
# Qualities on a grid of 1/100 and costs on a grid of 1e-6 USD keep the cases away from
# float ties at 1e-12 (which the policy breaks on purpose) and from cost gaps so small
# that no lambda under 1e6 tells them apart.

@st.composite
def instances(draw, min_m=2):
    n = draw(st.integers(1, 12))
    m = draw(st.integers(min_m, 5))
    q = np.array(draw(st.lists(st.lists(st.integers(0, 100), min_size=m, max_size=m),
                               min_size=n, max_size=n)), dtype=float) / 100
    c = np.array(draw(st.lists(st.lists(st.integers(1, 1000), min_size=m, max_size=m),
                               min_size=n, max_size=n)), dtype=float) * 1e-6
    return q, c, float(c.mean(axis=0).max())


def mean_cost(policy, q, c, scale):
    ch = policy.choose(q, c, scale)
    # the gateway ranks (with fallbacks) rather than chooses: both must agree
    np.testing.assert_array_equal(policy.rank(q, c, scale)[:, 0], ch)
    return float(c[np.arange(len(c)), ch].mean())


def mean_quality(policy, q, c, scale):
    ch = policy.choose(q, c, scale)
    return float(q[np.arange(len(q)), ch].mean())


LAMS = st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=8)


@settings(max_examples=80, deadline=None)
@given(inst=instances(), lams=LAMS, cap=st.none() | st.floats(1e-6, 1e-3))
def test_cost_and_quality_fall_as_lambda_grows(inst, lams, cap):
    q, c, scale = inst
    lams = sorted(lams)
    policies = [CostAwarePolicy(lam=lam, max_cost=cap) for lam in lams]
    costs = [mean_cost(p, q, c, scale) for p in policies]
    quals = [mean_quality(p, q, c, scale) for p in policies]
    assert all(b <= a + 1e-15 for a, b in zip(costs, costs[1:])), (lams, costs)
    assert all(b <= a + 1e-12 for a, b in zip(quals, quals[1:])), (lams, quals)


@settings(max_examples=60, deadline=None)
@given(inst=instances(), bars=st.lists(st.integers(0, 101), min_size=2, max_size=8))
def test_cost_and_quality_rise_with_the_bar(inst, bars):
    q, c, scale = inst
    policies = [CostAwarePolicy("threshold", min_quality=b / 100) for b in sorted(bars)]
    costs = [mean_cost(p, q, c, scale) for p in policies]
    quals = [mean_quality(p, q, c, scale) for p in policies]
    assert all(b >= a - 1e-15 for a, b in zip(costs, costs[1:])), costs
    assert all(b >= a - 1e-12 for a, b in zip(quals, quals[1:])), quals


def spend_range(q, c):
    """(cheapest achievable, best-quality) mean spend."""
    return float(c.min(axis=1).mean()), mean_cost(CostAwarePolicy(), q, c, 1.0)


@settings(max_examples=80, deadline=None)
@given(inst=instances(), u=st.floats(0, 1))
def test_calibrate_spend_meets_the_target_tightly(inst, u):
    q, c, scale = inst
    lo, hi = spend_range(q, c)
    value = lo + u * max(hi - lo, 0.0)
    policy = calibrate(q, c, scale, target="spend", value=value)
    assert policy.mode == "wtp"
    assert mean_cost(policy, q, c, scale) <= value * (1 + 1e-12)
    if policy.lam > 0:
        assert mean_cost(CostAwarePolicy(lam=policy.lam * (1 - 1e-6)), q, c, scale) > value
    else:
        assert hi <= value * (1 + 1e-12)


@settings(max_examples=80, deadline=None)
@given(inst=instances(), u=st.floats(0, 1))
def test_calibrate_spend_in_threshold_form(inst, u):
    q, c, scale = inst
    lo, hi = spend_range(q, c)
    value = lo + u * max(hi - lo, 0.0)
    policy = calibrate(q, c, scale, target="spend", value=value, mode="threshold")
    assert policy.mode == "threshold"
    assert mean_cost(policy, q, c, scale) <= value * (1 + 1e-12)
    if policy.min_quality <= q.max():
        raised = CostAwarePolicy("threshold", min_quality=policy.min_quality + 1e-9)
        assert mean_cost(raised, q, c, scale) > value
    else:   # even the best quality everywhere is within budget
        assert hi <= value * (1 + 1e-12)


@st.composite
def strong_is_dearest(draw):
    """Instances where expert 0 is the strongest on average and the dearest on every row:
    then its share of calls falls monotonically as lambda rises (or the bar falls)."""
    q, c, scale = draw(instances())
    c[:, 0] = c.max(axis=1) + 1e-5
    q[:, 0] = np.maximum(q[:, 0], q.max(axis=1))     # never worse than any other expert
    q[0, 0] = 1.0
    q[0, 1:] = np.minimum(q[0, 1:], 0.99)
    return q, c, float(c.mean(axis=0).max())


def share(policy, q, c, scale):
    return float((policy.choose(q, c, scale) == 0).mean())


@settings(max_examples=80, deadline=None)
@given(inst=strong_is_dearest(), value=st.floats(0, 1), mode=st.sampled_from(["wtp", "threshold"]))
def test_calibrate_strong_share(inst, value, mode):
    q, c, scale = inst
    policy = calibrate(q, c, scale, target="strong_share", value=value, mode=mode)
    assert policy.mode == mode
    got = share(policy, q, c, scale)
    assert got <= value
    if mode == "wtp" and policy.lam > 0:
        assert share(CostAwarePolicy(lam=policy.lam * (1 - 1e-6)), q, c, scale) > value
    elif mode == "threshold" and policy.min_quality <= q.max():
        raised = CostAwarePolicy("threshold", min_quality=policy.min_quality + 1e-9)
        assert share(raised, q, c, scale) > value
    else:
        assert share(CostAwarePolicy(), q, c, scale) <= value   # no knob needed


def test_calibrate_strong_defaults_to_the_best_mean_quality():
    q = np.array([[0.9, 0.2], [0.8, 0.3], [0.1, 0.9], [0.95, 0.1]])
    c = np.array([[2.0, 1.0]] * 4)
    policy = calibrate(q, c, 2.0, target="strong_share", value=0.5)
    assert share(policy, q, c, 2.0) == 0.5
    explicit = calibrate(q, c, 2.0, target="strong_share", value=0.5, strong=0)
    assert explicit == policy


def test_calibrate_known_case():
    # two prompts, two experts: mean spend 3.0 at lam=0, 2.0 from lam=0.15, 1.0 from lam=0.6
    q = np.array([[0.9, 0.5], [0.9, 0.8]])
    c = np.array([[3.0, 1.0], [3.0, 1.0]])
    policy = calibrate(q, c, 3.0, target="spend", value=2.0)
    # prompt 1 switches at lam = 0.1 / (2/3) = 0.15, prompt 0 at 0.6
    assert policy.lam == pytest.approx(0.15, rel=1e-9)
    assert mean_cost(policy, q, c, 3.0) == 2.0
    assert calibrate(q, c, 3.0, target="spend", value=5.0).lam == 0.0
