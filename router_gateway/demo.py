"""`switchyard serve --demo`: build the fleet, register it, start its vLLM worker.

The demo is the specialised fleet (``expert_registry.fleet.build``): the generalist and
its domain experts, all served by one vLLM worker (one LoRA adapter per expert).
Registry entries of an earlier demo that are no longer part of it are removed.
"""

from __future__ import annotations

import logging

from rich.console import Console

from router_gateway.settings import Settings

log = logging.getLogger(__name__)


def start_demo(settings: Settings, console: Console, quick: bool = False):
    """Returns the launcher whose workers the caller stops on exit."""
    from expert_registry.fleet.build import fleet_expert_specs
    from expert_registry.launcher import WorkerLauncher, WorkerStartError
    from expert_registry.store import ExpertStore, open_redis

    store = ExpertStore(open_redis(settings.redis_url, settings.data_dir))
    console.print(f"[bold]demo[/bold]: models under {settings.data_dir / 'models'} (built once, then cached)")
    from expert_registry.fleet.collab_groups import group_specs

    # Collaboration groups join once trained (`switchyard collab train logit|latent`).
    specs = fleet_expert_specs(settings.data_dir, quick=quick) + group_specs(settings.data_dir, quick=quick)
    names = {s.name for s in specs}
    for old in store.list():
        if "demo" in old.tags and old.name not in names:
            store.remove(old.name)
    for spec in specs:
        store.put(spec)  # keep the demo entries current with the built models
    hosts = [s.name for s in specs if s.launch is not None]
    console.print(f"[bold]demo[/bold]: starting the CPU workers serving {', '.join(s.name for s in specs)}")
    launcher = WorkerLauncher(store, settings.data_dir)
    try:
        launcher.up(hosts)
    except WorkerStartError as exc:
        launcher.down(hosts)
        raise SystemExit(f"demo workers failed to start: {exc}") from exc
    from router_gateway.fleet_router import deploy_fleet_router, ensure_fleet_router

    source = ensure_fleet_router(settings.data_dir)
    deployed = deploy_fleet_router(store, settings.data_dir, names)
    if deployed:
        origin = ("this machine's `fleet eval` logs" if source == "own" else
                  "the evaluation logs shipped with Switchyard (`switchyard fleet eval` retrains it on yours)")
        console.print(f"[bold]demo[/bold]: routing with {deployed}, trained on {origin}")
    else:
        console.print("[bold]demo[/bold]: the fleet router maps to fewer than two registered experts; "
                      "name an expert in `model`")
    return launcher
