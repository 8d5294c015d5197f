"""The classifier router: query features -> a scikit-learn model of each expert's score.

Features are MiniLM sentence embeddings (default) or TF-IDF (fast). The score model is
chosen and tuned by k-fold cross-validation by prompt on the training logs: every
candidate (soft-label logistic regression over a grid of C, a one-hidden-layer MLP)
predicts the held-out fold, and the candidate whose out-of-fold predictions route best
(highest AIQ over the cost knob, Brier score breaking ties) is refitted on all logs.
The table of candidates is kept in the artifact and shown by ``explain``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from router_models.base import Router
from router_models.featurize import FEATURIZERS, QUERY_PIECES, QueryCut, make_featurizer
from router_models.logs import BenchmarkLogs
from router_models.metrics import evaluate_router, reference_points

log = logging.getLogger(__name__)

CANDIDATES: dict[str, list[dict]] = {
    "logreg": [{"kind": "logreg", "C": c} for c in (0.1, 0.3, 1.0, 3.0)],
    "mlp": [{"kind": "mlp", "hidden": 128, "alpha": a} for a in (1e-3, 1e-2)],
}


def _fold_ids(n: int, k: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n) % k


def cross_validate(X: Any, Y: np.ndarray, costs: np.ndarray, c_hat: np.ndarray,
                   candidates: list[dict], k: int = 5, seed: int = 0,
                   progress: bool = False) -> list[dict]:
    """Out-of-fold routing quality of each candidate head. Returns one row per candidate:
    ``{"model": spec, "aiq": float, "brier": float}`` (AIQ on prompts with every score and
    cost logged)."""
    from tqdm import tqdm

    from router_models.estimators import make_head  # sklearn (and pandas) only when training

    n = Y.shape[0]
    folds = _fold_ids(n, min(k, n), seed)
    full = ~np.isnan(Y).any(axis=1) & ~np.isnan(costs).any(axis=1)
    ref = reference_points(Y[full], costs[full]) if full.any() else None
    rows = []
    bar = tqdm(total=len(candidates) * k, desc="cross-validation", disable=not progress,
               unit="fit")
    for spec in candidates:
        oof = np.zeros_like(Y)
        for f in range(min(k, n)):
            tr, te = folds != f, folds == f
            oof[te] = make_head(spec).fit(X[tr], Y[tr]).predict(X[te])
            bar.update(1)
        oof = np.clip(oof, 0.0, 1.0)
        err = (oof - Y)[~np.isnan(Y)]
        aiq = (evaluate_router("cv", Y[full], costs[full], oof[full], c_hat[full], ref=ref).aiq
               if ref is not None else float("nan"))
        rows.append({"model": spec, "aiq": float(aiq), "brier": float(np.mean(err ** 2))})
    bar.close()
    return rows


SHRINK_BELOW = 0.5   # share of the prompts: an expert scored on fewer leans on the others
SHRINK_CALLS = 200   # K: such an expert's own head weighs n / (n + K) of its prediction


class ClassifierRouter(QueryCut, Router):
    """Query features -> one score model (head) per expert, chosen by cross-validation.

    An expert scored on fewer than ``SHRINK_BELOW`` of the training prompts (a model new
    to the logs, with ``n`` calls) has a head fitted on little. Its prediction leans on the
    others: ``w h_j(x) + (1 - w) clip(mean_base h_k(x) + d_j)``, ``w = n / (n + SHRINK_CALLS)``,
    where ``base`` are the experts scored on at least that share and ``d_j`` shifts their
    mean to the new expert's mean logged score on its own prompts. On the held-out
    experts of benchmarks/new_expert.py this routed better at 10-50 calls (Yi-34B on
    RouterBench +0.021 at 10, qwen2.5-7b on LLMRouter +0.009 at 50) and within 0.003 of
    the head alone otherwise (benchmarks/README.md, "New expert with few examples").
    """

    name = "classifier"

    def __init__(self, featurizer: str = "minilm", model: str = "auto", cv: int = 5,
                 seed: int = 0, query_pieces: int = QUERY_PIECES, query_keep: str = "tail"):
        self.featurizer = featurizer
        self.model = model
        self.cv = cv
        self.seed = seed
        self.query_pieces = query_pieces   # MiniLM's cut; TF-IDF reads the whole query
        self.query_keep = query_keep

    def _candidates(self) -> list[dict]:
        if self.model == "auto":
            return CANDIDATES["logreg"] + CANDIDATES["mlp"]
        if self.model not in CANDIDATES:
            raise ValueError(f"unknown model {self.model!r}; choose auto or one of "
                             f"{sorted(CANDIDATES)}")
        return CANDIDATES[self.model]

    def _fit(self, logs: BenchmarkLogs) -> None:
        from router_models.estimators import make_head

        if self.featurizer not in FEATURIZERS:
            raise ValueError(f"unknown featurizer {self.featurizer!r}; choose one of "
                             f"{sorted(FEATURIZERS)}")
        self.featurizer_ = (self._minilm() if self.featurizer == "minilm"
                            else make_featurizer(self.featurizer)).fit(logs.prompts)
        X = self.featurizer_.transform(logs.prompts)
        Y = np.asarray(logs.scores, dtype=float)
        candidates = self._candidates()
        if len(candidates) > 1 and self.cv >= 2 and logs.n_prompts >= 2 * self.cv:
            c_hat = self._training_costs(logs, X)
            self.cv_results_ = cross_validate(X, Y, logs.costs, c_hat, candidates,
                                              k=self.cv, seed=self.seed,
                                              progress=logs.n_prompts > 1000)
            best = max(self.cv_results_, key=lambda r: (np.nan_to_num(r["aiq"], nan=-1.0),
                                                        -r["brier"]))
            spec = best["model"]
        else:
            self.cv_results_ = []
            spec = candidates[0]
        log.info("classifier: %s features, model %s", self.featurizer, spec)
        self.head_ = make_head(spec).fit(X, Y)
        self._fit_lean(X, Y)

    def _fit_lean(self, X: Any, Y: np.ndarray) -> None:
        """``lean_``: per expert the head's weight ``w`` (1: its head alone) and shift ``d``
        of the class docstring's formula, and the ``base`` experts; None if no expert is
        scored on few prompts (or none on many)."""
        counts = (~np.isnan(Y)).sum(axis=0)
        base = counts >= SHRINK_BELOW * len(Y)
        sparse = (counts > 0) & ~base
        self.lean_ = None
        if not (sparse.any() and base.any()):
            return
        ref = self.head_.predict(X)[:, base].mean(axis=1)
        weight, shift = np.ones(Y.shape[1]), np.zeros(Y.shape[1])
        for j in np.flatnonzero(sparse):
            ok = ~np.isnan(Y[:, j])
            weight[j] = counts[j] / (counts[j] + SHRINK_CALLS)
            shift[j] = Y[ok, j].mean() - ref[ok].mean()
        self.lean_ = {"base": base, "weight": weight, "shift": shift}

    def _predict(self, queries: list[str]) -> np.ndarray:
        q = self.head_.predict(self.featurizer_.transform(queries))
        lean = getattr(self, "lean_", None)
        if lean is None:
            return q
        prior = np.clip(q[:, lean["base"]].mean(axis=1, keepdims=True) + lean["shift"], 0.0, 1.0)
        return lean["weight"] * q + (1 - lean["weight"]) * prior

    def _explain(self, query: str) -> dict[str, Any]:
        out: dict[str, Any] = {"features": self.featurizer,
                               "model": self.head_.state()[0],
                               "cross_validation": self.cv_results_}
        if getattr(self, "lean_", None) is not None:   # experts scored on few prompts
            out["own_head_weight"] = {e: round(float(w), 4) for e, w in
                                      zip(self.experts_, self.lean_["weight"]) if w < 1}
        if self.featurizer == "tfidf" and self.head_.kind == "logreg":
            # Terms that pushed each expert's predicted score up the most.
            x = self.featurizer_.transform([query]).tocsr()
            names = self.featurizer_.feature_names()
            top = {}
            for j, e in enumerate(self.experts_):
                contrib = x.data * self.head_.W[x.indices, j]
                order = np.argsort(-contrib)[:5]
                top[e] = [[str(names[x.indices[i]]), round(float(contrib[i]), 4)]
                          for i in order]
            out["top_terms"] = top
        return out

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        fstate, farrays = self.featurizer_.state()
        hstate, harrays = self.head_.state()
        lean = getattr(self, "lean_", None)
        larrays = {} if lean is None else {f"lean.{k}": np.asarray(v, dtype=float) for k, v in lean.items()}
        return ({"featurizer": fstate, "head": hstate, "cv_results": self.cv_results_,
                 "lean": lean is not None}, {**farrays, **harrays, **larrays})

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        from router_models.estimators import head_from_state

        if state["featurizer"]["name"] == "minilm":
            self.featurizer_ = self._minilm_from_state(state["featurizer"])
        else:
            self.featurizer_ = FEATURIZERS[state["featurizer"]["name"]].from_state(
                state["featurizer"], arrays)
        self.head_ = head_from_state(state["head"], arrays)
        self.cv_results_ = state["cv_results"]
        self.lean_ = None   # saved before experts scored on few prompts leaned on the others
        if state.get("lean"):
            m = len(self.experts_)
            lean = {k: np.asarray(arrays[f"lean.{k}"], dtype=float) for k in ("base", "weight", "shift")}
            if any(v.shape != (m,) for v in lean.values()):
                raise ValueError(f"classifier lean arrays must list {m} experts")
            self.lean_ = lean | {"base": lean["base"] > 0.5}
