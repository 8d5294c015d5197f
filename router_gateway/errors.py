"""The gateway's one exception tree, and its OpenAI-shaped rendering.

    GatewayError                      (500, never raised for client input)
    ├── InvalidRequest                400  bad JSON, wrong types, bad model string
    ├── AuthError                     401  missing / invalid key
    ├── PermissionDenied              403  a client key on an admin endpoint, a model the key may not use
    ├── ModelNotFound                 404  unknown expert, router or group
    ├── NotFound                      404  unknown route or record
    ├── Conflict                      409  expert already exists
    ├── PayloadTooLarge               413  body over the configured limit
    ├── RateLimited                   429  over a key's requests or tokens per minute (Retry-After)
    ├── BudgetExceeded                402  a key's budget for the period is spent
    ├── ExpertUnavailable             503  the expert is known to be down, or in cooldown (Retry-After)
    ├── StoreUnavailable              503  Redis is unreachable and the answer needs it
    ├── GatewayOverloaded             503  the gateway could not open a connection (out of descriptors; Retry-After)
    ├── UpstreamError                 502  connect error / 5xx / garbage from the upstream
    └── UpstreamTimeout               504  the upstream did not answer in time

Every error becomes ``{"error": {"message", "type", "param", "code"}}`` with its status.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthError(GatewayError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "permission_error"


class ModelNotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    status_code = 404
    error_type = "not_found_error"


class ResponseNotFound(GatewayError):
    """A Responses API id this gateway does not know (for this caller)."""
    status_code = 404
    error_type = "invalid_request_error"
    code = "response_not_found"


class Conflict(GatewayError):
    status_code = 409
    error_type = "conflict_error"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class BudgetExceeded(GatewayError):
    status_code = 402
    error_type = "insufficient_quota"


class ExpertUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "expert_unavailable"


class StoreUnavailable(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "store_unavailable"


class GatewayOverloaded(GatewayError):
    status_code = 503
    error_type = "service_unavailable"
    code = "gateway_overloaded"


class UpstreamError(GatewayError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "timeout"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_json(err: GatewayError) -> bytes:
    return orjson.dumps(err.body())


def sse_error_frame(err: GatewayError) -> bytes:
    """An error in the middle of a stream: one data frame with the error, then [DONE]."""
    return b"data: " + error_json(err) + b"\n\ndata: [DONE]\n\n"


def responses_error_event(err: GatewayError, sequence_number: int) -> bytes:
    """An error in the middle of a Responses API stream: that API's own ``error`` event
    (its streams end without ``[DONE]``), numbered after the last event sent."""
    event = {"type": "error", "code": err.code or err.error_type, "message": err.message, "param": err.param,
             "sequence_number": sequence_number}
    return b"event: error\ndata: " + orjson.dumps(event) + b"\n\n"
