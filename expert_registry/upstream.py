"""Clients that carry one request to an expert's upstream.

Two kinds, one interface (``send`` for a whole answer, ``open_stream`` for SSE):

- ``HTTPUpstream``: vLLM workers and any OpenAI-compatible server, through the
  process's one pooled ``HTTP1Client`` (``expert_registry/http1.py``, which says why
  not httpx or aiohttp). Bytes in, bytes out: nothing is decoded.
- ``LiteLLMUpstream``: provider model strings through ``litellm`` (imported lazily).

Failures the caller must map (the gateway maps them to 502/504/503):
``UpstreamUnreachable`` (connect error), ``UpstreamTimedOut``, ``UpstreamProtocolError``
(the upstream broke the connection or spoke garbage), ``UpstreamNotTried`` (this process
could not open a connection at all, out of file descriptors or ports: no fault of the
upstream's), ``UpstreamBusy`` (every connection to its origin that the client may open
stayed in use: the upstream is busy with this process's other requests, not failing).
A non-2xx answer is *not* an exception: it comes back as ``(status, body)`` so 4xx
errors reach the client as sent.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import orjson

from expert_registry.http1 import (LOCAL_ERRNOS, ConnectFailed, HTTP1Client, HTTPClientError, LocalResourcesExhausted,
                                   PoolExhausted, ReadTimeout)
from expert_registry.spec import ExpertSpec

log = logging.getLogger(__name__)

ENDPOINTS = ("chat/completions", "completions")


class UpstreamFailure(Exception):
    """The upstream gave no usable answer."""


class UpstreamUnreachable(UpstreamFailure):
    pass


class UpstreamTimedOut(UpstreamFailure):
    pass


class UpstreamProtocolError(UpstreamFailure):
    pass


class UpstreamNotTried(UpstreamFailure):
    """No connection could be opened on this side; the upstream may be fine."""


class UpstreamBusy(UpstreamFailure):
    """Every pooled connection to the upstream's origin stayed in use; it was not called."""


@dataclass
class UpstreamStream:
    """An open streamed answer: status, then bytes; ``aclose`` releases the connection."""

    status: int
    chunks: AsyncIterator[bytes]
    aclose: Callable[[], Awaitable[None]]
    retry_after: str | None = None
    content_type: str = "application/json"

    async def read_all(self) -> bytes:
        try:
            return b"".join([c async for c in self.chunks])
        finally:
            await self.aclose()


def _http_failure(exc: HTTPClientError, spec: ExpertSpec) -> UpstreamFailure:
    where = f"expert '{spec.name}' at {spec.base_url}"
    if isinstance(exc, LocalResourcesExhausted):
        return UpstreamNotTried(f"{where} was not tried: {exc}")
    if isinstance(exc, PoolExhausted):
        return UpstreamBusy(f"{where} was not tried: {exc}")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnreachable(f"{where} is unreachable ({exc})")
    if isinstance(exc, ReadTimeout):
        return UpstreamTimedOut(f"{where} did not answer in time")
    return UpstreamProtocolError(f"{where} broke the connection ({exc})")


