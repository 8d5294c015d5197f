"""A real OpenAI-shaped HTTP server for gateway tests, whose behaviour each test picks.

Not a mock: it runs on loopback under uvicorn and the gateway talks real HTTP to it. It
stands in for an upstream only where the upstream's own behaviour is not under test
(echoing what it received, failing on purpose); tests of real model serving use vLLM.

``/v1/embeddings`` answers every model with small vectors (see ``embeddings``).
``/v1/responses`` answers like an OpenAI Responses API server that stores what it
answers, each server on its own (see ``responses``).
The behaviour is chosen by the ``served_model`` the gateway forwards:
  echo         answers and echoes the forwarded request body under "received"
  fail500      HTTP 500 with an OpenAI error body
  bad400       HTTP 400 with an OpenAI error body (passes through the gateway)
  slow         waits 5 s before answering (for timeouts)
  breakstream  streams two chunks (or two Responses API events) then drops the connection
  slowstream   streams a chunk every 0.5 s, without end (for killing the server midway)
  slowstart    streams like echo, but only after 0.5 s (for clients that leave first)
  slowanswer   answers like echo, but only after 0.5 s (for requests that overlap)
  nousage      answers like echo, but never reports usage (not even when a stream asks)
  garbage      HTTP 200 with a body that is not JSON
  busy         HTTP 429 with ``Retry-After: 2`` and an OpenAI error body
  short        answers like echo, but a 400 in vLLM's words ("maximum context length")
               when the messages or prompt take over 200 characters of JSON
  short-code   the same, with OpenAI's code ``context_length_exceeded`` instead
  skills-*     answers with a fixed list of skill keywords (``SKILL_ANSWERS``), as a
               model asked to label a query's skills would
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


SKILL_ANSWERS = {"skills-math": "Skills: arithmetic, addition, numbers",
                 "skills-poetry": "1. poetry\n2. rhyming verse", "skills-garbage": "-- 42 --\n???"}


def _completion(model: str, received: dict, chat: bool) -> dict:
    usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    if chat:
        content = SKILL_ANSWERS.get(model, "hello there")
        choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": "hello there", "finish_reason": "stop"}
        obj = "text_completion"
    return {"id": "cmpl-test", "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage, "received": received}


def _chunks(model: str, include_usage: bool, chat: bool) -> list[dict]:
    out = []
    for i, piece in enumerate(["hel", "lo ", "there"]):
        delta = {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
        choice = {"index": 0, "delta": delta, "finish_reason": None} if chat else \
            {"index": 0, "text": piece, "finish_reason": None}
        out.append({"id": "cmpl-test", "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": 1, "model": model, "choices": [choice]})
    out[-1]["choices"][0]["finish_reason"] = "stop"
    if include_usage:
        out.append({"id": "cmpl-test", "object": "chat.completion.chunk", "created": 1, "model": model,
                    "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
    return out


received: dict[str, int] = {}   # completions asked for, by served model


async def _serve(request: Request, chat: bool) -> Response:
    body = await request.json()
    model = body.get("model", "")
    received[model] = received.get(model, 0) + 1
    if model == "fail500":
        return JSONResponse({"error": {"message": "engine crashed", "type": "server_error"}}, status_code=500)
    if model == "bad400":
        return JSONResponse({"error": {"message": "max_tokens too large", "type": "BadRequestError",
                                       "param": "max_tokens", "code": 400}}, status_code=400)
    if model == "busy":
        return JSONResponse({"error": {"message": "too many requests", "type": "rate_limit_error"}},
                            status_code=429, headers={"retry-after": "2"})
    if model in ("short", "short-code") and len(json.dumps(body.get("messages") or body.get("prompt"))) > 200:
        said = len(json.dumps(body.get("messages") or body.get("prompt")))
        if model == "short":   # as vLLM words it
            err = {"message": f"This model's maximum context length is 64 tokens. However, your prompt contains "
                              f"{said} characters (more than 200 characters, which is the upper bound for 50 input "
                              "tokens). Please reduce the length of the input prompt.",
                   "type": "BadRequestError", "param": "input_text", "code": 400}
        else:                  # as OpenAI does
            err = {"message": "Your input exceeds the limit of this model.", "type": "invalid_request_error",
                   "param": "messages", "code": "context_length_exceeded"}
        return JSONResponse({"error": err}, status_code=400)
    if model == "slow":
        await asyncio.sleep(5)
    if (model == "slowstart" and body.get("stream")) or model == "slowanswer":
        await asyncio.sleep(0.5)
    if model == "garbage":
        return Response(b"<html>not json</html>", media_type="text/html")
    if not body.get("stream"):
        answer = {**_completion(model, body, chat), "received_request_id": request.headers.get("x-request-id")}
        if model == "nousage":
            del answer["usage"]
        return JSONResponse(answer)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and model != "nousage"
    chunks = _chunks(model, include_usage, chat)

    async def gen():
        _streams[0] += 1
        try:
            async for piece in _events(model, chunks):
                yield piece
        finally:
            _streams[0] -= 1

    return StreamingResponse(gen(), media_type="text/event-stream")


_streams = [0]   # streams being sent now (the server runs in a thread of the test process)


def open_streams() -> int:
    """How many streamed answers are being sent right now; one ends when it is done or
    the gateway hangs up."""
    return _streams[0]


async def _events(model: str, chunks: list[dict]):
    for i, c in enumerate(chunks):
        if model == "breakstream" and i == 2:
            raise RuntimeError("upstream dropped the connection on purpose")
        yield f"data: {json.dumps(c)}\n\n".encode()
        await asyncio.sleep(0.5 if model == "slowstream" else 0)
    while model == "slowstream":     # a long answer, for killing the server midway
        yield f"data: {json.dumps(chunks[1])}\n\n".encode()
        await asyncio.sleep(0.5)
    yield b"data: [DONE]\n\n"


async def chat(request: Request) -> Response:
    return await _serve(request, chat=True)


async def completions(request: Request) -> Response:
    return await _serve(request, chat=False)


async def embeddings(request: Request) -> Response:
    """One 3-number vector per input, [characters, index, 0.5]; ``fail500`` and ``bad400``
    fail as they do for completions."""
    body = await request.json()
    model = body.get("model", "")
    if model in ("fail500", "bad400"):
        return await _serve(request, chat=True)
    texts = body["input"] if isinstance(body.get("input"), list) else [body.get("input")]
    data = [{"object": "embedding", "index": i, "embedding": [float(len(str(t))), float(i), 0.5]}
            for i, t in enumerate(texts)]
    tokens = 2 * sum(len(str(t).split()) for t in texts)   # not what the gateway's estimate would say
    return JSONResponse({"object": "list", "data": data, "model": model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "received": body})


_stored: dict[tuple[int, str], dict] = {}   # (server port, response id) -> the response


def _server(request: Request) -> int:
    return request.scope["server"][1]


def _response(model: str, received: dict, request: Request, status: str = "completed") -> dict:
    """A response object; its text says which server made it and what it continued."""
    rid = f"resp_{_server(request)}_{len(_stored)}"
    prev = received.get("previous_response_id")
    text = f"server {_server(request)} answers" + (f" after {prev}" if prev else "")
    return {"id": rid, "object": "response", "created_at": int(time.time()), "model": model, "status": status,
            "output": [{"type": "message", "id": f"msg_{rid}", "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "previous_response_id": prev, "usage": {"input_tokens": 11, "output_tokens": 5, "total_tokens": 16},
            "received": received}


async def responses(request: Request) -> Response:
    """``POST /v1/responses``. ``previous_response_id`` must name a response this server
    stored (else 404, as vLLM and OpenAI answer); ``store: false`` keeps nothing.
    ``fail500`` fails; a stream sends typed events (``event:`` lines), usage in the last."""
    body = await request.json()
    model = body.get("model", "")
    if model == "fail500":
        return await _serve(request, chat=True)
    prev = body.get("previous_response_id")
    if prev is not None and (_server(request), prev) not in _stored:
        return JSONResponse({"error": {"message": f"Response with id '{prev}' not found.",
                                       "type": "invalid_request_error", "param": "response_id", "code": 404}},
                            status_code=404)
    answer = _response(model, body, request)
    if body.get("store") is not False:
        _stored[(_server(request), answer["id"])] = answer
    if not body.get("stream"):
        return JSONResponse(answer)
    return StreamingResponse(_typed_events(answer, break_at=2 if model == "breakstream" else None),
                             media_type="text/event-stream")


_held: dict[str, threading.Event] = {}   # response id -> what its streamed retrieve waits for


def hold_stream(rid: str) -> threading.Event:
    """Make a streamed retrieve of ``rid`` stop after its first two events until the test
    sets the returned event; unset after 5 s, the stream ends there (no
    ``response.completed``), as a client reading it whole would see."""
    _held[rid] = threading.Event()
    return _held[rid]


async def _typed_events(answer: dict, starting_after: int = -1, break_at: int | None = None):
    """A response's typed events (``event:`` lines), numbered from 0, those after
    ``starting_after``; the connection drops before event ``break_at`` when given."""
    start = {**answer, "status": "in_progress", "output": [], "usage": None}
    text = answer["output"][0]["content"][0]["text"]
    events = [("response.created", {"response": start}), ("response.in_progress", {"response": start})]
    events += [("response.output_text.delta", {"item_id": f"msg_{answer['id']}", "output_index": 0,
                                               "content_index": 0, "delta": piece})
               for piece in (text[:6], text[6:])]
    events.append(("response.completed", {"response": answer}))
    held = _held.get(answer["id"])
    for n, (kind, data) in enumerate(events):
        if n == break_at:
            raise RuntimeError("upstream dropped the connection on purpose")
        if n == 2 and held is not None and not await asyncio.to_thread(held.wait, 5):
            return
        if n > starting_after:
            yield f"event: {kind}\ndata: {json.dumps({**data, 'type': kind, 'sequence_number': n})}\n\n".encode()
        await asyncio.sleep(0)


def _stored_or_404(request: Request) -> dict | Response:
    rid = request.path_params["rid"]
    found = _stored.get((_server(request), rid))
    if found is None:
        return JSONResponse({"error": {"message": f"Response with id '{rid}' not found.",
                                       "type": "invalid_request_error", "param": "response_id", "code": 404}},
                            status_code=404)
    return found


async def stored_response(request: Request) -> Response:
    """GET (the response, its ``input_items``), DELETE and POST ``cancel`` of a stored response."""
    found = _stored_or_404(request)
    if isinstance(found, Response):
        return found
    rid = found["id"]
    if request.method == "DELETE":
        del _stored[(_server(request), rid)]
        return JSONResponse({"id": rid, "object": "response", "deleted": True})
    if request.url.path.endswith("/input_items"):
        return JSONResponse({"object": "list", "data": [{"type": "message", "id": "m1", "role": "user", "status": "completed",
                                                       "content": [{"type": "input_text", "text": "hi"}]}],
                             "first_id": "m1", "last_id": "m1", "has_more": False,
                             "query": str(request.url.query)})
    if request.url.path.endswith("/cancel"):
        return JSONResponse({**found, "status": "cancelled"})
    if request.query_params.get("stream") == "true":   # a background response's events, resumed
        after = int(request.query_params.get("starting_after", "-1"))
        return StreamingResponse(_typed_events(found, after), media_type="text/event-stream")
    return JSONResponse(found)


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model", "max_model_len": 2048}]})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                        Route("/v1/completions", completions, methods=["POST"]),
                        Route("/v1/embeddings", embeddings, methods=["POST"]),
                        Route("/v1/responses", responses, methods=["POST"]),
                        Route("/v1/responses/{rid}", stored_response, methods=["GET", "DELETE"]),
                        Route("/v1/responses/{rid}/cancel", stored_response, methods=["POST"]),
                        Route("/v1/responses/{rid}/input_items", stored_response, methods=["GET"]),
                        Route("/v1/models", models)])
