"""Observability: a request id on every response and log line, one ``Trace`` per HTTP
request, and the Prometheus metrics built from it when the request ends.

Request ids: a client's ``x-request-id`` is kept when it is a sane token (1-128 of
``A-Za-z0-9._:-``), otherwise the gateway makes one; it goes back on every response
(errors included), to the upstream expert, into the decision log, and into every log
line written while the request is handled (``%(request_id)s``, ``-`` outside one).

Metrics (``GET /metrics``, Prometheus text format)::

    switchyard_requests_total{route, code, expert, key}       every HTTP request
    switchyard_request_duration_seconds{route, expert}        until the last byte (streams included)
    switchyard_gateway_overhead_seconds{route}                the gateway's own time before the upstream answered
    switchyard_routing_decision_seconds{router}               scoring + policy of routed requests
    switchyard_tokens_total{expert, key, kind}                prompt / completion tokens (reported, else estimated)
    switchyard_spend_usd_total{expert, key}                   at the expert's prices
    switchyard_fallbacks_total{expert}                        answers that moved past this expert
    switchyard_upstream_failures_total{expert, reason}        failed calls (connect, timeout, 5xx, 429, ...)
    switchyard_cooldowns_total{expert}                        times an expert was put in cooldown
    switchyard_decision_log_dropped_total                     decision-log entries lost (Redis down, backlog)
    switchyard_expert_up{expert}                              1 healthy, 0 unhealthy or cooling (at scrape)
    switchyard_expert_cooldown{expert}                        1 while in a cooldown (at scrape)
    switchyard_store_up                                       1 while Redis answers (at scrape)
    switchyard_expert_in_flight{expert}                       requests holding a place under its max_concurrency,
                                                              across the gateway (at scrape; capped experts only)
    switchyard_expert_max_concurrency{expert}                 that cap

``key`` is the API key's id (never its secret): ``static`` for keys from
SWITCHYARD_API_KEYS, ``admin``, and ``""`` when the gateway is open. With
``switchyard serve --workers N`` every process writes its samples under
PROMETHEUS_MULTIPROC_DIR and any one of them answers a scrape with the sum.

A process counts its ended requests in plain dicts and folds them into these metrics
before each scrape it answers and every ``FLUSH_S`` (1 s): with ``--workers N``, a scrape
shows another worker's requests at most that late.
"""

from __future__ import annotations

import asyncio
import bisect
import contextvars
import functools
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from expert_registry.http1 import HTTP1Client
    from expert_registry.spec import ExpertSpec
    from router_gateway.registry_view import RegistryView

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_request_id = contextvars.ContextVar("switchyard_request_id", default="-")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"

# Routes named in metric labels; any other path counts as "other" (no label per URL).
_ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/v1/experts",
           "/v1/keys", "/v1/routers", "/v1/route", "/v1/feedback", "/health", "/metrics"}
_CHILDREN = 4096   # cached label children per metric (routes x codes x experts x keys)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
_ROUTING_BUCKETS = _OVERHEAD_BUCKETS + (2.5, 5)
# The same with the +Inf bucket that prometheus_client adds: a bucket's index is bisect_left's.
_LATENCY_BOUNDS, _OVERHEAD_BOUNDS, _ROUTING_BOUNDS = (
    (*b, math.inf) for b in (_LATENCY_BUCKETS, _OVERHEAD_BUCKETS, _ROUTING_BUCKETS))
FLUSH_S = 1.0   # how often the counts of ended requests reach the Prometheus metrics


# --- request ids and log lines ----------------------------------------------------------
def request_id_from(header: bytes | str | None) -> str:
    """The client's id when it is a sane token, else a new one."""
    if header:
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        if _SANE_ID.fullmatch(text):
            return text
    return new_request_id()


_ids: list[str] = []   # unused new ids, taken from the end


def new_request_id() -> str:
    """32 random hex digits (128 bits from ``os.urandom``, as unguessable as a uuid4: a
    request id is what feedback is filed under). Read 4 KiB at a time: one system call
    per 128 ids instead of one each. ``list.pop`` is atomic, so no two threads get the
    same id; a forked child starts a pool of its own."""
    global _ids
    try:
        return _ids.pop()
    except IndexError:
        fresh = os.urandom(4096).hex()
        _ids = [fresh[i:i + 32] for i in range(0, len(fresh), 32)]
        return new_request_id()


def _forget_ids() -> None:
    global _ids
    _ids = []


