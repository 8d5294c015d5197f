"""`switchyard serve --demo`: build the demo models, register them, start their vLLM workers."""

from __future__ import annotations

import logging

from rich.console import Console

from router_gateway.settings import Settings

log = logging.getLogger(__name__)


def start_demo(settings: Settings, console: Console):
    """Returns the launcher whose workers the caller stops on exit."""
    from expert_registry.launcher import WorkerLauncher, WorkerStartError
    from expert_registry.local_models import demo_expert_specs
    from expert_registry.store import ExpertStore, open_redis

    store = ExpertStore(open_redis(settings.redis_url, settings.data_dir))
    console.print(f"[bold]demo[/bold]: models under {settings.data_dir / 'models'} (built once, then cached)")
    specs = demo_expert_specs(settings.data_dir)
    for spec in specs:
        store.put(spec)  # keep the demo entries current with the built models
    console.print(f"[bold]demo[/bold]: starting vLLM CPU workers for {', '.join(s.name for s in specs)}")
    launcher = WorkerLauncher(store, settings.data_dir)
    try:
        launcher.up([s.name for s in specs])
    except WorkerStartError as exc:
        launcher.down([s.name for s in specs])
        raise SystemExit(f"demo workers failed to start: {exc}") from exc
    return launcher
