"""What every `switchyard` sub-command module shares: its consoles and how it fails."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str) -> None:
    """Print ``message`` (taken literally, never as markup) as an error and exit 1."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(1)
