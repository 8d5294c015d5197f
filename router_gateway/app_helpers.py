"""Small request helpers shared by the OpenAI and admin routes."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from router_gateway.errors import InvalidRequest, PayloadTooLarge

M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], body: Any, what: str = "") -> M:
    """``body`` (parsed JSON) as ``model``, or the 400 naming the first bad field."""
    from router_gateway.protocol import invalid_from_validation

    if not isinstance(body, dict):
        raise InvalidRequest(f"request body must be a JSON object{what}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


def header(request: Request, name: bytes) -> str | None:
    """The value of the request header ``name`` (lower case), or None: a look at the raw
    ASGI headers, without building Starlette's ``Headers`` (or raising its ``KeyError``
    for a header that is not there, the usual case on the proxy routes)."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON, refusing bodies over ``limit`` bytes before reading them whole.
    A body the server read whole before the handler ran (``Request._body``, which
    ``FastPath.answer`` sets and ``Request.body()`` caches) is taken as it is, without
    the async generator of ``Request.stream()``."""
    raw = getattr(request, "_body", None)
    if raw is not None:
        if len(raw) > limit:
            raise PayloadTooLarge(f"request body is {len(raw)} bytes; the limit is {limit}")
    else:
        raw = await _read_body(request, limit)
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = header(request, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequest("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
