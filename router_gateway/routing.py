"""Routing in the gateway: deployed routers, kept loaded, and the choice of an expert.

``RoutingTable`` mirrors the router deployments in the store (``deployments.py``). When
the registry's version changes, or a router's files change on disk, it (re)loads what
changed with ``load_router`` in a thread, never on the event loop. A router whose
directory and files are unchanged is kept across refreshes, its scorer's cache included.
A router that fails to load stays in the table with its error: requests for it get a
503 naming the reason. Each loaded router has one ``BatchedScorer``.

Routing one request (:meth:`RoutingTable.rank`):

1. Query text: the last user message's text (string content, or the text parts of a
   content array), else the whole conversation's text; for ``/v1/completions`` the
   prompt (the first one of a list); for ``/v1/responses`` the ``input`` text, or its
   items read as messages (``input_text`` parts count as text). Token-id prompts cannot
   be routed (400).
2. Scores: predicted quality, and logged cost, per log model (``router.experts_``).
3. Candidates: mapped experts that are registered, not a collaboration group and not
   unhealthy. Everything left out is reported with its reason.
4. Cost per candidate, USD per call. When any candidate has a non-zero registry price::

       (input_price_per_mtok * chars / 4 + output_price_per_mtok * max_tokens) / 1e6

   with ``max_tokens`` = the request's ``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``, else
   256; otherwise the router's cost model for the mapped log model (what the logs paid).
   ``cost_scale`` = the dearest candidate's cost for this query (1 when all are free).
5. Policy: the deployment's defaults with the request's knobs (``with_knobs``). The
   top-ranked candidate is chosen; the rest, in order, are the decision's fallbacks.

Skills from an LLM: when the deployment names a ``skills_expert`` and its router reads
skill words (``accepts_skill_words``, the symbolic router), step 2 first asks that expert
for the query's skills (``skills_llm.SkillAsker``: cached, with a timeout, falling back
to the router's zero-shot skills) and scores with them, outside the micro-batcher.

Aggregation (``?k=K`` with K > 1): the top K candidates are recruited and an aggregator
expert answers from their answers (``aggregate.py``); the decision's ``expert`` is the
aggregator, ``recruited`` the K experts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_gateway.deployments import DeploymentStore, RouterDeployment
from router_gateway.dispatch import RouteDecision
from router_gateway.errors import ExpertUnavailable, InvalidRequest
from router_gateway.keys import CHARS_PER_TOKEN
from router_gateway.model_string import ModelTarget
from router_gateway.registry_view import RegistryView
from router_gateway.skills_llm import SkillAnswer, SkillAsker
from router_models.base import ARRAYS_FILE, ROUTER_FILE, Router, load_router
from router_models.policy import CostAwarePolicy, order_by_utility
from router_models.serving import BatchedScorer, Scores

log = logging.getLogger(__name__)

DEFAULT_OUTPUT_TOKENS = 256  # when the request sets no max_tokens


# --- the query text -------------------------------------------------------------------
def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content
                         if isinstance(p, dict) and p.get("type") in ("text", "input_text") and isinstance(p.get("text"), str))
    return ""


def query_text(body: dict, endpoint: str) -> str:
    """The text a router scores for this request (see the module docstring)."""
    if endpoint in ("completions", "embeddings"):
        prompt = body.get("prompt" if endpoint == "completions" else "input")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) or prompt == []:
            return prompt or ""
        raise InvalidRequest("a router needs a text prompt; token-id prompts cannot be routed "
                             "(name an expert in 'model' instead)", param="prompt")
    if endpoint == "responses" and isinstance(body.get("input"), str):
        return body["input"]
    items = body.get("input" if endpoint == "responses" else "messages")
    messages = [m for m in items or () if isinstance(m, dict)]
    for m in reversed(messages):
        if m.get("role") == "user":
            text = _content_text(m.get("content"))
            if text:
                return text
            break
    return "\n".join(t for t in (_content_text(m.get("content")) for m in messages) if t)


def output_tokens(body: dict) -> int:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        v = body.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return DEFAULT_OUTPUT_TOKENS


# --- loaded deployments ---------------------------------------------------------------
def artifact_signature(router_dir: str) -> tuple:
    """(file, mtime, size) of every file in a router's directory (the artifact and any
    user-editable file next to it, such as skill profiles): a change means "reload"."""
    out = []
    for f in (ROUTER_FILE, ARRAYS_FILE):
        try:
            st = os.stat(Path(router_dir) / f)
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    try:
        extra = sorted((e for e in os.scandir(router_dir)
                       if e.is_file() and e.name not in (ROUTER_FILE, ARRAYS_FILE)), key=lambda e: e.name)
    except OSError:
        extra = []
    for e in extra:
        try:
            st = e.stat()
            out.append((e.name, st.st_mtime_ns, st.st_size))
        except OSError:
            pass
    return tuple(out)


@dataclass(frozen=True)
class LoadedDeployment:
    deployment: RouterDeployment
    router: Router | None  # None: it failed to load (``error`` says why)
    scorer: BatchedScorer | None
    error: str | None
    signature: tuple

    @property
    def name(self) -> str:
        return self.deployment.name

    def unmapped(self) -> list[str]:
        return [m for m in getattr(self.router, "experts_", []) if m not in self.deployment.expert_map]

    def describe(self) -> dict:
        """The admin API's view of this deployment."""
        out = {"id": f"router:{self.name}", "object": "router", **self.deployment.model_dump(mode="json"),
               "loaded": self.router is not None, "error": self.error}
        if self.router is not None:
            out["router"] = self.router.name
            out["log_models"] = list(self.router.experts_)
            out["excluded"] = {m: "no mapping: excluded from routing" for m in self.unmapped()}
        return out


