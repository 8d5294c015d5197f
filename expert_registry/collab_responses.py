"""OpenAI's Responses API on the collaboration worker, over its chat decoding.

``POST /v1/responses`` turns ``instructions`` (a system message), the conversation of
``previous_response_id`` and ``input`` (a string, or message items with text parts) into
chat messages, decodes them exactly as ``/v1/chat/completions`` does, and answers a
response object; with ``stream: true``, the API's typed events (``event:`` lines, numbered
by ``sequence_number``, no ``[DONE]``). As with vLLM, an answer cut by
``max_output_tokens`` has status ``incomplete`` and still ends in ``response.completed``.

Responses not sent with ``store: false`` are kept in memory, the newest ``STORE_MAX``
(the oldest is forgotten first), so that ``previous_response_id``, ``GET``, ``DELETE``
and ``GET .../input_items`` find them; the gateway sends every request about an id to the
worker that made it. A worker's restart forgets them all. Only text is served: tools,
files and images are refused with a 400 naming the item.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

STORE_MAX = 1000
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesBody(BaseModel):
    """The Responses fields the worker reads; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = Field(default=None, min_length=1)
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False
    store: bool = True


class _Stored:
    __slots__ = ("response", "history", "items")

    def __init__(self, response: dict, history: list[dict], items: list[dict]):
        self.response, self.history, self.items = response, history, items


class ResponseStore:
    """The newest ``limit`` stored responses, by id (thread-safe)."""

    def __init__(self, limit: int = STORE_MAX):
        self.limit = limit
        self._found: OrderedDict[str, _Stored] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, rid: str, stored: _Stored) -> None:
        with self._lock:
            self._found[rid] = stored
            while len(self._found) > self.limit:
                self._found.popitem(last=False)

    def get(self, rid: str) -> _Stored | None:
        with self._lock:
            return self._found.get(rid)

    def pop(self, rid: str) -> _Stored | None:
        with self._lock:
            return self._found.pop(rid, None)


def _input_messages(body: ResponsesBody) -> tuple[list[dict], list[dict]]:
    """``input`` as chat messages, and as the input items ``input_items`` lists."""
    from expert_registry.collab_worker import RequestError

    raw = [{"type": "message", "role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if not raw:
        raise RequestError(400, "input must not be empty", "input")
    messages, items = [], []
    for i, item in enumerate(raw):
        role = _ROLES.get(item.get("role"))
        if item.get("type", "message") != "message" or role is None:
            raise RequestError(400, f"input[{i}]: only message items with role user, assistant, system or "
                                    f"developer are supported by this worker (got type {item.get('type')!r})",
                               "input")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in _TEXT_PARTS
                                                and isinstance(p.get("text"), str) for p in content):
            text = "".join(p["text"] for p in content)
        else:
            raise RequestError(400, f"input[{i}]: only text content (a string, or input_text parts) is "
                                    "supported by this worker", "input")
        messages.append({"role": role, "content": text})
        kind = "output_text" if role == "assistant" else "input_text"
        items.append({"type": "message", "id": f"msg_{uuid.uuid4().hex[:24]}", "role": item["role"],
                      "status": "completed", "content": [{"type": kind, "text": text}]})
    return messages, items


def _usage(run) -> dict:
    return {"input_tokens": len(run.prompt), "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": run.generated, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": len(run.prompt) + run.generated}


class _Answer:
    """One response being made: its fixed fields, and the object at each stage."""

    def __init__(self, body: ResponsesBody, model: str, run):
        self.body, self.model, self.run = body, model, run
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None) -> dict:
        return {"type": "message", "id": self.msg_id, "role": "assistant",
                "status": "in_progress" if text is None else "completed",
                "content": [] if text is None else [self.part(text)]}

    def response(self, done: bool) -> dict:
        b = self.body
        status = "in_progress" if not done else "incomplete" if self.run.finish_reason == "length" else "completed"
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.model,
                "status": status, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": {},
                "output": [self.item(self.run.detok.text)] if done else [], "parallel_tool_calls": False,
                "previous_response_id": b.previous_response_id, "store": b.store, "temperature": b.temperature,
                "top_p": b.top_p, "text": {"format": {"type": "text"}}, "tool_choice": "none", "tools": [],
                "truncation": "disabled", "usage": _usage(self.run) if done else None,
                "switchyard": {"mode": self.run.engine.spec.mode, "experts": self.run.expert_counts()}
                if done else None}


