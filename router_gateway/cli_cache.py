"""``switchyard cache``: the response cache a gateway keeps in Redis (see
``router_gateway.cache``), counted and cleared."""

from __future__ import annotations

import typer

from router_gateway.cli_common import console, open_store
from router_gateway.settings import Settings

cache_app = typer.Typer(help="The response cache: how much it holds, and clearing it.", no_args_is_help=True)


@cache_app.command("stats")
def stats() -> None:
    """Entries cached now and the bytes they hold."""
    from router_gateway.cache import cache_stats

    settings = Settings()
    store = open_store(settings)
    n, size = cache_stats(store.client, store.prefix)
    state = (f"on, entries kept {settings.cache_ttl_s:g} s" if settings.cache_ttl_s > 0
             else "off in this environment (SWITCHYARD_CACHE_TTL_S=0)")
    console.print(f"{n} cached answers, {size / 1e6:.2f} MB; the cache is {state}")


@cache_app.command("clear")
def clear() -> None:
    """Remove every cached answer (after a model update, say); gateways keep running."""
    from router_gateway.cache import clear_cache

    store = open_store(Settings())
    console.print(f"removed {clear_cache(store.client, store.prefix)} cached answers")
