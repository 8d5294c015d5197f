"""``switchyard routers``: deploy trained routers over registered experts.

Like the expert commands, these talk to the registry's Redis directly; running gateways
load a new or changed deployment within ``registry_refresh_s``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from router_gateway.cli_common import console, open_store
from router_gateway.cli_common import fail as _fail
from router_gateway.settings import Settings

routers_app = typer.Typer(help="Deploy, list and remove routers (model 'router:NAME', and 'auto').",
                          no_args_is_help=True)


def _stores():
    from router_gateway.deployments import DeploymentStore

    store = open_store(Settings())
    return store, DeploymentStore(store)


def _mapping(pairs: list[str], map_file: Path | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if map_file is not None:
        try:
            data = json.loads(map_file.read_text())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read --map-file {map_file}: {exc}")
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            _fail(f"--map-file {map_file} must hold a JSON object of LOGMODEL: EXPERT strings")
        out.update(data)
    for pair in pairs:
        log_model, sep, expert = pair.rpartition("=")
        if not sep or not log_model or not expert:
            _fail(f"--map '{pair}' must be LOGMODEL=EXPERT")
        out[log_model] = expert
    return out


@routers_app.command("add")
def routers_add(
    name: str = typer.Argument(..., help="Clients use model 'router:NAME'"),
    router_dir: Path = typer.Option(..., "--router-dir", help="A saved router (router.json + arrays)"),
    map_pairs: Optional[list[str]] = typer.Option(None, "--map", help="LOGMODEL=EXPERT (repeatable)"),
    map_file: Optional[Path] = typer.Option(None, "--map-file", help="JSON object {LOGMODEL: EXPERT}"),
    default: bool = typer.Option(False, "--default", help="Make it the router 'auto' uses"),
    lam: float = typer.Option(0.0, "--lambda", help="Willingness to pay: quality - lambda * cost / cost_scale"),
    min_quality: Optional[float] = typer.Option(None, "--min-quality", help="Cheapest expert at least this good"),
    max_cost: Optional[float] = typer.Option(None, "--max-cost", help="USD per call cap"),
    aggregator: Optional[str] = typer.Option(None, "--aggregator",
                                             help="Expert that merges the answers for 'router:NAME?k=K'"),
    skills_expert: Optional[str] = typer.Option(None, "--skills-expert",
                                                help="Expert asked to list each query's skills (symbolic)"),
    skills_timeout: float = typer.Option(2.0, "--skills-timeout", help="Seconds to wait for --skills-expert"),
) -> None:
    """Deploy (or replace) a router: its directory, and which expert stands for each log model."""
    from router_gateway.deployments import DeploymentInvalid, RouterDeployment, absolute_dir, check_deployment

    data = {"name": name, "router_dir": absolute_dir(str(router_dir)),
            "expert_map": _mapping(map_pairs or [], map_file),
            "default": default, "lam": lam, "min_quality": min_quality, "max_cost": max_cost,
            "aggregator": aggregator, "skills_expert": skills_expert, "skills_timeout_s": skills_timeout}
    try:
        dep = RouterDeployment.model_validate(data)
    except ValidationError as exc:
        _fail("invalid router deployment:\n" + "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or '(deployment)'}: {e['msg']}" for e in exc.errors(include_url=False)))
    store, deployments = _stores()
    try:
        found = check_deployment(dep, store.list())
    except DeploymentInvalid as exc:
        _fail(str(exc))
    created = deployments.put(dep)
    console.print(f"{'deployed' if created else 'replaced'} router [bold]{dep.name}[/bold] "
                  f"({found.router.name} router from {dep.router_dir}): model 'router:{dep.name}'"
                  + (", and 'auto' (default)" if dep.default else ""), highlight=False)
    for log_model, expert in dep.expert_map.items():
        console.print(f"  {log_model} -> {expert}", highlight=False, markup=False)
    if found.unmapped:
        console.print(f"excluded from routing (no mapping): {', '.join(found.unmapped)}", highlight=False,
                      markup=False)


@routers_app.command("list")
def routers_list(as_json: bool = typer.Option(False, "--json", help="JSON output")) -> None:
    """List deployed routers."""
    _, deployments = _stores()
    deps = deployments.list()
    if as_json:
        print(json.dumps([d.model_dump(mode="json") for d in deps], indent=2))
        return
    table = Table("name", "default", "router dir", "map (log model -> expert)", "lambda", "min quality", "max cost")
    for d in deps:
        table.add_row(d.name, "yes" if d.default else "", d.router_dir,
                      ", ".join(f"{k} -> {v}" for k, v in d.expert_map.items()), f"{d.lam:g}",
                      "-" if d.min_quality is None else f"{d.min_quality:g}",
                      "-" if d.max_cost is None else f"{d.max_cost:g}")
    console.print(table if deps else "no routers deployed")


@routers_app.command("remove")
def routers_remove(name: str) -> None:
    """Remove a router deployment (its directory is left alone)."""
    from router_gateway.deployments import DeploymentMissing

    _, deployments = _stores()
    try:
        deployments.remove(name)
    except DeploymentMissing:
        _fail(f"router '{name}' does not exist")
    console.print(f"removed router [bold]{name}[/bold]")