def install(app, engine) -> None:
    """Add ``/v1/responses`` and its stored-response routes to the worker's app."""
    from fastapi.responses import JSONResponse, StreamingResponse

    from expert_registry.collab_worker import (
        ChatRequest,
        RequestError,
        _DecodeFailed,
        _error,
        _prepare,
        _Run,
        invalid,
        json_object,
    )

    store = ResponseStore()

    def not_found(rid: str, param: str = "response_id", code: str | None = None):
        return _error(404, f"Response with id '{rid}' not found.", param, code)

    def remember(answer: _Answer, history: list[dict], items: list[dict], response: dict) -> None:
        if answer.body.store:
            said = {"role": "assistant", "content": answer.run.detok.text}
            store.keep(answer.id, _Stored(response, [*history, said], items))

    @app.post("/v1/responses")
    async def responses(request: Request):
        raw, refused = await json_object(request)
        if refused is not None:
            return refused
        try:
            body = ResponsesBody.model_validate(raw)
            before: list[dict] = []
            if body.previous_response_id is not None:
                prev = store.get(body.previous_response_id)
                if prev is None:
                    return not_found(body.previous_response_id, "previous_response_id", "previous_response_not_found")
                before = prev.history
            said, items = _input_messages(body)
            system = [{"role": "system", "content": body.instructions}] if body.instructions else []
            chat = ChatRequest(model=body.model, messages=[*system, *before, *said], stream=body.stream,
                               max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p)
            prompt, params, stops = await asyncio.to_thread(_prepare, engine, chat)
        except ValidationError as exc:
            return invalid(exc)
        except RequestError as exc:
            param = "input" if exc.param == "messages" else exc.param
            return _error(exc.status, exc.message, param, exc.code, exc.error_type)
        answer = _Answer(body, engine.spec.name, _Run(engine, prompt, params, stops))
        history = [*before, *said]
        if body.stream:
            return StreamingResponse(_events(answer, request, lambda r: remember(answer, history, items, r)),
                                     media_type="text/event-stream")
        try:
            await answer.run.finish()
        except _DecodeFailed as exc:
            return _error(500, f"decoding failed: {exc}", error_type="internal_error")
        response = answer.response(done=True)
        remember(answer, history, items, response)
        return JSONResponse(response, headers={"x-switchyard-collab-experts": answer.run.experts_header()})

    @app.get("/v1/responses/{rid}")
    async def retrieve(rid: str, stream: bool = False):
        found = store.get(rid)
        if found is None:
            return not_found(rid)
        if stream:
            return _error(400, "only background responses can be streamed again, and this worker makes none",
                          "stream")
        return JSONResponse(found.response)

    @app.delete("/v1/responses/{rid}")
    async def delete(rid: str):
        if store.pop(rid) is None:
            return not_found(rid)
        return JSONResponse({"id": rid, "object": "response", "deleted": True})

    @app.post("/v1/responses/{rid}/cancel")
    async def cancel(rid: str):
        if store.get(rid) is None:
            return not_found(rid)
        return _error(400, "Cannot cancel a synchronous response.", "response_id")

    @app.get("/v1/responses/{rid}/input_items")
    async def input_items(rid: str, limit: int = 20, order: str = "desc", after: str | None = None):
        found = store.get(rid)
        if found is None:
            return not_found(rid)
        if not 1 <= limit <= 100 or order not in ("asc", "desc"):
            return _error(400, "limit must be 1..100 and order 'asc' or 'desc'", "limit" if order in ("asc", "desc")
                          else "order")
        data = found.items if order == "asc" else found.items[::-1]
        if after is not None:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1:] if after in ids else []
        page = data[:limit]
        return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                             "last_id": page[-1]["id"] if page else None, "has_more": len(data) > limit})


async def _events(answer: _Answer, request, remember):
    """The typed events of one streamed response; it is stored before its last event."""
    numbers = itertools.count()

    def event(kind: str, **data) -> bytes:
        payload = {"type": kind, **data, "sequence_number": next(numbers)}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    at = {"item_id": answer.msg_id, "output_index": 0, "content_index": 0}
    start = answer.response(done=False)
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    yield event("response.output_item.added", output_index=0, item=answer.item(None))
    yield event("response.content_part.added", **at, part=answer.part(""))
    async for piece in answer.run.pieces():
        if piece is None:
            break
        if isinstance(piece, Exception):
            yield event("error", code="decode_failed", message=f"decoding failed: {piece}", param=None)
            return
        if await request.is_disconnected():
            return
        yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
    text = answer.run.detok.text
    yield event("response.output_text.done", **at, text=text, logprobs=[])
    yield event("response.content_part.done", **at, part=answer.part(text))
    yield event("response.output_item.done", output_index=0, item=answer.item(text))
    final = answer.response(done=True)
    remember(final)
    yield event("response.completed", response=final)
