"""Parse the request's ``model`` field into a routing target.

    "qwen-7b"                   -> an expert by name
    "router:gnn?lambda=0.3"     -> a router, with cost knobs
    "auto"                      -> the deployment's default router and policy
    "collab:math-group"         -> a collaboration group

Anything malformed raises ``InvalidRequest`` (400), never anything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Literal, Mapping
from urllib.parse import parse_qsl

from router_gateway.errors import InvalidRequest

TargetKind = Literal["expert", "router", "auto", "collab"]

# knob -> (converter, lower bound, upper bound)
KNOBS: dict[str, tuple[type, float, float]] = {
    "lambda": (float, 0.0, math.inf),
    "max_cost": (float, 0.0, math.inf),
    "min_quality": (float, 0.0, 1.0),
    "k": (int, 1, 64),
}


@dataclass(frozen=True)
class ModelTarget:
    kind: TargetKind
    name: str
    knobs: Mapping[str, float | int] = field(default_factory=lambda: MappingProxyType({}))

    def __str__(self) -> str:
        head = {"expert": self.name, "auto": "auto"}.get(self.kind, f"{self.kind}:{self.name}")
        if self.knobs:
            head += "?" + "&".join(f"{k}={v}" for k, v in self.knobs.items())
        return head


def _parse_knobs(query: str) -> Mapping[str, float | int]:
    if not query:
        return MappingProxyType({})
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InvalidRequest(f"malformed cost knobs '{query}': expected key=value&key=value",
                             param="model") from None
    out: dict[str, float | int] = {}
    for key, raw in pairs:
        if key not in KNOBS:
            raise InvalidRequest(f"unknown knob '{key}' in model; known knobs: {', '.join(KNOBS)}",
                                 param="model")
        if key in out:
            raise InvalidRequest(f"knob '{key}' given twice in model", param="model")
        conv, lo, hi = KNOBS[key]
        try:
            value = conv(raw)
        except ValueError:
            raise InvalidRequest(f"knob '{key}' must be {conv.__name__}, got '{raw}'", param="model") from None
        if not (lo <= value <= hi) or (isinstance(value, float) and math.isnan(value)):
            raise InvalidRequest(f"knob '{key}' must be in [{lo}, {hi}], got {raw}", param="model")
        out[key] = value
    return MappingProxyType(out)


def parse_model(model: str) -> ModelTarget:
    """Parse a ``model`` string; raises ``InvalidRequest`` on anything malformed. Targets
    are immutable, so those of recent strings are cached (clients repeat a few)."""
    if not isinstance(model, str):
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    return _parse(model)


@lru_cache(maxsize=1024)
def _parse(model: str) -> ModelTarget:
    if not model.strip():
        raise InvalidRequest("'model' must be a non-empty string", param="model")
    if model != model.strip():
        raise InvalidRequest("'model' must not have leading or trailing spaces", param="model")
    head, sep, query = model.partition("?")
    if head == "auto":
        return ModelTarget("auto", "auto", _parse_knobs(query))
    for prefix, kind in (("router:", "router"), ("collab:", "collab")):
        if head.startswith(prefix):
            name = head[len(prefix):]
            if not name:
                raise InvalidRequest(f"'{prefix}' needs a name, e.g. '{prefix}NAME'", param="model")
            knobs = _parse_knobs(query)
            if kind == "collab" and knobs:
                raise InvalidRequest("cost knobs apply to 'router:' and 'auto' only", param="model")
            return ModelTarget(kind, name, knobs)  # type: ignore[arg-type]
    if sep:
        raise InvalidRequest("cost knobs apply to 'router:' and 'auto' only, not to an expert name",
                             param="model")
    return ModelTarget("expert", model)
