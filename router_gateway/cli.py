"""The ``switchyard`` command: serve the gateway, manage experts and local workers.

Expert and worker commands talk to the registry's Redis directly (``SWITCHYARD_REDIS_URL``,
or the embedded server under ``SWITCHYARD_DATA_DIR``), so they work with or without a
running gateway; gateways pick up changes within ``registry_refresh_s``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from router_gateway import cli_train
from router_gateway.cli_cache import cache_app
from router_gateway.cli_collab import collab_app
from router_gateway.cli_common import console, err_console
from router_gateway.cli_common import fail as _fail
from router_gateway.cli_common import open_store
from router_gateway.cli_fleet import fleet_app
from router_gateway.cli_keys import keys_app
from router_gateway.cli_logs import logs_app
from router_gateway.cli_routers import routers_app
from router_gateway.settings import Settings

app = typer.Typer(help="Switchyard: a multi-LLM routing gateway with an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
experts_app = typer.Typer(help="Register, list, remove and health-check expert models.", no_args_is_help=True)
workers_app = typer.Typer(help="Start and stop the local workers (vLLM, collaboration) of experts with a launch block.",
                          no_args_is_help=True)
app.add_typer(experts_app, name="experts")
app.add_typer(workers_app, name="workers")
app.add_typer(routers_app, name="routers")
app.add_typer(fleet_app, name="fleet")
app.add_typer(collab_app, name="collab")
app.add_typer(keys_app, name="keys")
app.add_typer(logs_app, name="logs")
app.add_typer(cache_app, name="cache")
cli_train.register(app)


_store = open_store

OPEN_FILES_WANTED = 65536
OPEN_FILES_LOW = 4096


def raise_open_files_limit(wanted: int = OPEN_FILES_WANTED) -> tuple[int, int]:
    """Raise this process's soft limit on open files to ``wanted`` (at most the hard
    limit; worker processes inherit it); returns the limit before and after. Each request
    in flight holds a client socket and often a new upstream one, so the usual default
    soft limit of 1,024 stops a gateway at a few hundred concurrent clients: accepts and
    upstream connects then fail (EMFILE)."""
    try:
        import resource
    except ImportError:   # not on this platform
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return soft, target
        except (ValueError, OSError):
            pass
    return soft, soft


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address (default from SWITCHYARD_HOST, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="Port (default from SWITCHYARD_PORT, 8000)"),
    demo: bool = typer.Option(False, "--demo", help="Build and start the demo fleet of local vLLM experts first"),
    quick: bool = typer.Option(False, "--quick", help="With --demo: the quick fleet build (minutes, little "
                                                      "specialisation)"),
    workers: int = typer.Option(1, help="Gateway processes"),
) -> None:
    """Run the gateway (OpenAI-compatible API on http://HOST:PORT/v1)."""
    import os
    import shutil
    import signal
    import tempfile

    import uvicorn

    from router_gateway.http_server import http_protocol
    from router_gateway.observe import configure_logging

    settings = Settings()
    host = host or settings.host
    port = port or settings.port
    configure_logging(settings.log_level)
    before, files = raise_open_files_limit()
    if 0 < files < OPEN_FILES_LOW:
        console.print(f"[yellow]warning:[/yellow] this process may open only {files} files (its hard limit), "
                      f"so past about {max(0, files - 200) // 2} concurrent clients it runs out of descriptors "
                      f"(requests that need a new upstream connection are then answered 503); raise it "
                      f"(`ulimit -Hn`, systemd's LimitNOFILE, docker's --ulimit nofile)")
    elif files > before:
        console.print(f"open files limit raised from {before} to {files}", style="dim")
    launcher = None
    if demo:
        from router_gateway.demo import start_demo

        launcher = start_demo(settings, console, quick=quick)
    admin_key = settings.resolved_admin_key()
    if settings.admin_key is None:
        console.print(f"admin key: in {settings.data_dir / 'admin_key'}")
    os.environ.setdefault("SWITCHYARD_ADMIN_KEY", admin_key)  # worker processes share it
    console.print(f"[green]Switchyard[/green] on http://{host}:{port}/v1  (store: "
                  f"{settings.redis_url or 'embedded Redis in ' + str(settings.data_dir)})")
    # Start (or join) the store here, once: with --workers N the processes would
    # otherwise race to start the same embedded Redis. Holding a client also keeps the
    # embedded server up while workers restart.
    from expert_registry.store import close_redis

    held = _store(settings).client
    # uvicorn re-raises the SIGTERM it caught once it has shut down; with the default
    # handler that kills this process before the `finally` below stops the demo workers
    # and the embedded Redis. As an exception, it unwinds through it instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if workers > 1:   # every worker writes its metric samples here; a scrape sums them
        metrics_dir = Path(tempfile.mkdtemp(prefix="switchyard-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    try:
        uvicorn.run("router_gateway.app:create_app", factory=True, host=host, port=port, workers=workers,
                    loop="uvloop", http=http_protocol(), access_log=False, log_level=settings.log_level.lower(),
                    timeout_graceful_shutdown=settings.shutdown_grace_s)
    finally:
        if launcher is not None:
            console.print("stopping demo workers ...")
            launcher.down()
        close_redis(held)
        if workers > 1:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


@experts_app.command("add")
def experts_add(
    name: Optional[str] = typer.Argument(None, help="Name clients put in `model`"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="A JSON or YAML expert spec instead of options"),
    backend: Optional[str] = typer.Option(None, help="vllm | openai | litellm"),
    base_url: Optional[str] = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8101/v1"),
    replica: Optional[list[str]] = typer.Option(None, help="Another base URL serving the same model (repeatable): "
                                                "requests are spread over it and --base-url"),
    fallback: Optional[list[str]] = typer.Option(None, help="An expert to try when a request naming this one "
                                                 "fails or finds it unhealthy (repeatable, in order)"),
    served_model: Optional[str] = typer.Option(None, help="The upstream's model id or litellm provider string"),
    max_concurrency: Optional[int] = typer.Option(None, help="Most requests in flight to it, counted across "
                                                  "all gateway processes; more go to the next choice or its fallbacks"),
    api_key: Optional[str] = typer.Option(None, help="Key sent to the upstream"),
    input_price: Optional[float] = typer.Option(None, help="USD per 1M input tokens"),
    output_price: Optional[float] = typer.Option(None, help="USD per 1M output tokens"),
    context_window: Optional[int] = typer.Option(None),
    tokenizer: Optional[str] = typer.Option(None, help="Tokenizer family"),
    tag: Optional[list[str]] = typer.Option(None, help="Tag (repeatable)"),
    launch_model_path: Optional[str] = typer.Option(None, help="Model folder: lets `workers up` start it"),
    launch_port: Optional[int] = typer.Option(None, help="Fixed worker port"),
    launch_arg: Optional[list[str]] = typer.Option(None, help="Extra engine argument (repeatable)"),
    replace: bool = typer.Option(False, "--replace", help="Replace an existing expert of that name"),
    check: bool = typer.Option(True, "--check/--no-check", help="Ask the server (GET BASE_URL/models) what it "
                               "serves: pick --served-model and --context-window when not given, refuse a "
                               "served model it does not list"),
) -> None:
    """Register an expert model."""
    from expert_registry.spec import ExpertSpec
    from expert_registry.store import ExpertExists

    if file is not None:
        import yaml

        try:
            data = yaml.safe_load(file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            _fail(f"cannot read {file}: {exc}")
        if name:
            data["name"] = name
    else:
        launch = None
        if launch_model_path:
            launch = {"model_path": launch_model_path, "args": launch_arg or []}
            if launch_port:
                launch["port"] = launch_port
        data = {"name": name, "backend": backend, "base_url": base_url, "replicas": replica or None,
                "fallbacks": fallback or None, "max_concurrency": max_concurrency,
                "served_model": served_model or name, "api_key": api_key,
                "input_price_per_mtok": input_price, "output_price_per_mtok": output_price,
                "context_window": context_window, "tokenizer": tokenizer, "tags": tag or None, "launch": launch}
        data = {k: v for k, v in data.items() if v is not None}
    served_given = bool(served_model) if file is None else "served_model" in data
    try:
        spec = ExpertSpec.model_validate(data)
    except ValidationError as exc:
        _fail("invalid expert spec:\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(spec)'}: {e['msg']}" for e in exc.errors(include_url=False)))
    store = _store(Settings())
    if check and spec.backend in ("vllm", "openai") and spec.base_url:
        spec = _checked(spec, served_given, "context_window" in data)
    try:
        if replace:
            store.put(spec)
        else:
            store.add(spec)
    except ExpertExists:
        _fail(f"expert '{spec.name}' already exists (use --replace)")
    more = f" and {len(spec.replicas)} replica(s)" if spec.replicas else ""
    console.print(f"registered expert [bold]{spec.name}[/bold] ({spec.backend} -> {spec.base_url or spec.served_model}"
                  f"{more})")


def _checked(spec, served_given: bool, window_given: bool):
    """``spec`` as its server says it should be (``expert_registry.discover``); exits 1 when
    the server does not serve it, warns when the server cannot be asked."""
    from expert_registry.discover import NotServed, checked_spec, served_models

    models = served_models(spec.base_url, spec.api_key)
    if isinstance(models, str):
        err_console.print(f"[yellow]could not check {spec.base_url}: {models}; registering as given[/yellow]")
        return spec
    try:
        spec, notes = checked_spec(spec, models, served_given, window_given)
    except NotServed as exc:
        _fail(str(exc))
    for note in notes:
        console.print(note)
    return spec


@experts_app.command("list")
def experts_list(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List registered experts with their last known health (and, for those with a
    max_concurrency, the requests holding a place now across the gateway)."""
    from router_gateway.slots import held_now

    store = _store(Settings())
    specs, health = store.list(), store.health()
    held = held_now(store.client, store.prefix, specs)
    if as_json:
        out = [{**s.public(), "healthy": getattr(health.get(s.name), "healthy", None),
                **({"in_flight": held[s.name]} if s.name in held else {})} for s in specs]
        print(json.dumps(out, indent=2))
        return
    table = Table("name", "backend", "upstream", "served model", "$/1M in", "$/1M out", "ctx", "in flight",
                  "healthy")
    for s in specs:
        rec = health.get(s.name)
        upstream = (s.base_url or "-") + (f" (+{len(s.replicas)} replicas)" if s.replicas else "")
        table.add_row(s.name, s.backend, upstream, s.served_model, f"{s.input_price_per_mtok:g}",
                      f"{s.output_price_per_mtok:g}", str(s.context_window),
                      f"{held[s.name]}/{s.max_concurrency}" if s.name in held else "-",
                      "?" if rec is None else ("yes" if rec.healthy else "[red]no[/red]"))
    console.print(table if specs else "no experts registered")


@experts_app.command("remove")
def experts_remove(name: str) -> None:
    """Remove an expert from the registry."""
    from expert_registry.store import ExpertMissing

    try:
        _store(Settings()).remove(name)
    except ExpertMissing:
        _fail(f"expert '{name}' does not exist")
    console.print(f"removed expert [bold]{name}[/bold]")


@experts_app.command("health")
def experts_health(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """Probe every expert's upstream now, record the result, and show it."""
    import asyncio

    from router_gateway.registry_view import probe_all_once

    store = _store(Settings())
    results = asyncio.run(probe_all_once(store))
    if as_json:
        print(json.dumps({n: {"healthy": ok, "error": e} for n, (ok, e) in results.items()}, indent=2))
    else:
        table = Table("name", "healthy", "detail")
        for n, (ok, e) in results.items():
            table.add_row(n, "yes" if ok else "[red]no[/red]", e or "")
        console.print(table if results else "no experts registered")
    if not all(ok for ok, _ in results.values()):
        raise typer.Exit(2)


def _launcher(settings: Settings):
    from expert_registry.launcher import WorkerLauncher

    return WorkerLauncher(_store(settings), settings.data_dir)


@workers_app.command("up")
def workers_up(names: Optional[list[str]] = typer.Argument(None, help="Experts to start (default: all with a launch block)"),
               timeout: float = typer.Option(600, help="Seconds to wait for health")) -> None:
    """Start a vLLM worker for every expert with a launch block and wait until healthy."""
    from expert_registry.launcher import WorkerStartError

    try:
        infos = _launcher(Settings()).up(names or None, timeout_s=timeout)
    except WorkerStartError as exc:
        _fail(str(exc))
    for w in infos:
        console.print(f"worker [bold]{w.name}[/bold] pid {w.pid} on port {w.port}: {'healthy' if w.healthy else 'NOT healthy'}")


@workers_app.command("down")
def workers_down(names: Optional[list[str]] = typer.Argument(None)) -> None:
    """Stop local workers."""
    stopped = _launcher(Settings()).down(names or None)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@workers_app.command("status")
def workers_status() -> None:
    """Show local workers: pid, port, alive, healthy."""
    table = Table("name", "pid", "port", "alive", "healthy", "log")
    for w in _launcher(Settings()).status():
        table.add_row(w.name, str(w.pid), str(w.port), str(w.alive), str(w.healthy), str(w.log_path))
    console.print(table)


def main() -> None:
    from pydantic_settings import SettingsError

    try:
        app()
    except ValidationError as exc:   # a SWITCHYARD_* setting that does not parse: say which
        if exc.title != "Settings":
            raise
        for err in exc.errors():
            name = "SWITCHYARD_" + str(err["loc"][0]).upper() if err["loc"] else "a SWITCHYARD_* setting"
            console.print(f"[red]error:[/red] {name}: {err['msg'].removeprefix('Value error, ')}")
        sys.exit(2)
    except SettingsError as exc:     # a list setting that is not JSON
        console.print(f"[red]error:[/red] {exc}; list settings are JSON, e.g. "
                      """SWITCHYARD_CORS_ORIGINS='["https://app.example.com"]'""")
        sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
