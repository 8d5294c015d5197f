"""An expert scored on few prompts (a model new to the logs, or one added with a handful
of calls) leans on the others, in the classifier and the graph router alike.

Its own prediction ``h_j(x)`` was learned from ``n`` calls. It predicts::

    w h_j(x) + (1 - w) clip(mean_base h_k(x) + s d_j),   w = n / (n + own_calls),
                                                         s = n / (n + SHIFT_CALLS)

where ``base`` are the experts scored on at least ``SPARSE_BELOW`` of the training
prompts and ``d_j`` is its mean logged score minus the base experts' mean prediction on
the same prompts. With no calls it is the base experts' mean: an average expert at its
own price.

Why it leans, and why the shift is trusted only with calls: for routing, over-rating a new
expert sends it prompts it fails; under-rating one only leaves it unused. On the held-out
models of benchmarks/new_expert.py (six, two datasets) the graph router's description-
and-graph prediction for an expert with 0-10 calls routed worse than leaving that expert
out (LLMRouter: -0.05 AIQ at worst), and a shift read off 10 calls at full weight cost
Yi-34B 0.01-0.02 AIQ on RouterBench in either router. ``SHIFT_CALLS`` = 50 was chosen on
RouterBench and held on LLMRouter and on two other splits of both (benchmarks/README.md,
"New expert with few examples").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

SPARSE_BELOW = 0.5   # share of the training prompts: an expert scored on fewer leans
SHIFT_CALLS = 50     # the shift d_j weighs n / (n + SHIFT_CALLS)
KEYS = ("base", "weight", "shift")


def fit_lean(counts: np.ndarray, n_prompts: int, own_calls: float,
             own_mean: Callable[[int], tuple[float, float]]) -> dict[str, np.ndarray] | None:
    """The lean of each expert from its scored-call ``counts`` over ``n_prompts`` training
    prompts: ``base`` (bool), ``weight`` ``w`` (1: its own prediction alone) and ``shift``
    ``s d_j``; None when every expert is a base one, or none is.

    ``own_mean(j, base)`` gives expert ``j``'s mean logged score on its own prompts and the
    ``base`` experts' mean prediction on them (called for sparse experts with calls)."""
    counts = np.asarray(counts, dtype=float)
    base = counts >= SPARSE_BELOW * n_prompts
    if base.all() or not base.any():
        return None
    weight, shift = np.ones(len(counts)), np.zeros(len(counts))
    for j in np.flatnonzero(~base):
        n = counts[j]
        weight[j] = n / (n + own_calls)
        if n:
            logged, predicted = own_mean(int(j), base)
            shift[j] = (logged - predicted) * n / (n + SHIFT_CALLS)
    return {"base": base, "weight": weight, "shift": shift}


def lean(q: np.ndarray, lean_: dict[str, np.ndarray] | None) -> np.ndarray:
    """Predictions ``q [n, m]`` with the sparse experts' columns leaning on the base ones."""
    if lean_ is None:
        return q
    prior = np.clip(q[:, lean_["base"]].mean(axis=1, keepdims=True) + lean_["shift"], 0.0, 1.0)
    return lean_["weight"] * q + (1 - lean_["weight"]) * prior


def own_weights(experts: list[str], lean_: dict[str, np.ndarray] | None) -> dict[str, float]:
    """For ``explain``: each leaning expert's own prediction's weight."""
    if lean_ is None:
        return {}
    return {e: round(float(w), 4) for e, w in zip(experts, lean_["weight"]) if w < 1}


def to_arrays(lean_: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    return {} if lean_ is None else {f"lean.{k}": np.asarray(lean_[k], dtype=float) for k in KEYS}


def from_arrays(saved: bool, arrays: dict[str, Any], m: int, router: str) -> dict[str, np.ndarray] | None:
    """The lean saved by :func:`to_arrays` (None: a router saved without one, or before
    sparse experts leaned)."""
    if not saved:
        return None
    out = {k: np.asarray(arrays[f"lean.{k}"], dtype=float) for k in KEYS}
    if any(v.shape != (m,) for v in out.values()):
        raise ValueError(f"{router} lean arrays must list {m} experts")
    return out | {"base": out["base"] > 0.5}
