"""What ``/openapi.json`` (and ``/docs``) says about each route: its JSON request body and
the errors it can answer.

The routes read and validate their bodies themselves (``read_json``, then pydantic), so
that every mistake is an OpenAI-shaped 400 rather than FastAPI's 422; FastAPI therefore
sees no body parameter and would document none. A route names its body model with
:func:`json_body` (``openapi_extra=``) and the statuses it can answer besides its success
with :func:`errors` (``responses=``); :func:`install` puts the body models into
``components/schemas`` and drops the 422 answers FastAPI documents for path parameters,
which the gateway never sends. ``tests/router_gateway/test_fuzz_api.py`` checks every
answer it provokes against these lists.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong, for a person to read")
    type: str = Field(description="The error's kind: invalid_request_error, authentication_error, "
                      "permission_error, not_found_error, rate_limit_error, service_unavailable, ...")
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str | None = Field(description="A stable code for programs: model_not_found, invalid_api_key, "
                             "store_unavailable, ...")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer of the gateway: OpenAI's error object."""

    error: ErrorDetail


WHY = {
    400: "The request is wrong: not JSON, a missing field, a wrong type or value",
    401: "No API key, or one that is invalid or revoked",
    402: "The API key's budget for the period is spent",
    403: "The API key may not do this: an admin route with a client key, or a model the key may not call",
    404: "No such record, or no such model (the message lists what exists)",
    409: "A record of that name already exists",
    413: "The body is larger than SWITCHYARD_MAX_BODY_BYTES",
    429: "Over the API key's requests or tokens per minute, or the expert is rate limited (see Retry-After)",
    502: "The expert could not be reached, or answered a 5xx or something that is not its API",
    503: "No expert can answer now (down or cooling down), the gateway is out of connections, or the "
         "registry store (Redis) cannot serve the request",
    504: "The expert did not answer in time",
    "4XX": "The expert's own 4xx answer, passed through unchanged",
}

# The statuses of the route families (besides their success).
ADMIN = (401, 403, 503)
BODY = (400, 413)
PROXY = (*BODY, 401, 402, 403, 404, 429, 502, 503, 504, "4XX")

_bodies: dict[str, type[BaseModel]] = {}


def json_body(*models: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose body is a JSON object of one of ``models``."""
    for model in models:
        _bodies[model.__name__] = model
    refs = [{"$ref": REF.format(model=m.__name__)} for m in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def errors(*statuses: int | str, **success: str) -> dict[int | str, dict[str, Any]]:
    """``responses`` for a route that can answer ``statuses`` (keys of :data:`WHY`) as
    OpenAI-shaped errors; ``success`` adds further successes by status, e.g.
    ``errors(400, created="...")`` documents a 201 besides the route's 200."""
    out: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": WHY[status]} for status in statuses}
    for name, description in success.items():
        out[{"ok": 200, "created": 201}[name]] = {"description": description}
    return out


def install(app: FastAPI) -> None:
    """Serve the schema with the body models of :func:`json_body` and without 422s."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = plain()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        if _bodies:
            _, defs = models_json_schema([(m, "validation") for m in _bodies.values()], ref_template=REF)
            components.update(defs.get("$defs", {}))
        for item in schema["paths"].values():
            for op in item.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
