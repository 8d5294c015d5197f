"""The fleet eval's report: mean score per expert x domain, the oracle and the best
single expert, mean cost and latency; as a rich table, JSON, or a matplotlib heat-map.

It reads the JSONL through ``router_models.logs.load_logs`` (the reader routers are
trained with), so a report is also a check that the written rows are valid logs; what
the loader dropped or merged is listed under ``notes``. It needs nothing but the file,
so ``switchyard fleet eval --report-only`` re-reports and re-plots an earlier run.

    oracle       per prompt the best score any reported expert got, averaged
    best single  the expert with the best overall mean score (ties: the cheaper, then by name)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from expert_registry.fleet.domains import DOMAINS


@dataclass
class Cell:
    mean: float | None  # None when no row
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "n": self.n}


@dataclass
class ReportRow:
    name: str
    domains: dict[str, Cell]
    overall: Cell
    mean_cost_usd: float | None = None
    mean_latency_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"domains": {d: c.to_dict() for d, c in self.domains.items()}, "overall": self.overall.to_dict(),
                "mean_cost_usd": self.mean_cost_usd, "mean_latency_s": self.mean_latency_s}


@dataclass
class FleetReport:
    source: str
    domains: list[str]
    experts: list[ReportRow]
    oracle: ReportRow
    best_single: str | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "domains": list(self.domains),
                "experts": {r.name: r.to_dict() for r in self.experts},
                "oracle": self.oracle.to_dict(), "best_single": self._best_dict(), "notes": list(self.notes)}

    def _best_dict(self) -> dict[str, Any] | None:
        row = next((r for r in self.experts if r.name == self.best_single), None)
        return None if row is None else {"expert": row.name, **row.to_dict()}


def _mean(values: np.ndarray) -> Cell:
    v = values[~np.isnan(values)]
    return Cell(float(v.mean()) if v.size else None, int(v.size))


def _nanmean(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    v = values[~np.isnan(values)]
    return float(v.mean()) if v.size else None


def _ordered_domains(labels: set[str]) -> list[str]:
    return [d for d in DOMAINS if d in labels] + sorted(labels - set(DOMAINS))


def build_report(path: str | Path, experts: Sequence[str] | None = None,
                 domains: Sequence[str] | None = None) -> FleetReport:
    """The report of the rows in ``path``, optionally only for some experts and task labels."""
    from router_models.logs import load_logs

    logs = load_logs(path, format="rows-jsonl")
    if experts:
        logs = logs.select_experts([e for e in experts if e in logs.experts])
    tasks = np.asarray(logs.tasks, dtype=object)
    if domains:
        logs = logs.subset(np.flatnonzero(np.isin(tasks, list(domains))))
        tasks = np.asarray(logs.tasks, dtype=object)
    names = _ordered_domains(set(logs.tasks))
    scores = logs.scores
    rows = []
    for j, name in enumerate(logs.experts):
        col = scores[:, j]
        rows.append(ReportRow(name, {d: _mean(col[tasks == d]) for d in names}, _mean(col),
                              _nanmean(logs.costs[:, j]),
                              _nanmean(None if logs.latency_s is None else logs.latency_s[:, j])))
    with np.errstate(all="ignore"):
        any_row = ~np.all(np.isnan(scores), axis=1) if scores.size else np.zeros(len(tasks), bool)
        best = np.full(len(tasks), np.nan)
        best[any_row] = np.nanmax(scores[any_row], axis=1)
    oracle = ReportRow("oracle", {d: _mean(best[tasks == d]) for d in names}, _mean(best))
    ranked = sorted((r for r in rows if r.overall.mean is not None),
                    key=lambda r: (-r.overall.mean, math.inf if r.mean_cost_usd is None else r.mean_cost_usd, r.name))
    return FleetReport(str(path), names, rows, oracle, ranked[0].name if ranked else None, list(logs.report.notes))


# --- showing it -------------------------------------------------------------------------
def _fmt(cell: Cell) -> str:
    return "-" if cell.mean is None else f"{cell.mean:.3f} ({cell.n})"


def render_table(report: FleetReport, console) -> None:
    """Print the report as a rich table: experts, oracle and best single x domains."""
    from rich.table import Table

    table = Table("expert", *report.domains, "overall", "mean $/call", "mean latency s",
                  title=f"fleet eval: mean score (n) from {report.source}")
    for r in report.experts:
        table.add_row(r.name, *(_fmt(r.domains[d]) for d in report.domains), _fmt(r.overall),
                      "-" if r.mean_cost_usd is None else f"{r.mean_cost_usd:.3g}",
                      "-" if r.mean_latency_s is None else f"{r.mean_latency_s:.2f}")
    table.add_section()
    table.add_row("[bold]oracle[/bold]", *(_fmt(report.oracle.domains[d]) for d in report.domains),
                  _fmt(report.oracle.overall), "", "")
    best = next((r for r in report.experts if r.name == report.best_single), None)
    if best is not None:
        table.add_row(f"[bold]best single[/bold] ({best.name})", *(_fmt(best.domains[d]) for d in report.domains),
                      _fmt(best.overall), "", "")
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}")


def plot_heatmap(report: FleetReport, png: str | Path) -> Path:
    """Experts and the oracle (rows) x domains and overall (columns), values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*report.experts, report.oracle]
    cols = [*report.domains, "overall"]
    grid = np.array([[np.nan if c.mean is None else c.mean for c in (*(r.domains[d] for d in report.domains),
                                                                      r.overall)] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.0 + 0.5 * len(rows)))
    try:
        im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(cols)), labels=cols)
        ax.set_yticks(range(len(rows)), labels=[r.name for r in rows])
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid[i, j]
                ax.text(j, i, "-" if np.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        color="black" if not np.isnan(v) and v > 0.6 else "white", fontsize=9)
        ax.axhline(len(rows) - 1.5, color="white", linewidth=2)  # experts above, oracle below
        fig.colorbar(im, ax=ax, label="mean score")
        ax.set_title("fleet eval (held-out)")
        fig.tight_layout()
        png = Path(png)
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=120)
    finally:
        plt.close(fig)
    return png
