"""The model-string parser: properties over arbitrary input (hypothesis) and fixed cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, strategies as st

from router_gateway.errors import InvalidRequest
from router_gateway.model_string import KNOBS, ModelTarget, parse_model

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._\-/]{0,30}", fullmatch=True)
knob_values = {
    "lambda": st.floats(min_value=0, max_value=1e6, allow_nan=False),
    "max_cost": st.floats(min_value=0, max_value=1e3, allow_nan=False),
    "min_quality": st.floats(min_value=0, max_value=1, allow_nan=False),
    "k": st.integers(min_value=1, max_value=64),
}
knob_dicts = st.dictionaries(st.sampled_from(sorted(KNOBS)), st.none()).flatmap(
    lambda d: st.fixed_dictionaries({k: knob_values[k] for k in d}))


@given(st.text(max_size=60))
def test_any_string_parses_or_is_a_400(s: str):
    try:
        target = parse_model(s)
    except InvalidRequest as exc:
        assert exc.status_code == 400 and exc.param == "model"
        return
    assert isinstance(target, ModelTarget) and target.name


@given(names, knob_dicts)
def test_router_strings_round_trip(name: str, knobs: dict):
    query = "&".join(f"{k}={v!r}" for k, v in knobs.items())
    target = parse_model(f"router:{name}" + (f"?{query}" if query else ""))
    assert target.kind == "router" and target.name == name
    assert set(target.knobs) == set(knobs)
    for k, v in knobs.items():
        assert math.isclose(target.knobs[k], v)
    assert parse_model(str(target)) == target


@given(names)
def test_plain_names_are_experts(name: str):
    target = parse_model(name)
    if name == "auto":
        assert target.kind == "auto"
    else:
        assert target == ModelTarget("expert", name)


@pytest.mark.parametrize("s, kind, name, knobs", [
    ("auto", "auto", "auto", {}),
    ("auto?lambda=0.5", "auto", "auto", {"lambda": 0.5}),
    ("router:gnn?lambda=0.3", "router", "gnn", {"lambda": 0.3}),
    ("router:symbolic?k=3&max_cost=0.01", "router", "symbolic", {"k": 3, "max_cost": 0.01}),
    ("collab:math-team", "collab", "math-team", {}),
    ("meta-llama/Llama-3-8B", "expert", "meta-llama/Llama-3-8B", {}),
])
def test_known_forms(s, kind, name, knobs):
    t = parse_model(s)
    assert (t.kind, t.name, dict(t.knobs)) == (kind, name, knobs)


@pytest.mark.parametrize("s, needle", [
    ("router:", "needs a name"),
    ("router:gnn?lambda=abc", "must be float"),
    ("router:gnn?lambda=nan", "must be in"),
    ("router:gnn?min_quality=2", "must be in"),
    ("router:gnn?k=0", "must be in"),
    ("router:gnn?k=1.5", "must be int"),
    ("router:gnn?foo=1", "unknown knob"),
    ("router:gnn?k=1&k=2", "given twice"),
    ("router:gnn?lambda", "malformed"),
    ("collab:g?lambda=1", "apply to"),
    ("expert-a?lambda=1", "not to an expert"),
    (" auto", "spaces"),
    ("", "non-empty"),
])
def test_malformed_forms(s, needle):
    with pytest.raises(InvalidRequest, match=needle):
        parse_model(s)
