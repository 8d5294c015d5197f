"""``switchyard collab``: train the fleet's collaboration groups and register them.

``collab train logit`` trains the logit-addition router, ``collab train latent`` the
latent-fusion router and interaction layers, on the fleet built by ``fleet build``
(built first if missing). Both are resumable: an interrupted run continues from its
cached features and last checkpoint (``--fresh`` starts over). The trained group is
registered as ``fleet-<mode>`` (backend ``collab``); ``switchyard workers up`` starts its
worker and clients call it as ``model: "collab:fleet-<mode>"``.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from router_gateway.cli_common import console
from router_gateway.cli_common import fail as _fail
from router_gateway.settings import Settings

collab_app = typer.Typer(help="Train and list the fleet's collaboration groups (logit addition, latent fusion).",
                         no_args_is_help=True)


@collab_app.command("train")
def train_cmd(
    mode: str = typer.Argument(..., help="logit (logit addition) or latent (latent fusion)"),
    quick: bool = typer.Option(False, "--quick", help="The quick fleet and a few steps (CI; a first look)"),
    per_domain: Optional[int] = typer.Option(None, "--per-domain", min=1,
                                             help="Training tasks per domain (default 200; 8 with --quick)"),
    fresh: bool = typer.Option(False, "--fresh", help="Discard cached features and checkpoints first"),
    contrastive_beta: Optional[float] = typer.Option(None, "--contrastive-beta", min=0.0,
                                                     help="logit: serve z_strong - beta * z_weak (after SCMoE)"),
    register: bool = typer.Option(True, "--register/--no-register", help="Put the group in the registry"),
    as_json: bool = typer.Option(False, "--json", help="Print the training report as JSON"),
) -> None:
    """Train MODE's head on the fleet, write its group file and register the group."""
    from expert_registry.fleet.collab_groups import MODES, group_file, group_specs, train_group
    from expert_registry.local_models import ModelBuildError

    if mode not in MODES:
        _fail(f"mode must be one of {', '.join(MODES)}, not '{mode}'")
    if contrastive_beta is not None and mode != "logit":
        _fail("--contrastive-beta applies to logit addition only")
    settings = Settings()
    try:
        report = train_group(settings.data_dir, mode, quick=quick, per_domain=per_domain, fresh=fresh,
                             progress=not as_json, contrastive_beta=contrastive_beta)
    except (ModelBuildError, ValueError) as exc:
        _fail(str(exc))
    spec = next(s for s in group_specs(settings.data_dir, quick=quick) if s.launch.model_path ==
                str(group_file(settings.data_dir, mode, quick)))
    if register:
        from router_gateway.cli_fleet import _open_store
        from expert_registry.store import close_redis

        store = _open_store(settings)
        try:
            store.put(spec)
        finally:
            close_redis(store.client)
    if as_json:
        console.print_json(json.dumps({"group": spec.name, "group_file": spec.launch.model_path, "report": report}))
        return
    console.print(f"trained [bold]{spec.name}[/bold]; group file {spec.launch.model_path}")
    for key, value in report.items():
        if not isinstance(value, (dict, list)):
            console.print(f"  {key}: {value}", markup=False)
    if register:
        console.print(f"registered; start it with `switchyard workers up {spec.name}` and call "
                      f"model 'collab:{spec.name}'", markup=False)


@collab_app.command("list")
def list_cmd(quick: bool = typer.Option(False, "--quick", help="The quick fleet's groups")) -> None:
    """The trained groups under DATA_DIR/collab and their group files."""
    from expert_registry.fleet.collab_groups import group_specs

    specs = group_specs(Settings().data_dir, quick=quick)
    if not specs:
        console.print("no trained groups; train one with `switchyard collab train logit` (or latent)")
        return
    for s in specs:
        console.print(f"collab:{s.name}  {s.launch.model_path}", markup=False)