def _socket_error(exc: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno among ``exc`` and its causes, if any."""
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, OSError) and node.errno is not None:
            return node
        node = node.__cause__ or node.__context__
    return None


def _no_base_url(spec: ExpertSpec) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"expert '{spec.name}' has no usable base URL ({spec.base_url!r}); "
                               "start its worker or set base_url")


class HTTPUpstream:
    """POSTs JSON to ``{base_url}/{endpoint}``. A plain answer must start within the
    client's read timeout; a stream is bounded per read, since it may last long."""

    def __init__(self, client: HTTP1Client):
        self.client = client

    @staticmethod
    def _headers(spec: ExpertSpec, request_id: str | None) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
        if spec.api_key:
            headers["authorization"] = f"Bearer {spec.api_key}"
        if request_id:
            headers["x-request-id"] = request_id
        return headers

    async def _post(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None,
                    timeout_s: float | None = None):
        return await self._send(spec, "POST", endpoint, orjson.dumps(body), request_id, timeout_s)

    async def _send(self, spec: ExpertSpec, method: str, path: str, payload: bytes, request_id: str | None,
                    timeout_s: float | None = None):
        try:
            return await self.client.request(method, f"{spec.base_url}/{path}", payload,
                                             self._headers(spec, request_id),
                                             read_timeout=-1.0 if timeout_s is None else timeout_s)
        except HTTPClientError as exc:
            raise _http_failure(exc, spec) from exc
        except ValueError as exc:   # no base URL (a worker never started), or not http(s)
            raise _no_base_url(spec) from exc

    async def send(self, spec: ExpertSpec, endpoint: str, body: dict,
                   request_id: str | None = None) -> tuple[int, bytes]:
        status, content, _ = await self.answer(spec, endpoint, body, request_id)
        return status, content

    async def answer(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None = None,
                     timeout_s: float | None = None) -> tuple[int, bytes, str | None]:
        """``send`` plus the upstream's Retry-After header (when it sent one); ``timeout_s``
        replaces the client's read timeout for this call. What ``_send`` does, inline: this
        runs once per proxied request, and each coroutine between the handler and the
        socket costs a little at every wait."""
        try:
            resp = await self.client.request("POST", f"{spec.base_url}/{endpoint}", orjson.dumps(body),
                                             self._headers(spec, request_id),
                                             read_timeout=-1.0 if timeout_s is None else timeout_s)
            return resp.status, await resp.read(), resp.headers.get("retry-after")
        except HTTPClientError as exc:
            raise _http_failure(exc, spec) from exc
        except ValueError as exc:
            raise _no_base_url(spec) from exc

    async def open(self, spec: ExpertSpec, method: str, path: str, request_id: str | None = None
                   ) -> UpstreamStream:
        """``method`` on ``{base_url}/{path}`` without a body (path may carry a query), its
        answer as a stream (``content_type`` says whether it is events). For the Responses
        API's retrieve (streamed too, ``?stream=true``), delete, cancel and input items."""
        return self._stream(spec, await self._send(spec, method, path, b"", request_id))

    async def open_stream(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None = None,
                          timeout_s: float | None = None) -> UpstreamStream:
        """``timeout_s`` bounds the wait for the answer to start and for each chunk after."""
        return self._stream(spec, await self._post(spec, endpoint, body, request_id, timeout_s))

    @staticmethod
    def _stream(spec: ExpertSpec, resp) -> UpstreamStream:
        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.iter_chunks():
                    yield chunk
            except HTTPClientError as exc:
                raise _http_failure(exc, spec) from exc

        async def aclose() -> None:
            resp.release()

        return UpstreamStream(resp.status, chunks(), aclose, resp.headers.get("retry-after"),
                              resp.headers.get("content-type", "application/json"))


class LiteLLMUpstream:
    """Calls ``litellm.acompletion`` / ``atext_completion`` / ``aembedding`` / ``aresponses``
    with the expert's provider string."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._litellm: Any = None

    def _lib(self) -> Any:
        if self._litellm is None:
            # Offline machines cannot fetch litellm's remote price map at import.
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            import litellm

            litellm.suppress_debug_info = True
            self._litellm = litellm
        return self._litellm

    def _call(self, spec: ExpertSpec, endpoint: str, body: dict, timeout_s: float | None = None):
        lib = self._lib()
        kwargs = dict(body)
        kwargs["model"] = spec.served_model
        if spec.base_url:
            kwargs["api_base"] = spec.base_url
        kwargs["api_key"] = spec.api_key or "none"
        kwargs["timeout"] = timeout_s if timeout_s is not None else kwargs.get("timeout", self.timeout_s)
        fn = {"chat/completions": lib.acompletion, "completions": lib.atext_completion,
              "embeddings": lib.aembedding, "responses": lib.aresponses}[endpoint]
        return fn(**kwargs)

    def _failure(self, exc: Exception, spec: ExpertSpec) -> UpstreamFailure | tuple[int, bytes]:
        lib = self._lib()
        where = f"expert '{spec.name}' ({spec.served_model})"
        if isinstance(exc, lib.Timeout):
            return UpstreamTimedOut(f"{where} did not answer in time")
        # litellm wraps a socket error four or five deep, and words a refused connection
        # as an InternalServerError with status 500: read the cause.
        cause = _socket_error(exc)
        if cause is not None and cause.errno in LOCAL_ERRNOS:
            return UpstreamNotTried(f"{where} was not tried: cannot open a connection here: {cause.strerror or cause}")
        if isinstance(exc, lib.APIConnectionError) or cause is not None:
            return UpstreamUnreachable(f"{where} is unreachable: {cause or exc}")
        status = getattr(exc, "status_code", None)
        if isinstance(status, int) and 400 <= status < 600:
            err = {"error": {"message": str(exc), "type": type(exc).__name__, "param": None, "code": None}}
            return status, orjson.dumps(err)
        return UpstreamProtocolError(f"{where} failed: {type(exc).__name__}: {exc}")

    async def send(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None = None,
                   timeout_s: float | None = None) -> tuple[int, bytes]:
        try:
            resp = await self._call(spec, endpoint, body, timeout_s)
        except Exception as exc:  # litellm raises provider-specific types; map them all
            mapped = self._failure(exc, spec)
            if isinstance(mapped, tuple):
                return mapped
            raise mapped from exc
        # warnings=False: litellm's Responses objects hold usage dicts where their own
        # schema says a model, and pydantic would warn on every answer
        return 200, orjson.dumps(resp.model_dump(mode="json", exclude_none=True, warnings=False))

    async def answer(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None = None,
                     timeout_s: float | None = None) -> tuple[int, bytes, str | None]:
        return (*await self.send(spec, endpoint, body, request_id, timeout_s), None)

    async def open_stream(self, spec: ExpertSpec, endpoint: str, body: dict, request_id: str | None = None,
                          timeout_s: float | None = None) -> UpstreamStream:
        try:
            stream = await self._call(spec, endpoint, body, timeout_s)
        except Exception as exc:  # see send()
            mapped = self._failure(exc, spec)
            if isinstance(mapped, tuple):
                status, payload = mapped
                return UpstreamStream(status, _once(payload), _noop)
            raise mapped from exc

        responses = endpoint == "responses"   # typed events (``event:`` lines), no [DONE]

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    obj = chunk.model_dump(mode="json", exclude_none=True, warnings=False)
                    kind = obj.get("type") if responses else None
                    head = b"event: " + kind.encode() + b"\n" if isinstance(kind, str) else b""
                    yield head + b"data: " + orjson.dumps(obj) + b"\n\n"
            except Exception as exc:  # see send()
                mapped = self._failure(exc, spec)
                raise (mapped if isinstance(mapped, UpstreamFailure)
                       else UpstreamProtocolError(f"expert '{spec.name}' failed mid-stream")) from exc
            if not responses:
                yield b"data: [DONE]\n\n"

        async def aclose() -> None:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

        return UpstreamStream(200, chunks(), aclose)


async def _once(payload: bytes) -> AsyncIterator[bytes]:
    yield payload


async def _noop() -> None:
    return None
