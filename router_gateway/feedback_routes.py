"""``POST /v1/feedback``: attach a score to a past request, by its ``x-request-id``.

Any key that may call the gateway may send feedback; ``switchyard logs export`` uses a
score only when it came from the key that made the request (or the admin key), so one
client cannot grade another's traffic. The request id is not looked up here (the
decision log is a capped stream, not an index): feedback for an id the log does not
hold is kept and counted as unmatched at export.
"""

from __future__ import annotations

import math
import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from router_gateway.app_helpers import read_json, validated
from router_gateway.decision_log import add_feedback
from router_gateway.errors import InvalidRequest, StoreUnavailable
from router_gateway.openapi import BODY, errors, json_body

router = APIRouter(tags=["feedback"])


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128, description="The x-request-id of the answer")
    score: float = Field(ge=0.0, le=1.0, strict=True, description="How good the answer was, 0 (wrong) to 1 (right)")
    comment: str | None = Field(default=None, max_length=2000)


@router.post("/v1/feedback", status_code=201, openapi_extra=json_body(Feedback), responses=errors(*BODY, 401, 503))
async def feedback(request: Request) -> Response:
    state = request.app.state
    _, who = await state.keys.caller(request)
    fb = validated(Feedback, await read_json(request, state.settings.max_body_bytes))
    if not math.isfinite(fb.score):
        raise InvalidRequest("score must be a finite number from 0 to 1", param="score")
    if state.settings.decision_log_max_entries <= 0:
        raise InvalidRequest("the decision log is off (SWITCHYARD_DECISION_LOG_MAX_ENTRIES=0), so feedback "
                             "has nothing to attach to", code="decision_log_off")
    try:
        entry = await add_feedback(state.aredis, state.store.prefix, state.settings.decision_log_max_entries,
                                   fb.request_id, fb.score, who, fb.comment)
    except Exception as exc:
        raise StoreUnavailable(f"could not store the feedback: the store is unreachable ({exc})") from None
    return Response(orjson.dumps({"object": "feedback", "id": entry, "request_id": fb.request_id,
                                  "score": fb.score}), status_code=201, media_type="application/json")
