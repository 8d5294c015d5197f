"""What an expert is: the registry's record, validated at the edge and stored as JSON.

``ExpertSpec`` is the one contract shared by the HTTP API, the CLI, the Redis store,
the upstream clients and the worker launcher (see DESIGN.md, "Contracts").
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Backend = Literal["vllm", "openai", "litellm", "collab"]

# Expert names appear in URLs, in the `model` field and as Redis hash fields. They
# must not collide with the policy prefixes (`router:`, `collab:`) or `auto`.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")
RESERVED_NAMES = frozenset({"auto"})
# Prices above this are typos (the dearest hosted models cost well under $1,000 per 1M tokens); it also
# keeps price arithmetic finite.
MAX_PRICE_PER_MTOK = 1_000_000.0
MAX_REPLICAS = 64
MAX_FALLBACKS = 16


class LaunchSpec(BaseModel):
    """How `switchyard workers up` starts this expert's worker."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["vllm", "collab"] = Field(
        default="vllm", description="vllm: a vLLM OpenAI server; collab: the collaboration worker")
    model_path: str = Field(description="Local model folder (or hub id on a machine that can reach one); "
                                        "for engine collab, the group file")
    port: int | None = Field(default=None, ge=1, le=65535, description="Fixed port; picked free when omitted")
    args: list[str] = Field(default_factory=list, description="Extra engine arguments")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the worker")

    @model_validator(mode="after")
    def _passable(self) -> "LaunchSpec":
        """What a process can be started with: a NUL cannot be passed in an argument or
        the environment, and an environment name cannot be empty or hold '='."""
        texts = {"model_path": [self.model_path], "args": self.args, "env": [*self.env, *self.env.values()]}
        for field, values in texts.items():
            if any("\x00" in v for v in values):
                raise ValueError(f"launch.{field} must not contain NUL characters")
        if any(not k or "=" in k for k in self.env):
            raise ValueError("launch.env names must be non-empty and must not contain '='")
        return self


class ExpertSpec(BaseModel):
    """One expert model behind the gateway."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="Name clients put in `model`",
                      json_schema_extra={"pattern": _NAME_RE.pattern, "not": {"enum": sorted(RESERVED_NAMES)}})
    backend: Backend
    base_url: str | None = Field(default=None, description="OpenAI-compatible base URL, e.g. http://host:8001/v1 "
                                 "(http:// or https://)")
    replicas: list[str] = Field(default_factory=list, max_length=MAX_REPLICAS,
                                description="More base URLs serving the same model (backends vllm and openai): "
                                "each request goes to the one with the fewest requests in flight from the "
                                "gateway process, and fails over to the others")
    fallbacks: list[str] = Field(default_factory=list, max_length=MAX_FALLBACKS,
                                 description="Experts to try in turn when a client names this one and it fails "
                                 "before answering, or is unhealthy (names of experts; unregistered ones are skipped)")
    max_concurrency: int | None = Field(default=None, ge=1, le=1_000_000,
                                        description="Most requests in flight to this expert (all its replicas "
                                        "together), counted across every gateway process on the Redis; beyond "
                                        "it a routed request goes to the router's next choice, one naming it to "
                                        "its fallbacks, else a 503 to retry. None: no limit")
    served_model: str = Field(description="The upstream's model id (or litellm provider model string)")
    api_key: str | None = Field(default=None, description="Key sent to the upstream, if it needs one (printable "
                                "ASCII, no spaces)", json_schema_extra={"pattern": "^[!-~]+$"})
    input_price_per_mtok: float = Field(default=0.0, ge=0, le=MAX_PRICE_PER_MTOK, description="USD per 1M input tokens")
    output_price_per_mtok: float = Field(default=0.0, ge=0, le=MAX_PRICE_PER_MTOK,
                                         description="USD per 1M output tokens")
    context_window: int = Field(default=4096, gt=0)
    tokenizer: str = Field(default="unknown", description="Tokenizer family, e.g. llama3, smollm2")
    skills: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    launch: LaunchSpec | None = None

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v in RESERVED_NAMES or v.startswith(("router:", "collab:")):
            raise ValueError(
                "expert name must be 1-128 characters of letters, digits, '.', '_', '-', '/', "
                "start with a letter or digit, and not be 'auto'"
            )
        return v

    @field_validator("base_url")
    @classmethod
    def _valid_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _valid_key(cls, v: str | None) -> str | None:
        # It goes into an HTTP header: anything else would be cut, mangled or split there.
        if v is not None and not (v and all("!" <= ch <= "~" for ch in v)):
            raise ValueError("api_key must be printable ASCII without spaces (it is sent in an HTTP header)")
        return v

    @field_validator("replicas")
    @classmethod
    def _valid_replicas(cls, v: list[str]) -> list[str]:
        if not all(u.startswith(("http://", "https://")) for u in v):
            raise ValueError("replicas must be http:// or https:// URLs")
        urls = [u.rstrip("/") for u in v]
        if len(set(urls)) != len(urls):
            raise ValueError("replicas must not repeat a URL")
        return urls

    @field_validator("fallbacks")
    @classmethod
    def _valid_fallbacks(cls, v: list[str]) -> list[str]:
        if not all(_NAME_RE.match(n) and n not in RESERVED_NAMES for n in v):
            raise ValueError("fallbacks must be expert names")
        if len(set(v)) != len(v):
            raise ValueError("fallbacks must not repeat a name")
        return v

    @model_validator(mode="after")
    def _backend_needs(self) -> "ExpertSpec":
        if self.name in self.fallbacks:
            raise ValueError("an expert cannot be its own fallback")
        if self.fallbacks and self.backend == "collab":
            raise ValueError("fallbacks are for experts; a collaboration group has none")
        if self.backend in ("vllm", "openai", "collab") and self.base_url is None and self.launch is None:
            raise ValueError(f"backend '{self.backend}' needs base_url (or a launch block)")
        if self.replicas:
            if self.backend not in ("vllm", "openai"):
                raise ValueError(f"replicas are for backends vllm and openai, not '{self.backend}'")
            if self.base_url is None:
                raise ValueError("replicas need base_url (the first replica)")
            if self.base_url in self.replicas:
                raise ValueError("replicas must not repeat base_url")
        return self

    def endpoints(self) -> tuple["ExpertSpec", ...]:
        """The spec once per URL serving it: itself with ``base_url``, then one copy per
        replica with that URL as ``base_url`` (and no replicas); ``(self,)`` without any."""
        return (self, *(self.model_copy(update={"base_url": url, "replicas": []}) for url in self.replicas))

    def cost_usd(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_price_per_mtok + output_tokens * self.output_price_per_mtok) / 1e6

    def public(self) -> dict:
        """The spec as shown to API clients: never the upstream key."""
        data = self.model_dump(mode="json")
        if data.get("api_key"):
            data["api_key"] = "***"
        return data
