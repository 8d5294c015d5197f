"""A load-test upstream: a minimal, fast OpenAI-shaped HTTP server. NOT a model.

It answers every chat or text completion with the same short canned text, at once, so
that a benchmark measures what sits *in front of* it (the Switchyard gateway, a LiteLLM
proxy) and not a model. ``benchmarks/gateway_overhead.py`` starts it; it is also handy
for poking at the gateway by hand::

    python benchmarks/loadtest_upstream.py --port 9001                 # raw socket server
    python benchmarks/loadtest_upstream.py --port 9001 --server asgi   # same answers on uvicorn

Endpoints (HTTP/1.1, keep-alive):

- ``POST /v1/chat/completions`` -- a ``chat.completion`` object with ``usage``; with
  ``"stream": true`` a few ``chat.completion.chunk`` SSE frames then ``data: [DONE]``,
  plus a final usage-only chunk when ``stream_options.include_usage`` is true.
- ``POST /v1/completions`` -- the same for ``text_completion`` objects.
- ``POST /v1/responses`` -- a Responses API ``response`` (``usage`` in ``input_tokens``
  and ``output_tokens``; ``max_output_tokens`` shortens it); with ``"stream": true`` its
  typed events (``event:`` lines), ``response.completed`` last. Nothing is stored.
- ``GET /v1/models`` -- one model, ``loadtest`` (any requested ``model`` is echoed back).
- ``GET /health`` -- ``{"status": "ok"}``.

``max_tokens`` (or ``max_completion_tokens``) shortens the answer and sets
``finish_reason`` to ``"length"``; token counts are words, prompt tokens are estimated
as characters / 4. Malformed requests get an OpenAI error object with status 400.

Two server flavours answer through the same code (:func:`respond`), so their bodies are
the same but for ids and timestamps:

- ``--server raw`` (default): an ``asyncio.Protocol`` on uvloop with the ``httptools``
  parser (the pieces uvicorn itself is built from) and no ASGI layer in between. On one
  core it serves several times the requests per second of the ``asgi`` flavour (numbers
  in ``benchmarks/README.md``), so it stays far from being the bottleneck and shows
  what a purpose-built server gets out of a core.
- ``--server asgi``: the *same-stack upstream*, a minimal raw ASGI app (no framework) on
  uvicorn with uvloop and httptools, one process, no access log -- the HTTP stack the
  gateway itself runs on. A gateway does at least twice the HTTP work of the upstream
  behind it (it serves a request and makes one), so against an upstream of its own
  class about half the upstream's throughput is the practical ceiling; against the raw
  flavour the ratio mixes that overhead with the gap between the two HTTP stacks.
  ``gateway_overhead.py`` measures against both.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import httptools
import orjson

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "loadtest"
#: The canned answer, one "token" per word.
ANSWER_TOKENS = ("This ", "is ", "a ", "canned ", "answer ", "from ", "the ", "load-test ", "upstream.")
_ids = itertools.count(1)


class BadRequest(Exception):
    """The client sent something we cannot answer (becomes a 400 error object)."""


def _prompt_tokens(body: dict) -> int:
    """Rough prompt size: characters / 4 over message contents (or the prompt)."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(part.get("text", "")) for part in content if isinstance(part, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        chars += len(prompt)
    elif isinstance(prompt, list):
        chars += sum(len(p) for p in prompt if isinstance(p, str))
    return max(1, chars // 4)


def _answer(body: dict) -> tuple[tuple[str, ...], str]:
    """The answer tokens and finish reason, honouring ``max_tokens``."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise BadRequest("max_tokens must be a positive integer")
    if limit is not None and limit < len(ANSWER_TOKENS):
        return ANSWER_TOKENS[:limit], "length"
    return ANSWER_TOKENS, "stop"


def _usage(body: dict, n_completion: int) -> dict:
    n_prompt = _prompt_tokens(body)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def _parse(raw: bytes, needs: str) -> dict:
    try:
        body = orjson.loads(raw or b"null")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    if needs == "messages" and not isinstance(body.get("messages"), list):
        raise BadRequest("'messages' must be a list")
    if needs == "prompt" and not isinstance(body.get("prompt"), (str, list)):
        raise BadRequest("'prompt' must be a string or a list")
    if needs == "input" and not isinstance(body.get("input"), (str, list)):
        raise BadRequest("'input' must be a string or a list")
    return body


def chat_completion(body: dict) -> dict:
    """A complete ``chat.completion`` object for a request body."""
    tokens, finish = _answer(body)
    return {
        "id": f"chatcmpl-loadtest-{next(_ids)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model") or DEFAULT_MODEL,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(tokens)},
            "logprobs": None,
            "finish_reason": finish,
        }],
        "usage": _usage(body, len(tokens)),
    }


def text_completion(body: dict) -> dict:
    """A complete ``text_completion`` object for a request body."""
    tokens, finish = _answer(body)
    return {
        "id": f"cmpl-loadtest-{next(_ids)}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or DEFAULT_MODEL,
        "choices": [{"index": 0, "text": "".join(tokens), "logprobs": None, "finish_reason": finish}],
        "usage": _usage(body, len(tokens)),
    }


def stream_events(body: dict, chat: bool) -> list[bytes]:
    """The SSE events (each ``data: ...\\n\\n``) of a streamed answer, ``[DONE]`` last."""
    tokens, finish = _answer(body)
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    base = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-loadtest-{next(_ids)}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": body.get("model") or DEFAULT_MODEL,
    }
    if include_usage:
        base["usage"] = None  # OpenAI sends usage: null on every chunk but the last
    choices: list[dict] = []
    if chat:
        choices.append({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        choices += [{"index": 0, "delta": {"content": t}, "logprobs": None, "finish_reason": None} for t in tokens]
        choices.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish})
    else:
        choices += [{"index": 0, "text": t, "logprobs": None, "finish_reason": None} for t in tokens]
        choices[-1]["finish_reason"] = finish
    frames = [{**base, "choices": [choice]} for choice in choices]
    if include_usage:
        frames.append({**base, "choices": [], "usage": _usage(body, len(tokens))})
    return [b"data: " + orjson.dumps(f) + b"\n\n" for f in frames] + [b"data: [DONE]\n\n"]


def _response_tokens(body: dict) -> tuple[str, ...]:
    limit = body.get("max_output_tokens")
    return _answer({"max_tokens": limit} if limit is not None else {})[0]


def response_object(body: dict) -> dict:
    """A complete Responses API ``response`` for a request body (it stores nothing)."""
    tokens = _response_tokens(body)
    text = body.get("input")
    n_prompt = max(1, len(text) // 4) if isinstance(text, str) else _prompt_tokens({"messages": text or []})
    rid = f"resp_loadtest_{next(_ids)}"
    return {"id": rid, "object": "response", "created_at": int(time.time()), "status": "completed",
            "model": body.get("model") or DEFAULT_MODEL, "previous_response_id": body.get("previous_response_id"),
            "output": [{"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "".join(tokens), "annotations": []}]}],
            "usage": {"input_tokens": n_prompt, "output_tokens": len(tokens),
                      "total_tokens": n_prompt + len(tokens)}}


def response_events(body: dict) -> list[bytes]:
    """A streamed Responses API answer: typed events with ``event:`` lines, no ``[DONE]``."""
    done = response_object(body)
    start = {**done, "status": "in_progress", "output": [], "usage": None}
    item = done["output"][0]["id"]
    events = [("response.created", {"response": start}), ("response.in_progress", {"response": start})]
    events += [("response.output_text.delta", {"item_id": item, "output_index": 0, "content_index": 0, "delta": t})
               for t in _response_tokens(body)]
    events.append(("response.completed", {"response": done}))
    return [b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({**data, "type": kind, "sequence_number": n})
            + b"\n\n" for n, (kind, data) in enumerate(events)]


def error_body(message: str, status: int) -> bytes:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}})


_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed"}
_MODELS = orjson.dumps({"object": "list", "data": [
    {"id": DEFAULT_MODEL, "object": "model", "created": 0, "owned_by": "switchyard-loadtest"}]})
_HEALTH = orjson.dumps({"status": "ok"})
_ROUTES = {
    b"/v1/chat/completions": b"POST",
    b"/v1/completions": b"POST",
    b"/v1/responses": b"POST",
    b"/v1/models": b"GET",
    b"/health": b"GET",
}


def respond(method: bytes, path: bytes, raw_body: bytes) -> tuple[int, bytes | list[bytes]]:
    """The status and the answer to one request: a JSON body (``bytes``) or, for a
    streamed completion, its SSE events (``list``). Both server flavours answer through
    this, so they differ only in their HTTP stack."""
    allowed = _ROUTES.get(path)
    if allowed is None:
        return 404, error_body(f"no route {path.decode(errors='replace')}", 404)
    if method != allowed:
        return 405, error_body(f"use {allowed.decode()} on this path", 405)
    if path == b"/health":
        return 200, _HEALTH
    if path == b"/v1/models":
        return 200, _MODELS
    chat = path == b"/v1/chat/completions"
    try:
        if path == b"/v1/responses":
            body = _parse(raw_body, "input")
            return 200, response_events(body) if body.get("stream") else orjson.dumps(response_object(body))
        body = _parse(raw_body, "messages" if chat else "prompt")
        if body.get("stream"):
            return 200, stream_events(body, chat)
        return 200, orjson.dumps(chat_completion(body) if chat else text_completion(body))
    except BadRequest as exc:
        return 400, error_body(str(exc), 400)


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection, parsed by httptools, answered synchronously."""

    __slots__ = ("transport", "parser", "url", "body", "keep_alive")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.keep_alive = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(400, b"application/json", error_body("protocol upgrades are not supported", 400), close=True)
        except httptools.HttpParserError as exc:
            self._send(400, b"application/json", error_body(f"malformed HTTP request: {exc}", 400), close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        status, answer = respond(self.parser.get_method(), self.url.split(b"?", 1)[0], b"".join(self.body))
        if isinstance(answer, list):
            self._send_stream(answer)
        else:
            self._send(status, b"application/json", answer)

    def _send(self, status: int, content_type: bytes, payload: bytes, close: bool = False) -> None:
        if self.transport is None:
            return
        close = close or not self.keep_alive
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status, _REASONS.get(status, b"Error"), content_type, len(payload),
            b"connection: close\r\n" if close else b"")
        self.transport.write(head + payload)
        if close:
            self.transport.close()

    def _send_stream(self, events: list[bytes]) -> None:
        """SSE over chunked transfer encoding, one HTTP chunk per event."""
        if self.transport is None:
            return
        parts = [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                 b"transfer-encoding: chunked\r\n%s\r\n" % (b"" if self.keep_alive else b"connection: close\r\n")]
        parts += [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
        parts.append(b"0\r\n\r\n")
        self.transport.write(b"".join(parts))
        if not self.keep_alive:
            self.transport.close()


async def serve(host: str, port: int, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled; sets ``ready`` once the socket listens."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(UpstreamProtocol, host, port, backlog=2048, reuse_address=True)
    logger.info("load-test upstream listening on http://%s:%d/v1", host, port)
    if ready is not None:
        ready.set()
    async with server:
        await server.serve_forever()


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def asgi_app(scope: dict, receive: Receive, send: Send) -> None:
    """The same answers as :class:`UpstreamProtocol` as a raw ASGI app (no framework).

    A streamed answer goes out one ``http.response.body`` message per SSE event, as an
    ASGI server streaming real tokens would, which uvicorn sends as one HTTP chunk each:
    the same chunked body as the raw flavour's (uvicorn adds its ``date`` and ``server``
    headers, as it does to the gateway's answers)."""
    if scope["type"] != "http":  # served with lifespan="off"; nothing else is expected
        return
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    status, answer = respond(scope["method"].encode(), scope["path"].encode(), b"".join(chunks))
    if isinstance(answer, list):
        await send({"type": "http.response.start", "status": status, "headers": _SSE_HEADERS})
        for event in answer:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        headers = [*_JSON_HEADERS, (b"content-length", b"%d" % len(answer))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def serve_asgi(host: str, port: int, uvloop: bool = True) -> None:
    """:func:`asgi_app` on uvicorn, configured as ``switchyard serve`` runs the gateway
    (uvloop, httptools, no access log), in this one process, until interrupted."""
    import uvicorn

    logger.info("load-test upstream (uvicorn ASGI) listening on http://%s:%d/v1", host, port)
    uvicorn.run(asgi_app, host=host, port=port, loop="uvloop" if uvloop else "asyncio", http="httptools",
                lifespan="off", access_log=False, log_level="warning", backlog=2048)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fast OpenAI-shaped load-test upstream (canned answers, not a model).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--server", choices=("raw", "asgi"), default="raw",
                        help="raw: asyncio.Protocol + httptools (default); asgi: the same answers as a "
                             "raw ASGI app on uvicorn, the gateway's own HTTP stack")
    parser.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.server == "asgi":
        serve_asgi(args.host, args.port, uvloop=not args.no_uvloop)
        return
    run = asyncio.run
    if not args.no_uvloop:
        import uvloop

        run = uvloop.run
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
