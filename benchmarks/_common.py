"""What every benchmark script records and how it writes its README section.

Imported by the scripts in this folder (run as ``python benchmarks/<name>.py``, which puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def machine_facts() -> dict:
    """CPU model, cores, Python, OS and the load average when the run started."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        found = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = found.group(1).strip() if found else model
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "loadavg_at_start": os.getloadavg()}


def git_commit() -> str | None:
    """HEAD of the checkout being measured, ``+dirty`` with uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True)
    except OSError:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else None


def rewrite_section(path: Path, begin: str, end: str, section: str, heading: str) -> None:
    """Replace the text between the ``begin``/``end`` markers of ``path``; when they are
    missing, append ``heading`` and the marked section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(text)


def save_report(report: dict, results: Path, stem: str, when=None) -> Path:
    """Write ``report`` to ``results/<stem>-<UTC stamp>.json`` (stamp of ``when``, default
    now) and record that path in ``report["json"]``, relative to benchmarks/ when inside it."""
    import datetime as dt
    import json

    when = when or dt.datetime.now(dt.timezone.utc)
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{stem}-{when.strftime('%Y%m%dT%H%M%SZ')}.json"
    report["json"] = str(out)
    with contextlib.suppress(ValueError):
        report["json"] = str(out.resolve().relative_to(HERE))
    out.write_text(json.dumps(report, indent=1) + "\n")
    return out


def expert_descriptions(path: Path) -> dict[str, str] | None:
    """LLMRouter's models.json carries a text description per model (the graph router's
    expert features); other layouts have none (the model name stands in)."""
    f = path / "models.json" if path.is_dir() else None
    if f is None or not f.is_file():
        return None
    with contextlib.suppress(ValueError, AttributeError):
        return {name: str(m.get("description") or m.get("feature") or name)
                for name, m in json.loads(f.read_text()).items() if isinstance(m, dict)}
    return None
