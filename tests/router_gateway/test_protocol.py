"""``plainly_valid``: the hand-written accept path in front of pydantic must never accept
a body pydantic would reject (it may send anything unusual on to pydantic)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from router_gateway.errors import InvalidRequest
from router_gateway.protocol import ChatCompletionRequest, CompletionRequest, plainly_valid, validate_body

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True),
                    st.text(max_size=5))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
roles = st.one_of(st.sampled_from(["user", "system", "assistant"]), values)
messages = st.one_of(st.lists(st.fixed_dictionaries({}, optional={"role": roles, "content": values, "name": values}),
                              max_size=3), values)
FIELDS = {"model": st.one_of(st.text(max_size=8), values), "stream": values, "max_tokens": values,
          "temperature": values, "top_p": values, "n": values, "max_completion_tokens": values,
          "stream_options": st.one_of(st.fixed_dictionaries({}, optional={"include_usage": values}), values),
          "seed": values, "tools": values}
chat_bodies = st.fixed_dictionaries({}, optional={**FIELDS, "messages": messages})
completion_bodies = st.fixed_dictionaries({}, optional={**FIELDS, "prompt": st.one_of(
    st.text(max_size=5), st.lists(st.text(max_size=3), max_size=3), st.lists(st.integers(-2, 9), max_size=3),
    st.lists(st.lists(st.integers(0, 9), max_size=2), max_size=2), values)})


def pydantic_accepts(model, body: dict) -> bool:
    try:
        model.model_validate(body)
        return True
    except ValidationError:
        return False


@settings(max_examples=600, deadline=None)
@given(chat_bodies)
def test_plain_chat_bodies_are_ones_pydantic_accepts(body: dict):
    if plainly_valid(ChatCompletionRequest, body):
        assert pydantic_accepts(ChatCompletionRequest, body), body


@settings(max_examples=600, deadline=None)
@given(completion_bodies)
def test_plain_completion_bodies_are_ones_pydantic_accepts(body: dict):
    if plainly_valid(CompletionRequest, body):
        assert pydantic_accepts(CompletionRequest, body), body


def test_everyday_bodies_take_the_plain_path_and_odd_ones_go_to_pydantic():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "temperature": 0.7,
            "stream": True, "stream_options": {"include_usage": True}, "tools": [{"type": "function"}]}
    assert plainly_valid(ChatCompletionRequest, chat)
    assert plainly_valid(CompletionRequest, {"model": "m", "prompt": ["a", "b"], "top_p": 1})
    assert plainly_valid(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]})
    # valid, but not plain: pydantic decides (and accepts)
    odd = {**chat, "temperature": "0.5"}
    assert not plainly_valid(ChatCompletionRequest, odd)
    validate_body(ChatCompletionRequest, odd)
    # invalid: not plain, and pydantic words the error
    for bad, param in [({**chat, "max_tokens": True}, "max_tokens"), ({**chat, "messages": []}, "messages"),
                       ({**chat, "n": 129}, "n"), ({"model": "m"}, "messages")]:
        assert not plainly_valid(ChatCompletionRequest, bad)
        with pytest.raises(InvalidRequest) as err:
            validate_body(ChatCompletionRequest, bad)
        assert err.value.param == param
