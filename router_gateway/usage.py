"""Where the traffic went and what it cost: the decision log summed up by expert, router,
API key, requested model, endpoint or status, over a time window.

``switchyard logs usage`` prints it and ``GET /v1/usage`` (admin key) answers it as JSON.
Both read the decision log (``router_gateway.decision_log``), so they see every gateway
process that shares the Redis, and only what the log still holds: it is capped at
``decision_log_max_entries``, and the report says where the log starts
(``log_starts``) so that a window reaching further back is not mistaken for quiet.

Per group: requests; answered (2xx), refused (4xx: the client's or a limit's) and failed
(5xx); requests that fell over to another expert (``fallbacks``); answers from the
response cache; input and output tokens and their cost in USD, as booked against budgets
(the upstream's usage at the answering expert's prices, an estimate where it reported
none); and the latency of answered requests, gateway in to last byte out, at p50, p95 and
p99. Cost and tokens count every request that booked any (an aggregation's recruits
included), not only answered ones.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

from router_gateway.decision_log import _float, _text, decisions_key, read_decisions

GROUPINGS = ("expert", "router", "key", "model", "endpoint", "status")

_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_when(text: str | None, now: float | None = None) -> float | None:
    """A point in time: ``30m``/``12h``/``7d`` ago, or an ISO date/time (UTC unless it
    says); ``ValueError`` naming both forms for anything else."""
    if text is None:
        return None
    m = _AGO.fullmatch(text.strip())
    if m:
        ago = float(m.group(1)) * _UNIT_S[m.group(2)]
        if not math.isfinite(ago):
            raise ValueError(f"{text!r} is too long ago")
        return (time.time() if now is None else now) - ago
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 12h / 7d nor an ISO date like "
                         "2026-12-01T08:00") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def quantile(ordered: list[float], q: float) -> float | None:
    """The ``q`` quantile of sorted numbers, interpolated linearly between the two nearest
    ranks (numpy's default); None for none."""
    if not ordered:
        return None
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _number(text: str | None) -> float | None:
    """A logged count, time or cost: finite and not negative, else None."""
    x = _float(text or "")
    return x if x is not None and x >= 0 else None


@dataclass
class Tally:
    """One group's sums."""

    requests: int = 0
    answered: int = 0
    refused: int = 0
    failed: int = 0
    fallbacks: int = 0
    cache_hits: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)

    def add(self, entry: dict[str, str], status: int | None) -> None:
        self.requests += 1
        if status is not None and 200 <= status < 300:
            self.answered += 1
            latency = _number(entry.get("latency_s"))
            if latency is not None:
                self.latencies.append(latency)
        elif status is not None and 400 <= status < 500:
            self.refused += 1
        elif status is not None and status >= 500:
            self.failed += 1
        if entry.get("fallback_from"):
            self.fallbacks += 1
        if entry.get("cache") == "hit":
            self.cache_hits += 1
        tokens_in, tokens_out = _number(entry.get("input_tokens")), _number(entry.get("output_tokens"))
        self.input_tokens += int(tokens_in or 0)
        self.output_tokens += int(tokens_out or 0)
        self.cost_usd += _number(entry.get("cost_usd")) or 0.0

    def public(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        ms = {name: None if (x := quantile(ordered, q)) is None else round(x * 1000, 3)
              for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
        return {"requests": self.requests, "answered": self.answered, "refused": self.refused,
                "failed": self.failed, "fallbacks": self.fallbacks, "cache_hits": self.cache_hits,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost_usd, 9), "latency_ms": ms}


@dataclass
class UsageReport:
    by: tuple[str, ...]
    since: float | None
    until: float | None
    log_starts: float | None = None   # the oldest entry the log holds (None: the log is empty)
    log_entries: int = 0              # how many it holds
    log_full: bool = False            # at its cap: older entries have been dropped
    first: float | None = None        # the oldest and newest entry counted
    last: float | None = None
    total: Tally = field(default_factory=Tally)
    groups: dict[tuple[str, ...], Tally] = field(default_factory=dict)
    timeline: list[tuple[float, tuple[str, ...], float]] | None = None   # (ts, group, cost) when kept

    def add(self, entry: dict[str, str]) -> None:
        ts = _number(entry.get("ts"))
        if ts is None or (self.since is not None and ts < self.since) or (self.until is not None and ts >= self.until):
            return   # the stream's ids are the write times, a little after ``ts``: the window is on ``ts``
        self.first = ts if self.first is None else min(self.first, ts)
        self.last = ts if self.last is None else max(self.last, ts)
        try:
            status: int | None = int(entry.get("status", ""))
        except ValueError:
            status = None
        self.total.add(entry, status)
        group = tuple(entry.get(f, "") for f in self.by)
        tally = self.groups.get(group)
        if tally is None:
            tally = self.groups[group] = Tally()
        tally.add(entry, status)
        if self.timeline is not None:
            self.timeline.append((ts, group, _number(entry.get("cost_usd")) or 0.0))

    def series(self, interval_s: float | None = None) -> dict[str, Any]:
        """Requests and cost per group in time buckets of ``interval_s`` (default: the
        first of :data:`INTERVALS` that gives at most 60 over the window), for charts;
        needs the report made with ``timeline=True``. Buckets start at multiples of the
        interval (UTC); empty ones are left out."""
        if self.timeline is None:
            raise ValueError("this report kept no timeline (usage_report(..., timeline=True))")
        if interval_s is None:
            interval_s = auto_interval(self.since if self.since is not None else self.first,
                                       self.until if self.until is not None else self.last)
        buckets: dict[float, dict[tuple[str, ...], list]] = {}
        for ts, group, cost in self.timeline:
            start = math.floor(ts / interval_s) * interval_s
            cell = buckets.setdefault(start, {}).setdefault(group, [0, 0.0])
            cell[0] += 1
            cell[1] += cost
        return {"interval_s": interval_s, "buckets": [
            {"start": start, "groups": [{**dict(zip(self.by, g)), "requests": n, "cost_usd": round(c, 9)}
                                        for g, (n, c) in sorted(cells.items())]}
            for start, cells in sorted(buckets.items())]}

    def rows(self) -> list[tuple[tuple[str, ...], Tally]]:
        """The groups, costliest first (then busiest, then by name)."""
        return sorted(self.groups.items(), key=lambda kv: (-kv[1].cost_usd, -kv[1].requests, kv[0]))

    def public(self, key_names: dict[str, str] | None = None) -> dict[str, Any]:
        """The JSON ``GET /v1/usage`` answers; ``key_names`` (key id -> name) adds a
        ``key_name`` to groups by key."""
        groups = []
        for values, tally in self.rows():
            labels: dict[str, Any] = dict(zip(self.by, values))
            if "key" in labels and key_names is not None:
                labels["key_name"] = key_label(labels["key"], key_names)
            groups.append({**labels, **tally.public()})
        return {"object": "usage", "by": list(self.by), "since": self.since, "until": self.until,
                "log_starts": self.log_starts, "log_entries": self.log_entries, "truncated": self.truncated(),
                "first": self.first, "last": self.last,
                "total": self.total.public(), "groups": groups}

    def truncated(self) -> bool:
        """Requests of the window may be missing: the log is at its cap (it has dropped
        its oldest entries) and the window starts before the oldest one it holds."""
        return self.log_full and self.log_starts is not None and (self.since is None or self.since < self.log_starts)


INTERVALS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)   # chart buckets: 1 min to 1 week


