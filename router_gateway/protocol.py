"""Wire models for the OpenAI-compatible endpoints.

Lenient on purpose (``extra="allow"``): fields the gateway does not know (tools,
response_format, logprobs, seed, vendor extensions...) are kept and forwarded to the
upstream untouched. The gateway forwards the client's own JSON object (with only
``model`` replaced); these models exist to reject what is malformed with a clear 400.
"""

from __future__ import annotations

import math
from types import NoneType
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from router_gateway.errors import InvalidRequest


# The model name; an empty one is refused by parse_model (its message), the schema says so.
ModelName = Annotated[StrictStr, Field(json_schema_extra={"minLength": 1})]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class ChatMessage(_Lenient):
    role: StrictStr
    content: StrictStr | list[Any] | None = None


class _SamplingFields(_Lenient):
    model: ModelName
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: StrictInt | None = Field(default=None, ge=1, le=128)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class EmbeddingRequest(_Lenient):
    model: ModelName
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]] = Field(
        description="Text, texts, or token ids to embed")
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: StrictInt | None = Field(default=None, ge=1)
    stream: Literal[False] | None = Field(default=None, description="Embeddings are not streamed")


class ResponsesRequest(_Lenient):
    """``POST /v1/responses`` (OpenAI's Responses API): what the gateway reads of it.
    ``input`` items (messages, tool calls and their outputs...) are forwarded as they are."""
    model: ModelName
    input: StrictStr | list[Any] = Field(description="Text, or a list of input items")
    instructions: StrictStr | None = None
    stream: StrictBool | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    previous_response_id: Annotated[StrictStr, Field(min_length=1)] | None = Field(
        default=None, description="Continue from a stored response; it is sent to the expert that made it")
    store: StrictBool | None = None


def validate_body(model_cls: type[BaseModel], body: Any) -> None:
    """Check a decoded JSON body; a pydantic error becomes one clear ``InvalidRequest``.
    The common shapes of the two OpenAI bodies are accepted by :func:`plainly_valid`
    without building a model (pydantic's object costs several microseconds per request);
    anything else, and every error message, comes from pydantic."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    if plainly_valid(model_cls, body):
        return
    try:
        model_cls.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _int_in(lo: int, hi: float = math.inf) -> Callable[[Any], bool]:
    return _optional(lambda v: type(v) is int and lo <= v <= hi)


def _number_in(lo: float, hi: float) -> Callable[[Any], bool]:
    return _optional(lambda v: type(v) in (int, float) and lo <= v <= hi)   # NaN fails both


def _message(m: Any) -> bool:
    return type(m) is dict and type(m.get("role")) is str and type(m.get("content")) in (str, list, NoneType)


def _prompt(p: Any) -> bool:
    if type(p) is str:
        return True
    return type(p) is list and (all(type(x) is str for x in p) or all(type(x) is int for x in p))


_SAMPLING: dict[str, Callable[[Any], bool]] = {
    "model": lambda v: type(v) is str,
    "stream": _optional(lambda v: type(v) is bool),
    "stream_options": _optional(lambda v: type(v) is dict
                                and type(v.get("include_usage")) in (bool, NoneType)),
    "max_tokens": _int_in(1), "temperature": _number_in(0.0, 2.0), "top_p": _number_in(0.0, 1.0),
    "n": _int_in(1, 128),
}
#: model -> (required fields, checks of the fields it declares); a subset of what pydantic
#: accepts, never more (``tests/router_gateway/test_protocol.py`` checks that with hypothesis).
_PLAIN: dict[type, tuple[tuple[str, ...], dict[str, Callable[[Any], bool]]]] = {
    ChatCompletionRequest: (("model", "messages"), {
        **_SAMPLING, "max_completion_tokens": _int_in(1),
        "messages": lambda v: type(v) is list and len(v) > 0 and all(_message(m) for m in v)}),
    CompletionRequest: (("model", "prompt"), {**_SAMPLING, "prompt": _prompt}),
}


def plainly_valid(model_cls: type[BaseModel], body: dict) -> bool:
    """True when ``body`` is surely valid for ``model_cls`` (one of the two request
    models): its required fields are there and every declared field it has is of a plain
    accepted type. False means "ask pydantic", not "invalid"."""
    plain = _PLAIN.get(model_cls)
    if plain is None:
        return False
    required, checks = plain
    for name in required:
        if name not in body:
            return False
    for name, value in body.items():
        check = checks.get(name)
        if check is not None and not check(value):
            return False
    return True


def invalid_from_validation(exc: ValidationError) -> InvalidRequest:
    return invalid_from_errors(exc.errors(include_url=False))


def invalid_from_errors(errors: list[dict], skip: tuple[str, ...] = ()) -> InvalidRequest:
    """One 400 naming the first problem (``skip``: leading loc parts such as FastAPI's "body")."""
    if not errors:
        return InvalidRequest("invalid request")
    first = errors[0]
    parts = list(first.get("loc", ()))
    while parts and parts[0] in skip:
        parts.pop(0)
    loc = ".".join(str(p) for p in parts)
    more = len(errors) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    where = f"'{loc}': " if loc else ""
    return InvalidRequest(f"{where}{first['msg']}{suffix}", param=loc or None)
