"""Server-sent events: split an upstream byte stream into events and re-frame them.

The upstream's chunks are forwarded unchanged except for the ``model`` field of each
JSON data payload, or of the ``response`` object it carries (the Responses API's
``response.created`` and ``response.completed`` events): clients see the name they asked
for, not the upstream's id. An event's other fields (``event:``, ``id:``) are kept.
Chunk boundaries from the network fall anywhere, so the splitter buffers until a
blank line (``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``) ends an event.
"""

from __future__ import annotations

import re
from typing import Any, AsyncIterator, Callable

import orjson

_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE_SPLIT = re.compile(rb"\r\n|\n|\r")
DONE = b"[DONE]"


class SSESplitter:
    """Incremental splitter: feed bytes, get complete events (without their terminator)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else bytes(chunk)
        if b"\r" not in buf:   # the usual framing: one C split instead of a search per event
            *events, self._buf = buf.split(b"\n\n")
            return events
        events, start = [], 0
        for m in _EVENT_END.finditer(buf):
            events.append(buf[start:m.start()])
            start = m.end()
        self._buf = buf[start:]
        return events

    def flush(self) -> bytes | None:
        """What is left when the stream ends (an event without its blank line), if anything."""
        rest, self._buf = self._buf, b""
        return rest if rest.strip() else None


def event_data(event: bytes) -> bytes | None:
    """The joined ``data:`` payload of one event, or None when it has no data line."""
    if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:   # one line
        value = event[5:]
        return value[1:] if value.startswith(b" ") else value
    parts = []
    for line in _LINE_SPLIT.split(event):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(parts) if parts else None


def encode_data(payload: bytes) -> bytes:
    """One SSE event carrying ``payload`` (which may span lines)."""
    if b"\n" not in payload:
        return b"data: " + payload + b"\n\n"
    return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"


def event_fields(event: bytes) -> bytes:
    """An event's lines other than ``data:`` (``event:``, ``id:``, ``retry:``, comments),
    each ending in a newline; empty for the usual one-line ``data:`` event."""
    if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:
        return b""
    return b"".join(line + b"\n" for line in _LINE_SPLIT.split(event) if line and not line.startswith(b"data:"))


def rewrite_event(event: bytes, model: str | None, inspect: Callable[[Any], bool] | None = None) -> bytes:
    """Re-frame one upstream event, replacing the JSON payload's ``model`` when given.
    ``inspect`` sees every decoded JSON payload and returns False to drop its event."""
    if event.startswith(b"data:") and b"\n" not in event and b"\r" not in event:   # the usual one-line event
        data = event[6:] if event.startswith(b"data: ") else event[5:]
        head = b""
    else:
        data = event_data(event)
        if data is None:
            return event + b"\n\n"  # comments / keep-alives pass through as they came
        head = event_fields(event)
    if (model is None and inspect is None) or data == DONE:
        return head + encode_data(data)
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return head + encode_data(data)
    if inspect is not None and not inspect(obj):
        return b""
    if model is not None and isinstance(obj, dict):
        if "model" in obj:
            obj["model"] = model
            data = orjson.dumps(obj)
        elif isinstance(obj.get("response"), dict) and "model" in obj["response"]:
            obj["response"]["model"] = model
            data = orjson.dumps(obj)
    return head + encode_data(data)


async def reframe(chunks: AsyncIterator[bytes], model: str | None,
                  inspect: Callable[[Any], bool] | None = None) -> AsyncIterator[bytes]:
    """Turn an upstream byte stream into re-framed SSE events, one ``bytes`` per network write
    (see ``rewrite_event`` for ``inspect``)."""
    splitter = SSESplitter()
    async for chunk in chunks:
        events = splitter.feed(chunk)
        if events:
            out = b"".join(rewrite_event(e, model, inspect) for e in events)
            if out:
                yield out
    tail = splitter.flush()
    if tail is not None:
        out = rewrite_event(tail, model, inspect)
        if out:
            yield out