def auto_interval(start: float | None, end: float | None, most: int = 60) -> float:
    """The first of :data:`INTERVALS` that cuts ``start``..``end`` into at most ``most``
    buckets."""
    span = 0.0 if start is None or end is None else max(0.0, end - start)
    return float(next((i for i in INTERVALS if span / i <= most), INTERVALS[-1]))


def parse_interval(text: str) -> float:
    """A bucket length like ``15m``, ``1h``, ``1d``: at least a minute; ``ValueError`` else."""
    m = _AGO.fullmatch(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an interval like 5m, 1h or 1d")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if not (60 <= seconds <= 366 * 86400):
        raise ValueError(f"interval {text!r} must be from 1 minute to a year")
    return seconds


def plot_usage(report: UsageReport, path: Any, interval_s: float | None = None,
               key_names: dict[str, str] | None = None, top: int = 8) -> None:
    """Requests (top) and cost (bottom) per time bucket, stacked by group: the ``top``
    costliest groups and the rest as "other"; keys named by ``key_names`` (id -> name).
    Written as PNG (or what ``path``'s suffix names) with matplotlib's Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = report.series(interval_s)
    width = series["interval_s"]
    shown = [g for g, _ in report.rows()[:top]]
    rest = len(report.groups) > len(shown)
    def label(f: str, v: str) -> str:
        return key_label(v, key_names or {}) if f == "key" else (v or "-")

    names = [" / ".join(label(f, v) for f, v in zip(report.by, g)) for g in shown] + (["other"] if rest else [])
    starts = [b["start"] for b in series["buckets"]]
    counts = [[0.0] * len(starts) for _ in names]
    costs = [[0.0] * len(starts) for _ in names]
    index = {g: i for i, g in enumerate(shown)}
    for j, bucket in enumerate(series["buckets"]):
        for cell in bucket["groups"]:
            i = index.get(tuple(cell[f] for f in report.by), len(shown))
            counts[i][j] += cell["requests"]
            costs[i][j] += cell["cost_usd"]
    days = [datetime.fromtimestamp(t, timezone.utc) for t in starts]
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_n, ax_c = fig.subplots(2, 1, sharex=True)
    bar_w = width / 86400 * 0.9   # matplotlib dates are in days
    for values, ax in ((counts, ax_n), (costs, ax_c)):
        bottom = [0.0] * len(starts)
        for name, row in zip(names, values):
            ax.bar(days, row, width=bar_w, bottom=bottom, align="edge", label=name)
            bottom = [b + v for b, v in zip(bottom, row)]
    ax_n.set_ylabel("requests")
    ax_c.set_ylabel("cost, USD")
    ax_n.legend(title=" / ".join(report.by), fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    step = next((f"{width / u:g} {n}" for u, n in ((86400, "d"), (3600, "h"), (60, "min")) if width >= u),
                f"{width:g} s")
    fig.suptitle(f"Gateway usage by {', '.join(report.by)}, per {step} (UTC)")
    ax_c.set_xlabel("time (UTC)")
    fig.autofmt_xdate()
    fig.savefig(path, dpi=110)


def key_label(key_id: str, names: dict[str, str]) -> str:
    """How a report names the caller the decision log records as ``key_id``."""
    if key_id == "":
        return "(no key: open gateway)"
    if key_id == "static":
        return "(SWITCHYARD_API_KEYS)"
    if key_id == "admin":
        return "(admin key)"
    return names.get(key_id, "(unknown key)")


def check_grouping(by: Iterable[str]) -> tuple[str, ...]:
    """``by`` as a tuple, or ``ValueError`` naming what may be grouped on."""
    out = tuple(by) or ("expert",)
    bad = [f for f in out if f not in GROUPINGS]
    if bad:
        raise ValueError(f"cannot group by {', '.join(map(repr, bad))}: one or more of {', '.join(GROUPINGS)}")
    if len(set(out)) != len(out):
        raise ValueError(f"each grouping at most once (got {', '.join(out)})")
    return out


def usage_report(client: Any, prefix: str, by: Iterable[str] = ("expert",), since: float | None = None,
                 until: float | None = None, max_entries: int | None = None, timeline: bool = False) -> UsageReport:
    """Sum the decision log between ``since`` and ``until`` (unix times, either None),
    grouped by the fields in ``by`` (see ``GROUPINGS``). ``client``: a sync redis client;
    ``max_entries``: the log's cap, to tell whether it has dropped entries; ``timeline``:
    keep each entry's time, group and cost for :meth:`UsageReport.series`."""
    report = UsageReport(check_grouping(by), since, until, timeline=[] if timeline else None)
    if since is not None and until is not None and since >= until:
        raise ValueError("the window is empty: 'since' must come before 'until'")
    report.log_entries = client.xlen(decisions_key(prefix))
    report.log_full = max_entries is not None and report.log_entries >= max_entries
    oldest = client.xrange(decisions_key(prefix), "-", "+", count=1)
    if oldest:
        fields = {_text(k): _text(v) for k, v in oldest[0][1].items()}
        report.log_starts = _number(fields.get("ts"))
    # The stream's ids are Redis's clock when an entry was written, after the request
    # ended; ``ts`` is the gateway's when it began. Read from a minute before ``since``
    # (clock skew) to the end (a long request is written well after it began) and keep
    # what ``ts`` puts in the window.
    for entry in read_decisions(client, prefix, None if since is None else max(0.0, since - 60), None):
        report.add(entry)
    return report