os.register_at_fork(after_in_child=_forget_ids)


def current_request_id() -> str:
    return _request_id.get()


_factory_installed = False


def install_log_context() -> None:
    """Give every log record a ``request_id`` attribute (the current request's, or ``-``);
    once per process, whatever handlers and formats are configured."""
    global _factory_installed
    if _factory_installed:
        return
    base = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        record.request_id = _request_id.get()
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def configure_logging(level: str) -> None:
    """Root logging for a gateway process (``serve`` and each of its workers)."""
    install_log_context()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per worker health poll is noise


# --- one request ----------------------------------------------------------------------
def route_label(path: str) -> str:
    if path in _ROUTES:
        return path
    parts = path.split("/", 3)
    if len(parts) > 2 and parts[1] == "v1":
        label = f"/v1/{parts[2]}"
        if label in _ROUTES:
            return label
    return "other"


#: response headers whose values the trace keeps (``x-switchyard-overhead-ms`` in seconds)
_TRACED_HEADERS = {b"x-switchyard-expert": "expert", b"x-switchyard-router": "router",
                   b"x-switchyard-fallback-from": "fallback_from", b"x-switchyard-overhead-ms": "overhead_s",
                   b"x-switchyard-cache": "cache"}


@dataclass(slots=True)
class Trace:
    """What one HTTP request did, filled in as it goes; read once it ended."""

    rid: str
    t0: float                      # perf_counter at arrival
    wall: float                    # time.time() at arrival
    route: str
    status: int = 0
    key: str = ""                  # the caller's key id; see the module docstring
    endpoint: str = ""             # chat/completions | completions (proxied requests only)
    model: str = ""                # ``model`` as the client sent it (proxied requests only)
    router: str = ""
    expert: str = ""               # the expert that answered (or was last tried)
    fallback_from: str = ""
    route_s: float | None = None
    scores: str | None = None
    prompt: str | None = None
    calls: list[tuple[str, int, int, float]] | None = None   # (expert, prompt, completion tokens, USD) per paid answer
    overhead_s: float | None = None
    ended: float | None = None     # perf_counter when the last byte went out
    cache: str = ""                # x-switchyard-cache of the answer: hit, miss, refresh, off ("" with the cache off)

    def read_response_headers(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        for name, value in headers:
            field = _TRACED_HEADERS.get(name)
            if field is None:
                continue
            if field == "overhead_s":
                try:
                    overhead = float(value) / 1000
                except ValueError:
                    continue
                if math.isfinite(overhead):
                    self.overhead_s = overhead
            else:
                setattr(self, field, value.decode("latin-1"))

    @property
    def usage(self) -> tuple[int, int] | None:
        """Tokens of every paid answer of this request (recruited experts' included)."""
        if not self.calls:
            return None
        return sum(c[1] for c in self.calls), sum(c[2] for c in self.calls)

    @property
    def cost_usd(self) -> float:
        return sum(c[3] for c in self.calls or ())

    def metering(self, then: Callable[..., None] | None):
        """A ``Dispatcher`` meter that notes each paid answer's usage and cost here, then
        calls ``then`` (the key's booking) when there is one."""

        def meter(spec: "ExpertSpec", usage: tuple[int, int], final: bool = True) -> None:
            if final:
                self.expert = spec.name
            cost = spec.cost_usd(*usage)
            if self.calls is None:
                self.calls = []
            self.calls.append((spec.name, usage[0], usage[1], cost))
            if then is not None:
                then(spec, usage, final)

        return meter

    def enter(self) -> contextvars.Token:
        return _request_id.set(self.rid)

    @staticmethod
    def leave(token: contextvars.Token) -> None:
        _request_id.reset(token)


# --- metrics --------------------------------------------------------------------------
class _FleetCollector(Collector):
    """Gauges read at scrape time: from the registry view (every process has the same)
    and from the upstream client's connection pools (those of the process that answers
    the scrape)."""

    def __init__(self, view_of: Callable[[], "RegistryView | None"],
                 client_of: Callable[[], "HTTP1Client | None"] = lambda: None):
        self.view_of = view_of
        self.client_of = client_of
        self.in_flight: dict[str, tuple[int, int]] = {}   # capped expert -> (places held, cap), set per scrape

    def collect(self):
        view = self.view_of()
        up = GaugeMetricFamily("switchyard_expert_up", "1 when the expert is healthy and not cooling down",
                               labels=["expert"])
        cool = GaugeMetricFamily("switchyard_expert_cooldown", "1 while the expert is in a cooldown",
                                 labels=["expert"])
        store = GaugeMetricFamily("switchyard_store_up", "1 while the Redis store answers")
        if view is not None:
            now = time.time()
            for name in sorted(view.experts):
                bad = view.is_unhealthy(name)
                up.add_metric([name], 0.0 if bad is not None else 1.0)
                h = view.health.get(name)
                cooling = h is not None and h.until is not None and h.until > now
                cool.add_metric([name], 1.0 if cooling else 0.0)
            store.add_metric([], 1.0 if view.store_error is None else 0.0)
        yield up
        yield cool
        yield store
        held = GaugeMetricFamily("switchyard_expert_in_flight", "Requests holding a place under the expert's "
                                 "max_concurrency, across the gateway", labels=["expert"])
        caps = GaugeMetricFamily("switchyard_expert_max_concurrency", "The expert's max_concurrency",
                                 labels=["expert"])
        for name, (n, cap) in sorted(self.in_flight.items()):
            held.add_metric([name], n)
            caps.add_metric([name], cap)
        yield held
        yield caps
        conns = GaugeMetricFamily("switchyard_upstream_connections",
                                  "Upstream connections of this process by state (in_use, idle, limit)",
                                  labels=["origin", "state"])
        client = self.client_of()
        for origin, in_use, idle, limit in client.connection_counts() if client is not None else ():
            conns.add_metric([origin, "in_use"], in_use)
            conns.add_metric([origin, "idle"], idle)
            conns.add_metric([origin, "limit"], limit)
        yield conns


class _Tally:
    """Ended requests not yet folded into the metrics: counts by label values, and per
    histogram child a list of bucket counts with the sum of the values last."""

    __slots__ = ("requests", "duration", "overhead", "routing", "usage")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int, str, str], int] = {}
        self.duration: dict[tuple[str, str], list] = {}
        self.overhead: dict[str, list] = {}
        self.routing: dict[str, list] = {}
        self.usage: dict[tuple[str, str], list] = {}   # (expert, key) -> [prompt, completion, USD]


