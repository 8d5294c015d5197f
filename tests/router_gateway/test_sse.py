"""SSE framing: events survive any chunking of the byte stream; only `model` changes."""

from __future__ import annotations

import asyncio
import json
import re

from hypothesis import given, strategies as st

from router_gateway.sse import SSESplitter, event_data, reframe, rewrite_event

json_objs = st.fixed_dictionaries({
    "id": st.text(max_size=8),
    "model": st.text(max_size=12),
    "choices": st.lists(st.fixed_dictionaries({"delta": st.fixed_dictionaries({"content": st.text(max_size=20)})}),
                        max_size=2),
})
terminators = st.sampled_from([b"\n\n", b"\r\n\r\n"])


def _stream(objs: list[dict], term: bytes) -> bytes:
    body = b"".join(b"data: " + json.dumps(o).encode() + term for o in objs)
    return body + b"data: [DONE]" + term


def _chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


async def _collect(chunks: list[bytes], model: str | None) -> bytes:
    async def gen():
        for c in chunks:
            yield c
    return b"".join([f async for f in reframe(gen(), model)])


def _decode(data: bytes) -> list:
    out = []
    for event in SSESplitter().feed(data):
        payload = event_data(event)
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


@given(st.lists(json_objs, max_size=6), terminators, st.lists(st.integers(min_value=0), max_size=12))
def test_any_chunking_gives_the_same_events(objs, term, cuts):
    data = _stream(objs, term)
    out = asyncio.run(_collect(_chunked(data, cuts), "client-name"))
    events = _decode(out)
    assert events[-1] == "[DONE]"
    assert len(events) == len(objs) + 1
    for got, sent in zip(events, objs):
        assert got["model"] == "client-name"
        assert {k: v for k, v in got.items() if k != "model"} == {k: v for k, v in sent.items() if k != "model"}


@given(st.lists(json_objs, max_size=4), st.lists(st.integers(min_value=0), max_size=6))
def test_without_rewrite_payloads_are_unchanged(objs, cuts):
    data = _stream(objs, b"\n\n")
    out = asyncio.run(_collect(_chunked(data, cuts), None))
    assert _decode(out) == [*objs, "[DONE]"]


def test_comments_and_multiline_data_pass_through():
    assert rewrite_event(b": keep-alive", "m") == b": keep-alive\n\n"
    assert rewrite_event(b"data: line1\ndata: line2", "m") == b"data: line1\ndata: line2\n\n"
    assert rewrite_event(b'data: {"model": "up"}', None) == b'data: {"model": "up"}\n\n'


@given(st.sampled_from(["response.created", "response.output_text.delta", "error"]), json_objs,
       st.lists(st.integers(min_value=0), max_size=8), st.booleans())
def test_typed_events_keep_their_names_and_the_model_inside_response_is_rewritten(kind, obj, cuts, nested):
    """Responses API events: ``event:`` before ``data:``, the model in ``response``."""
    payload = {"type": kind, "response": obj} if nested else obj
    data = f"event: {kind}\nid: 7\ndata: {json.dumps(payload)}\n\n".encode()
    for model in ("client-name", None):
        out = asyncio.run(_collect(_chunked(data, cuts), model))
        assert out.startswith(f"event: {kind}\nid: 7\ndata: ".encode()) and out.endswith(b"\n\n")
        got = event_data(out[:-2])
        seen = json.loads(got)
        inner = seen["response"] if nested else seen
        assert inner["model"] == (model or obj["model"])
        assert {k: v for k, v in inner.items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}


def test_an_unterminated_last_event_is_still_delivered():
    out = asyncio.run(_collect([b'data: {"model": "a", "x": 1}\n\ndata: {"model": "b"}'], "z"))
    assert _decode(out) == [{"model": "z", "x": 1}, {"model": "z"}]


def _reference_split(data: bytes) -> tuple[list[bytes], bytes]:
    """Events cut at the leftmost terminator each time, and what is left after the last."""
    events = []
    while (m := re.search(rb"\r\n\r\n|\n\n|\r\r", data)) is not None:
        events.append(data[:m.start()])
        data = data[m.end():]
    return events, data


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"data: x"]), max_size=40).map(b"".join),
       st.lists(st.integers(min_value=0), max_size=8))
def test_splitter_cuts_any_line_endings_in_any_chunking_like_the_reference(data, cuts):
    """The splitter's split on plain ``\\n\\n`` streams and its search on ones with
    carriage returns give the events of one leftmost-terminator search over the whole."""
    splitter = SSESplitter()
    events = [e for chunk in _chunked(data, cuts) for e in splitter.feed(chunk)]
    want, rest = _reference_split(data)
    assert events == want
    assert splitter.flush() == (rest if rest.strip() else None)
    assert all(event_data(e) == _reference_data(e) for e in events)


def _reference_data(event: bytes) -> bytes | None:
    parts = [line[5:][1:] if line[5:].startswith(b" ") else line[5:]
             for line in re.split(rb"\r\n|\n|\r", event) if line.startswith(b"data:")]
    return b"\n".join(parts) if parts else None
