"""``GET /v1/usage`` (admin key): the decision log summed up by expert, router, key,
model, endpoint or status over a window (``router_gateway.usage``)."""

from __future__ import annotations

from typing import List, Optional

import anyio
import orjson
import redis
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from router_gateway.errors import InvalidRequest, StoreUnavailable
from router_gateway.keys import KeyStore
from router_gateway.openapi import ADMIN, errors
from router_gateway.usage import GROUPINGS, check_grouping, parse_interval, parse_when, usage_report

router = APIRouter(tags=["usage"])


def _when(text: Optional[str], param: str) -> float | None:
    try:
        return parse_when(text)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=param) from None


@router.get("/v1/usage", responses=errors(400, *ADMIN))
async def usage(request: Request,
                since: Optional[str] = Query(None, description="From this: a duration ago (30m, 12h, 7d) or an "
                                                               "ISO date/time (UTC unless it says); default: the "
                                                               "whole log"),
                until: Optional[str] = Query(None, description="Up to this, in the same forms; default: now"),
                by: List[str] = Query(["expert"], description=f"Group by: {', '.join(GROUPINGS)}; repeat to "
                                                              "group by several"),
                interval: Optional[str] = Query(None, description="Also answer requests and cost per group in "
                                                                  "time buckets of this length (5m, 1h, 1d), or "
                                                                  "'auto' (at most 60 buckets), in 'series'")
                ) -> Response:
    """Requests, answers, errors, fallbacks, cache hits, tokens, cost and latency from the
    decision log, by group, costliest first."""
    state = request.app.state
    state.keys.admin(request)
    settings = state.settings
    if settings.decision_log_max_entries <= 0:
        raise InvalidRequest("the decision log is off (SWITCHYARD_DECISION_LOG_MAX_ENTRIES=0), so there is no "
                             "usage to report", code="decision_log_off")
    try:
        grouping = check_grouping(by)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="by") from None
    start, end = _when(since, "since"), _when(until, "until")
    try:
        step = None if interval is None or interval == "auto" else parse_interval(interval)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="interval") from None
    if start is not None and end is not None and start >= end:
        raise InvalidRequest("the window is empty: 'since' must come before 'until'", param="since")
    store = state.store

    def read() -> dict:
        report = usage_report(store.client, store.prefix, grouping, start, end, settings.decision_log_max_entries,
                              timeline=interval is not None)
        names = {r.id: r.name for r in KeyStore(store.client, store.prefix).list()} if "key" in grouping else None
        body = report.public(names)
        if interval is not None:
            body["series"] = report.series(step)
        return body

    try:
        body = await anyio.to_thread.run_sync(read)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    except (redis.RedisError, OSError) as exc:   # Redis down
        raise StoreUnavailable(f"cannot read the decision log: the store is unreachable ({exc})") from None
    return Response(orjson.dumps(body), media_type="application/json")
