"""Router deployments: a trained router's directory bound to registered experts.

A deployment is what ``model: "router:NAME"`` routes with (and ``auto``, for the one
marked default). A router learns from benchmark logs whose model names
(``router.experts_``, e.g. ``gpt-4-1106-preview``) are not the registry's expert names,
so ``expert_map`` says which registered expert stands for which log model. Log models
without a mapping are left out of routing.

Deployments live beside the experts in the same Redis::

    {prefix}routers   hash  name -> RouterDeployment JSON

and every write bumps the registry's version key, so every gateway process reloads.
The HTTP API (``router_routes``) and the CLI (``cli_routers``) validate a deployment with
:func:`check_deployment` before storing it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from expert_registry.spec import ExpertSpec
from expert_registry.store import ExpertStore
from router_models.policy import CostAwarePolicy

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class DeploymentInvalid(ValueError):
    """A deployment that cannot route: its message says what to fix, ``param`` which field."""

    def __init__(self, message: str, param: str = "expert_map"):
        super().__init__(message)
        self.param = param


class DeploymentMissing(KeyError):
    """No deployment of that name."""


class RouterDeployment(BaseModel):
    """One deployed router: where its artifact is, how its log models map to experts,
    and its default policy (request knobs override these per call)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(description="What clients put after 'router:'", json_schema_extra={"pattern": _NAME_RE.pattern})
    router_dir: str = Field(min_length=1, description="A saved router (router.json + arrays), as the gateway sees it")
    expert_map: dict[str, str] = Field(description="log model (router.experts_) -> registered expert name",
                                       json_schema_extra={"minProperties": 1})
    default: bool = Field(default=False, description="The router 'auto' uses; at most one deployment has it")
    lam: float = Field(default=0.0, ge=0, allow_inf_nan=False, validation_alias=AliasChoices("lam", "lambda"),
                       description="Willingness to pay: utility = quality - lam * cost / cost_scale")
    min_quality: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False,
                                      description="When set: the cheapest expert predicted at least this good")
    max_cost: float | None = Field(default=None, ge=0, allow_inf_nan=False, description="USD per call cap")
    aggregator: str | None = Field(default=None, description="Expert that merges the answers of the k experts "
                                   "recruited for 'router:NAME?k=K' (default: the mapped expert with the best "
                                   "logged score)")
    skills_expert: str | None = Field(default=None, description="Expert asked to list a query's skills (routers "
                                      "that read skill words, e.g. symbolic); unset: skills are found zero-shot")
    skills_timeout_s: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False,
                                    description="How long to wait for skills_expert before the zero-shot path")

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("router name must be a slug: 1-64 characters of lowercase letters, digits, "
                             "'.', '_', '-', starting with a letter or digit")
        return v

    @field_validator("router_dir")
    @classmethod
    def _path(cls, v: str) -> str:   # (pydantic already refuses lone surrogates)
        if "\x00" in v:
            raise ValueError("router_dir must be a folder path: no NUL characters")
        return v

    @field_validator("expert_map")
    @classmethod
    def _mapping(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("expert_map needs at least one LOG_MODEL -> EXPERT mapping")
        targets = list(v.values())
        twice = sorted({t for t in targets if targets.count(t) > 1})
        if twice:
            raise ValueError(f"each expert can stand for one log model only; mapped more than once: "
                             f"{', '.join(twice)}")
        return v

    def policy(self) -> CostAwarePolicy:
        """The deployment's default policy."""
        if self.min_quality is not None:
            return CostAwarePolicy("threshold", lam=self.lam, min_quality=self.min_quality, max_cost=self.max_cost)
        return CostAwarePolicy("wtp", lam=self.lam, max_cost=self.max_cost)


@dataclass(frozen=True)
class DeploymentCheck:
    """What validating a deployment found: the loaded router and the log models it leaves out."""

    router: Any  # router_models.Router
    unmapped: list[str]  # router.experts_ with no mapping: excluded from routing

    def report(self) -> dict[str, str]:
        return {m: "no mapping to a registered expert: excluded from routing" for m in self.unmapped}


def absolute_dir(router_dir: str) -> str:
    """Stored paths are absolute, so a gateway started elsewhere finds the same folder."""
    return str(Path(router_dir).expanduser().resolve())


def check_deployment(dep: RouterDeployment, experts: Iterable[ExpertSpec],
                     load: Callable[[str], Any] | None = None) -> DeploymentCheck:
    """Load the router and check the mapping against it and the registry. Slow (it loads
    the router): call it off the event loop. Raises ``DeploymentInvalid``."""
    if load is None:
        from router_models import load_router as load
    try:
        router = load(dep.router_dir)
    except Exception as exc:  # ArtifactError, OSError, a broken safetensors file...: all mean "not a router"
        raise DeploymentInvalid(f"router_dir '{dep.router_dir}' does not hold a loadable router: {exc}",
                                "router_dir") from None
    known = list(router.experts_)
    unknown = [m for m in dep.expert_map if m not in known]
    if unknown:
        raise DeploymentInvalid(f"expert_map names log models the router does not know: {', '.join(unknown)}; "
                                f"the router's log models are: {', '.join(known)}")
    registered = {s.name: s for s in experts}
    missing = [e for e in dep.expert_map.values() if e not in registered]
    if missing:
        raise DeploymentInvalid(f"expert_map targets experts that are not registered: {', '.join(missing)}; "
                                f"registered experts: {', '.join(sorted(registered)) or 'none'}")
    groups = [e for e in dep.expert_map.values() if registered[e].backend == "collab"]
    if groups:
        raise DeploymentInvalid(f"expert_map targets collaboration groups, which routers cannot pick: "
                                f"{', '.join(groups)}")
    for field in ("aggregator", "skills_expert"):
        name = getattr(dep, field)
        if name is None:
            continue
        if name not in registered:
            raise DeploymentInvalid(f"{field} '{name}' is not a registered expert; registered experts: "
                                    f"{', '.join(sorted(registered)) or 'none'}", field)
        if registered[name].backend == "collab":
            raise DeploymentInvalid(f"{field} '{name}' is a collaboration group, not an expert", field)
    if dep.skills_expert is not None and not getattr(router, "accepts_skill_words", False):
        raise DeploymentInvalid(f"skills_expert is set but a {router.name} router does not read skill words "
                                "(the symbolic router does)", "skills_expert")
    return DeploymentCheck(router, [m for m in known if m not in dep.expert_map])


class DeploymentStore:
    """CRUD over ``RouterDeployment`` records, on the expert store's Redis. Sync."""

    def __init__(self, store: ExpertStore):
        self.store = store
        self.client = store.client
        self._key = store.prefix + "routers"

    def list(self) -> list[RouterDeployment]:
        out = []
        for name, raw in sorted(self.client.hgetall(self._key).items()):
            try:
                out.append(RouterDeployment.model_validate_json(raw))
            except ValueError:
                log.warning("skipping unreadable router deployment record %r", name)
        return out

    def get(self, name: str) -> RouterDeployment:
        raw = self.client.hget(self._key, name)
        if raw is None:
            raise DeploymentMissing(name)
        return RouterDeployment.model_validate_json(raw)

    def put(self, dep: RouterDeployment) -> bool:
        """Create or replace; a new default clears the old one in the same transaction.
        Returns True when it created."""
        created = False

        def write(pipe) -> None:
            nonlocal created
            current = pipe.hgetall(self._key)
            created = dep.name not in current
            others = []
            if dep.default:
                for name, raw in current.items():
                    if name == dep.name:
                        continue
                    try:
                        other = RouterDeployment.model_validate_json(raw)
                    except ValueError:
                        continue
                    if other.default:
                        others.append(other.model_copy(update={"default": False}))
            pipe.multi()
            pipe.hset(self._key, dep.name, dep.model_dump_json())
            for other in others:
                pipe.hset(self._key, other.name, other.model_dump_json())
            pipe.incr(self.store.version_key)

        self.client.transaction(write, self._key)
        return created

    def remove(self, name: str) -> None:
        if not self.client.hdel(self._key, name):
            raise DeploymentMissing(name)
        self.client.incr(self.store.version_key)