@dataclass(frozen=True)
class Candidate:
    spec: ExpertSpec
    log_model: str
    quality: float
    cost_usd: float
    utility: float


@dataclass(frozen=True)
class Ranking:
    """One request's routing: candidates best first, what was left out and why."""

    entry: LoadedDeployment
    text: str
    policy: CostAwarePolicy
    ranked: list[Candidate]
    excluded: dict[str, str]
    cost_source: str  # "registry" | "router"
    seconds: float
    skills: SkillAnswer | None = None  # the LLM's skill words, when the deployment asks for them

    def scores_header(self) -> str:
        return ";".join(f"{c.spec.name}={c.quality:.3f}" for c in self.ranked)


class RoutingTable:
    """Loaded router deployments by name, refreshed from the store (see module docstring)."""

    def __init__(self, store: ExpertStore, view: RegistryView, refresh_s: float = 1.0,
                 skills: SkillAsker | None = None):
        self.deployments = DeploymentStore(store)
        self.view = view
        self.skills = skills
        self.refresh_s = refresh_s
        self.entries: dict[str, LoadedDeployment] = {}
        self._records: list[RouterDeployment] = []
        self._version = -1
        self._lock = asyncio.Lock()

    # --- lookups --------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.entries)

    def default_name(self) -> str | None:
        return next((n for n in self.names() if self.entries[n].deployment.default), None)

    def lookup(self, target: ModelTarget) -> LoadedDeployment | None:
        name = self.default_name() if target.kind == "auto" else target.name
        return self.entries.get(name) if name is not None else None

    def model_entries(self) -> list[dict]:
        """``/v1/models`` rows: each loaded deployment, and ``auto`` when a default exists."""
        out = []
        for name in self.names():
            e = self.entries[name]
            if e.router is None:
                continue
            out.append({"id": f"router:{name}", "object": "model", "created": 0, "owned_by": "switchyard",
                        "kind": "router", "router": e.router.name, "default": e.deployment.default,
                        "experts": sorted(e.deployment.expert_map.values())})
        default = self.default_name()
        if default is not None and self.entries[default].router is not None:
            out.append({"id": "auto", "object": "model", "created": 0, "owned_by": "switchyard",
                        "kind": "auto", "router": f"router:{default}"})
        return out

    # --- loading --------------------------------------------------------------
    def _read(self) -> tuple[list[RouterDeployment], dict[str, tuple]]:
        version = self.deployments.store.version()
        if version != self._version:
            self._records = self.deployments.list()
            self._version = version
        return self._records, {d.name: artifact_signature(d.router_dir) for d in self._records}

    async def refresh(self, preloaded: dict[str, Router] | None = None) -> None:
        """Bring the table up to date with the store and the routers' files.
        ``preloaded``: routers the caller has just loaded (the admin API validated them)."""
        async with self._lock:
            try:
                records, signatures = await asyncio.to_thread(self._read)
            except Exception as exc:  # keep routing with what is loaded when Redis hiccups
                log.warning("router deployments refresh failed, keeping the loaded ones: %s", exc)
                return
            entries: dict[str, LoadedDeployment] = {}
            for dep in records:
                old, sig = self.entries.get(dep.name), signatures[dep.name]
                if old is not None and old.signature == sig and old.deployment.router_dir == dep.router_dir:
                    entries[dep.name] = replace(old, deployment=dep)
                else:
                    entries[dep.name] = await self._load(dep, sig, (preloaded or {}).get(dep.name))
            self.entries = entries

    async def _load(self, dep: RouterDeployment, sig: tuple, router: Router | None) -> LoadedDeployment:
        """Load the deployment's router (unless the caller just did) and warm it up with one
        made-up query, so that its first client does not wait seconds for the encoder."""
        try:
            if router is None:
                router = await asyncio.to_thread(load_router, dep.router_dir)
            scorer = BatchedScorer(router)
            warm_ms = await asyncio.to_thread(scorer.warm)
        except Exception as exc:  # any failure to load or score means "this router is down", never a crash
            msg = f"router '{dep.name}' failed to load from {dep.router_dir}: {exc}"
            log.error(msg)
            return LoadedDeployment(dep, None, None, msg, sig)
        log.info("router '%s': loaded %s router from %s, warmed up in %.0f ms", dep.name, router.name,
                 dep.router_dir, warm_ms)
        return LoadedDeployment(dep, router, scorer, None, sig)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await self.refresh()

    # --- routing --------------------------------------------------------------
    def _candidates(self, entry: LoadedDeployment) -> tuple[list[tuple[ExpertSpec, str, int]], dict[str, str]]:
        assert entry.router is not None
        column = {m: j for j, m in enumerate(entry.router.experts_)}
        excluded = {m: "no mapping in the deployment" for m in entry.unmapped()}
        out = []
        for log_model, name in entry.deployment.expert_map.items():
            spec = self.view.experts.get(name)
            bad = self.view.is_unhealthy(name)
            if log_model not in column:
                excluded[name] = f"its log model '{log_model}' is not in the router"
            elif spec is None:
                excluded[name] = "not registered"
            elif spec.backend == "collab":
                excluded[name] = "a collaboration group, not an expert"
            elif bad is not None:
                excluded[name] = f"unhealthy: {bad.error or 'failed its health check'}"
            else:
                out.append((spec, log_model, column[log_model]))
        return out, excluded

    async def rank(self, entry: LoadedDeployment, target: ModelTarget, body: dict, endpoint: str) -> Ranking:
        if entry.scorer is None or entry.router is None:
            raise ExpertUnavailable(entry.error or f"router '{entry.name}' is not loaded", code="router_unavailable")
        text = query_text(body, endpoint)
        t0 = time.perf_counter()
        skills = await self._llm_skills(entry, text)
        try:
            if skills is not None and skills.words:
                quality_row, cost_row = await asyncio.to_thread(_score_with_words, entry.router, text, skills.words)
                scores = Scores(quality_row, cost_row, False, 0.0)
            else:
                scores = await entry.scorer.score(text)
        except Exception as exc:  # the router's failure, not the client's: 503, logged
            log.exception("router '%s' failed to score a query", entry.name)
            raise ExpertUnavailable(f"router '{entry.name}' failed to score the request: {exc}",
                                    code="router_error") from None
        cands, excluded = self._candidates(entry)
        knobs = target.knobs
        policy = entry.deployment.policy().with_knobs(lam=knobs.get("lambda"), max_cost=knobs.get("max_cost"),
                                                      min_quality=knobs.get("min_quality"))
        priced = any(s.input_price_per_mtok or s.output_price_per_mtok for s, _, _ in cands)
        if priced:
            tokens_in, tokens_out = len(text) / CHARS_PER_TOKEN, output_tokens(body)
            cost = np.array([(s.input_price_per_mtok * tokens_in + s.output_price_per_mtok * tokens_out) / 1e6
                             for s, _, _ in cands])
        else:
            cost = np.array([float(scores.cost[j]) for _, _, j in cands])
        quality = np.array([float(scores.quality[j]) for _, _, j in cands])
        ranked: list[Candidate] = []
        if cands:
            scale = float(cost.max()) or 1.0
            utility = policy.utilities(quality[None], cost[None], scale)
            order = order_by_utility(utility, cost[None])[0]
            utility = utility[0]
            ranked = [Candidate(cands[i][0], cands[i][1], float(quality[i]), float(cost[i]), float(utility[i]))
                      for i in order]
        return Ranking(entry, text, policy, ranked, excluded, "registry" if priced else "router",
                       time.perf_counter() - t0, skills)

    async def _llm_skills(self, entry: LoadedDeployment, text: str) -> SkillAnswer | None:
        dep = entry.deployment
        if dep.skills_expert is None or self.skills is None or not getattr(entry.router, "accepts_skill_words", False):
            return None
        return await self.skills.skills(text, dep.skills_expert, dep.skills_timeout_s)

    def _aggregator(self, entry: LoadedDeployment, ranked: list[Candidate]) -> ExpertSpec:
        """The deployment's aggregator if it is up, else the candidate with the best logged score."""
        name = entry.deployment.aggregator
        if name is not None:
            spec = self.view.experts.get(name)
            if spec is not None and self.view.is_unhealthy(name) is None:
                return spec
            log.warning("aggregator '%s' of router '%s' is not available; choosing one from the logs",
                        name, entry.name)
        competence = getattr(entry.router, "competence_", None)
        if competence is None:
            return ranked[0].spec
        column = {m: j for j, m in enumerate(entry.router.experts_)}
        return max(ranked, key=lambda c: np.nan_to_num(competence[column[c.log_model]], nan=-1.0)).spec

    async def decide(self, entry: LoadedDeployment, target: ModelTarget, body: dict, endpoint: str,
                     with_scores: bool = False) -> RouteDecision:
        r = await self.rank(entry, target, body, endpoint)
        if not r.ranked:
            why = "; ".join(f"{k}: {v}" for k, v in r.excluded.items()) or "no experts mapped"
            raise ExpertUnavailable(f"router '{entry.name}' has no healthy expert to route to ({why})",
                                    code="no_healthy_expert")
        k = int(target.knobs.get("k", 1))
        if k > 1:
            recruited = tuple(c.spec for c in r.ranked[:k])
            return RouteDecision(target, self._aggregator(entry, r.ranked), entry.name, route_s=r.seconds,
                                 scores=r.scores_header() if with_scores else None, recruited=recruited)
        return RouteDecision(target, r.ranked[0].spec, entry.name,
                             fallbacks=tuple(c.spec for c in r.ranked[1:]), route_s=r.seconds,
                             scores=r.scores_header() if with_scores else None)

    async def explain(self, entry: LoadedDeployment, target: ModelTarget, body: dict, endpoint: str) -> dict:
        """What ``/v1/route`` answers: the whole decision, without calling any expert."""
        r = await self.rank(entry, target, body, endpoint)
        assert entry.router is not None
        if r.skills is not None and r.skills.words:
            detail = await asyncio.to_thread(entry.router.explain, r.text, skill_words=r.skills.words)
        else:
            detail = await asyncio.to_thread(entry.router.explain, r.text)
        k = int(target.knobs.get("k", 1))
        return {
            "router": entry.router.name,
            "deployment": entry.name,
            "query_chars": len(r.text),
            "knobs": {"mode": r.policy.mode, "lambda": r.policy.lam, "min_quality": r.policy.min_quality,
                      "max_cost": r.policy.max_cost, "request": dict(target.knobs)},
            "cost_source": r.cost_source,
            "chosen": r.ranked[0].spec.name if r.ranked else None,
            "fallbacks": [c.spec.name for c in r.ranked[1:]],
            "candidates": {c.spec.name: {"log_model": c.log_model, "quality": c.quality, "cost_usd": c.cost_usd,
                                         "utility": c.utility} for c in r.ranked},
            "excluded": r.excluded,
            "skills_source": None if r.skills is None else r.skills.source,
            "recruited": [c.spec.name for c in r.ranked[:k]] if k > 1 and r.ranked else None,
            "aggregator": self._aggregator(entry, r.ranked).name if k > 1 and r.ranked else None,
            "explain": detail,
            "route_ms": round(r.seconds * 1000, 3),
        }


def _score_with_words(router: Router, text: str, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One query scored with skill words from an LLM (symbolic routers)."""
    q = router.predict_quality([text], skill_words=[words])  # type: ignore[call-arg]
    return q[0], router.predict_cost([text])[0]
