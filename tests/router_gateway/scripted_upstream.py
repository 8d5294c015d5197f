"""A real OpenAI-shaped HTTP server for gateway tests, whose behaviour each test picks.

Not a mock: it runs on loopback under uvicorn and the gateway talks real HTTP to it. It
stands in for an upstream only where the upstream's own behaviour is not under test
(echoing what it received, failing on purpose); tests of real model serving use vLLM.

``/v1/embeddings`` answers every model with small vectors (see ``embeddings``).
The behaviour is chosen by the ``served_model`` the gateway forwards:
  echo         answers and echoes the forwarded request body under "received"
  fail500      HTTP 500 with an OpenAI error body
  bad400       HTTP 400 with an OpenAI error body (passes through the gateway)
  slow         waits 5 s before answering (for timeouts)
  breakstream  streams two chunks then drops the connection
  slowstream   streams a chunk every 0.5 s, without end (for killing the server midway)
  slowstart    streams like echo, but only after 0.5 s (for clients that leave first)
  slowanswer   answers like echo, but only after 0.5 s (for requests that overlap)
  nousage      answers like echo, but never reports usage (not even when a stream asks)
  garbage      HTTP 200 with a body that is not JSON
  busy         HTTP 429 with ``Retry-After: 2`` and an OpenAI error body
  skills-*     answers with a fixed list of skill keywords (``SKILL_ANSWERS``), as a
               model asked to label a query's skills would
"""

from __future__ import annotations

import asyncio
import json
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


async def _serve(request: Request, chat: bool) -> Response:
    body = await request.json()
    model = body.get("model", "")
    if model == "fail500":
        return JSONResponse({"error": {"message": "engine crashed", "type": "server_error"}}, status_code=500)
    if model == "bad400":
        return JSONResponse({"error": {"message": "max_tokens too large", "type": "BadRequestError",
                                       "param": "max_tokens", "code": 400}}, status_code=400)
    if model == "busy":
        return JSONResponse({"error": {"message": "too many requests", "type": "rate_limit_error"}},
                            status_code=429, headers={"retry-after": "2"})
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


async def models(_: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "echo", "object": "model"}]})


app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                        Route("/v1/completions", completions, methods=["POST"]),
                        Route("/v1/embeddings", embeddings, methods=["POST"]),
                        Route("/v1/models", models)])
