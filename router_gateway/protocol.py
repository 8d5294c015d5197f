"""Wire models for the OpenAI-compatible endpoints.

Lenient on purpose (``extra="allow"``): fields the gateway does not know (tools,
response_format, logprobs, seed, vendor extensions...) are kept and forwarded to the
upstream untouched. The gateway forwards the client's own JSON object (with only
``model`` replaced); these models exist to reject what is malformed with a clear 400.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from router_gateway.errors import InvalidRequest


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = None


class ChatMessage(_Lenient):
    role: StrictStr
    content: StrictStr | list[Any] | None = None


class _SamplingFields(_Lenient):
    model: StrictStr
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


def validate_body(model_cls: type[BaseModel], body: Any) -> BaseModel:
    """Validate a decoded JSON body; a pydantic error becomes one clear ``InvalidRequest``."""
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


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
