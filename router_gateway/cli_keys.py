"""``switchyard keys``: create, list, show, change and revoke API keys.

Like the expert commands, these talk to the store's Redis directly, so they work with or
without a running gateway; gateways see a change within ``registry_refresh_s``.
"""

from __future__ import annotations

import json
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from router_gateway.cli_common import console, fail, open_store
from router_gateway.settings import Settings

keys_app = typer.Typer(help="API keys: per-key allowed models, budgets and rate limits.", no_args_is_help=True)


def _store():
    from router_gateway.keys import KeyStore

    return KeyStore(open_store(Settings()).client)


def _models(models: Optional[str]) -> Optional[list[str]]:
    return None if models is None else [m.strip() for m in models.split(",") if m.strip()]


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.6f}".rstrip("0").rstrip(".")


def _policy_changes(models, budget, period, rpm, tpm) -> dict:
    changes = {"models": _models(models), "budget_usd": budget, "budget_period": period, "rpm": rpm, "tpm": tpm}
    return {k: v for k, v in changes.items() if v is not None}


_MODELS = typer.Option(None, "--models", help="Comma-separated models or glob patterns the key may call "
                                              "(e.g. 'smollm2-*,router:fleet'); default all")
_BUDGET = typer.Option(None, "--budget", help="Spend limit in USD per period")
_PERIOD = typer.Option(None, "--period", help="Budget period: day, week, month (default) or total")
_RPM = typer.Option(None, "--rpm", min=1, help="Requests per minute")
_TPM = typer.Option(None, "--tpm", min=1, help="Tokens per minute (input + output)")


@keys_app.command("create")
def keys_create(name: str = typer.Argument(..., help="Who or what the key is for"),
                models: Optional[str] = _MODELS, budget: Optional[float] = _BUDGET, period: Optional[str] = _PERIOD,
                rpm: Optional[int] = _RPM, tpm: Optional[int] = _TPM,
                as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Create a key and print its secret (shown this once only)."""
    from router_gateway.keys import KeyPolicy

    try:
        policy = KeyPolicy.model_validate(_policy_changes(models, budget, period, rpm, tpm))
        secret, rec = _store().create(name, policy)
    except (ValidationError, ValueError) as exc:
        fail(f"invalid key settings: {exc}")
    if as_json:
        print(json.dumps({**rec.public(), "key": secret}, indent=2))
        return
    console.print(f"created key [bold]{rec.id}[/bold] for {rec.name}: {_limits(rec)}")
    console.print("secret (shown once, store it now):")
    print(secret)


def _limits(rec) -> str:
    parts = [f"models {','.join(rec.models)}" if rec.models is not None else "all models"]
    if rec.budget_usd is not None:
        parts.append(f"budget {_money(rec.budget_usd)}/{rec.budget_period}")
    if rec.rpm is not None:
        parts.append(f"{rec.rpm} req/min")
    if rec.tpm is not None:
        parts.append(f"{rec.tpm} tok/min")
    return ", ".join(parts)


@keys_app.command("list")
def keys_list(as_json: bool = typer.Option(False, "--json", help="JSON output"),
              all_keys: bool = typer.Option(False, "--all", help="Include revoked keys")) -> None:
    """List keys with their limits and spend."""
    store = _store()
    recs = [r for r in store.list() if all_keys or r.revoked_at is None]
    rows = [(r, store.usage(r)) for r in recs]
    if as_json:
        print(json.dumps([{**r.public(), "usage": u} for r, u in rows], indent=2))
        return
    table = Table("id", "name", "key", "limits", "period spend", "total spend", "requests", "tokens", "status")
    for r, u in rows:
        table.add_row(r.id, r.name, r.hint, _limits(r), f"{_money(u['period_spend_usd'])} ({u['period']})",
                      _money(u["spend_usd"]), f"{u['requests']:,}", f"{u['input_tokens'] + u['output_tokens']:,}",
                      "revoked" if r.revoked_at else "active")
    console.print(table if rows else "no keys (the gateway is open until the first key is created)")


def _get(store, key_id: str):
    from router_gateway.keys import KeyMissing

    try:
        return store.get(key_id)
    except KeyMissing:
        fail(f"API key '{key_id}' does not exist (see `switchyard keys list --all`)")


@keys_app.command("show")
def keys_show(key_id: str) -> None:
    """One key's record and usage, as JSON."""
    store = _store()
    rec = _get(store, key_id)
    print(json.dumps({**rec.public(), "usage": store.usage(rec)}, indent=2))


@keys_app.command("update")
def keys_update(key_id: str, models: Optional[str] = _MODELS, budget: Optional[float] = _BUDGET,
                period: Optional[str] = _PERIOD, rpm: Optional[int] = _RPM, tpm: Optional[int] = _TPM,
                clear: Optional[list[str]] = typer.Option(None, "--clear", help="Remove a limit: models, budget, "
                                                          "rpm or tpm (repeatable)")) -> None:
    """Change a key's allowed models or limits."""
    store = _store()
    _get(store, key_id)
    changes = _policy_changes(models, budget, period, rpm, tpm)
    names = {"models": "models", "budget": "budget_usd", "rpm": "rpm", "tpm": "tpm"}
    for c in clear or []:
        if c not in names:
            fail(f"--clear takes one of {', '.join(names)}, not '{c}'")
        changes[names[c]] = None
    if not changes:
        fail("nothing to change: give --models, --budget, --period, --rpm, --tpm or --clear")
    try:
        rec = store.update(key_id, changes)
    except (ValidationError, ValueError) as exc:
        fail(f"invalid key settings: {exc}")
    console.print(f"updated key [bold]{rec.id}[/bold] ({rec.name}): {_limits(rec)}")


@keys_app.command("revoke")
def keys_revoke(key_id: str) -> None:
    """Revoke a key; its record and spend stay listed (--all)."""
    store = _store()
    _get(store, key_id)
    rec = store.revoke(key_id)
    console.print(f"revoked key [bold]{rec.id}[/bold] ({rec.name})")