def _add(hist: dict, labels: Any, value: float, bounds: tuple[float, ...]) -> None:
    """One observation of ``value`` into ``hist[labels]`` (bucket counts, then the sum)."""
    counts = hist.get(labels)
    if counts is None:
        counts = hist[labels] = [0] * len(bounds) + [0.0]
    counts[bisect.bisect_left(bounds, value)] += 1
    counts[-1] += value


def _fold(child: Histogram, counts: list) -> None:
    """Add ``_add``'s counts to a histogram child: what ``observe`` does per value, once
    per bucket (its ``_buckets`` and ``_sum``, as ``Histogram._metric_init`` makes them;
    a test checks a scrape against plain ``observe`` calls)."""
    for bucket, n in zip(child._buckets, counts):
        if n:
            bucket.inc(n)
    child._sum.inc(counts[-1])


class Metrics:
    """The gateway's Prometheus metrics. One per app (tests run several in one process);
    with PROMETHEUS_MULTIPROC_DIR set (``serve --workers N``), samples go to files there
    and a scrape sums every process's."""

    def __init__(self, view_of: Callable[[], "RegistryView | None"] = lambda: None,
                 client_of: Callable[[], "HTTP1Client | None"] = lambda: None):
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        reg = None if self.multiprocess else CollectorRegistry(auto_describe=True)
        self.registry = reg
        self.fleet = _FleetCollector(view_of, client_of)
        self.requests = Counter("switchyard_requests", "HTTP requests by route, status code, expert and key",
                                ["route", "code", "expert", "key"], registry=reg)
        self.duration = Histogram("switchyard_request_duration_seconds",
                                  "Request time until the last byte was sent (streams included)",
                                  ["route", "expert"], buckets=_LATENCY_BUCKETS, registry=reg)
        self.overhead = Histogram("switchyard_gateway_overhead_seconds",
                                  "The gateway's own time in a proxied request (before the upstream answered)",
                                  ["route"], buckets=_OVERHEAD_BUCKETS, registry=reg)
        self.routing = Histogram("switchyard_routing_decision_seconds",
                                 "Routing decision time (embedding, scoring, policy)", ["router"],
                                 buckets=_ROUTING_BUCKETS, registry=reg)
        self.tokens = Counter("switchyard_tokens", "Tokens the upstreams reported (else estimated)",
                              ["expert", "key", "kind"],
                              registry=reg)
        self.spend = Counter("switchyard_spend_usd", "Spend at the expert's prices", ["expert", "key"], registry=reg)
        self.fallbacks = Counter("switchyard_fallbacks", "Answers that moved on past this expert", ["expert"],
                                 registry=reg)
        self.failures = Counter("switchyard_upstream_failures", "Failed calls to an expert", ["expert", "reason"],
                                registry=reg)
        self.cooldowns = Counter("switchyard_cooldowns", "Times an expert was put in a cooldown", ["expert"],
                                 registry=reg)
        self.log_dropped = Counter("switchyard_decision_log_dropped", "Decision-log entries lost", registry=reg)
        self.cache = Counter("switchyard_cache", "Response-cache lookups and stores by result (hit, miss, stored, "
                             "off, refresh, too_large, error, coalesced)", ["result"], registry=reg)
        if reg is not None:
            reg.register(self.fleet)
        # Label children by value, cached: prometheus_client checks and looks up the label
        # values on every ``labels()`` call (per label set at each flush; per lookup for
        # the cache's results, which are counted as they happen).
        self._requests, self._duration, self._overhead, self._routing, self._tokens, self._spend, self._cache = (
            functools.lru_cache(maxsize=_CHILDREN)(m.labels)
            for m in (self.requests, self.duration, self.overhead, self.routing, self.tokens, self.spend, self.cache))
        self._tally = _Tally()

    def finish(self, t: Trace) -> None:
        """Count one ended request: in plain dicts, folded into the Prometheus metrics by
        :meth:`flush`. Counting straight into them (a lock per value, a loop over the
        buckets, a label lookup per metric) took about a tenth of the gateway's CPU per
        proxied request at saturation."""
        elapsed = (t.ended or time.perf_counter()) - t.t0
        tally = self._tally
        k = (t.route, t.status, t.expert, t.key)
        tally.requests[k] = tally.requests.get(k, 0) + 1
        _add(tally.duration, (t.route, t.expert), elapsed, _LATENCY_BOUNDS)
        if t.overhead_s is not None:
            _add(tally.overhead, t.route, t.overhead_s, _OVERHEAD_BOUNDS)
        if t.route_s is not None:
            _add(tally.routing, t.router, t.route_s, _ROUTING_BOUNDS)
        calls = t.calls
        if calls:
            usage = tally.usage
            for expert, p, c, cost in calls:
                k = (expert, t.key)
                u = usage.get(k)
                if u is None:
                    usage[k] = [p, c, cost]
                else:
                    u[0] += p
                    u[1] += c
                    u[2] += cost
        if t.fallback_from:
            for name in t.fallback_from.split(","):
                self.fallbacks.labels(name).inc()

    def flush(self) -> None:
        """Fold the requests counted since the last flush into the Prometheus metrics.
        Before every scrape this process answers, and every ``FLUSH_S`` seconds
        (:meth:`run`), so that with ``--workers N`` another process's scrape sees this one's
        requests at most that late."""
        tally, self._tally = self._tally, _Tally()
        for (route, status, expert, key), n in tally.requests.items():
            self._requests(route, str(status), expert, key).inc(n)
        for labels, counts in tally.duration.items():
            _fold(self._duration(*labels), counts)
        for route, counts in tally.overhead.items():
            _fold(self._overhead(route), counts)
        for router, counts in tally.routing.items():
            _fold(self._routing(router), counts)
        for (expert, key), (p, c, cost) in tally.usage.items():
            self._tokens(expert, key, "prompt").inc(p)
            self._tokens(expert, key, "completion").inc(c)
            if cost:
                self._spend(expert, key).inc(cost)

    async def run(self) -> None:
        """:meth:`flush` every ``FLUSH_S`` seconds, until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(FLUSH_S)
                self.flush()
        finally:
            self.flush()

    def upstream_failure(self, expert: str, reason: str) -> None:
        self.failures.labels(expert, reason).inc()

    def cooldown(self, expert: str) -> None:
        self.cooldowns.labels(expert).inc()

    def cache_result(self, result: str, n: int = 1) -> None:
        self._cache(result).inc(n)

    def render(self) -> bytes:
        self.flush()
        if self.registry is not None:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)
        reg.register(self.fleet)
        return generate_latest(reg)
