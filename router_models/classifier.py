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

from router_models import sparse
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


def cv_rank(row: dict) -> tuple[float, float]:
    """How model selection orders a cross-validation row: AIQ (NaN last), then Brier score."""
    return float(np.nan_to_num(row["aiq"], nan=-1.0)), -row["brier"]


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


SHRINK_CALLS = 200   # an expert scored on few prompts: its own head weighs n / (n + K)


class ClassifierRouter(QueryCut, Router):
    """Query features -> one score model (head) per expert, chosen by cross-validation.

    An expert scored on few prompts (a model new to the logs, with ``n`` calls) has a head
    fitted on little: its prediction leans on the other experts' mean prediction, its head
    weighing ``n / (n + SHRINK_CALLS)`` (:mod:`router_models.sparse`).
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
            best = max(self.cv_results_, key=cv_rank)
            spec = best["model"]
        else:
            self.cv_results_ = []
            spec = candidates[0]
        log.info("classifier: %s features, model %s", self.featurizer, spec)
        self.head_ = make_head(spec).fit(X, Y)
        self._fit_lean(X, Y)

    def _fit_lean(self, X: Any, Y: np.ndarray) -> None:
        """``lean_`` (:func:`router_models.sparse.fit_lean`); None if no expert is scored on
        few prompts."""
        pred = self.head_.predict(X)

        def own_mean(j: int, base: np.ndarray) -> tuple[float, float]:
            ok = ~np.isnan(Y[:, j])
            return float(Y[ok, j].mean()), float(pred[ok][:, base].mean())

        self.lean_ = sparse.fit_lean((~np.isnan(Y)).sum(axis=0), len(Y), SHRINK_CALLS, own_mean)

    def _predict(self, queries: list[str]) -> np.ndarray:
        q = self.head_.predict(self.featurizer_.transform(queries))
        return sparse.lean(q, getattr(self, "lean_", None))

    def _explain(self, query: str) -> dict[str, Any]:
        out: dict[str, Any] = {"features": self.featurizer,
                               "model": self.head_.state()[0],
                               "cross_validation": self.cv_results_}
        if getattr(self, "lean_", None) is not None:   # experts scored on few prompts
            out["own_head_weight"] = sparse.own_weights(self.experts_, self.lean_)
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
        return ({"featurizer": fstate, "head": hstate, "cv_results": self.cv_results_,
                 "lean": lean is not None}, {**farrays, **harrays, **sparse.to_arrays(lean)})

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        from router_models.estimators import head_from_state

        if state["featurizer"]["name"] == "minilm":
            self.featurizer_ = self._minilm_from_state(state["featurizer"])
        else:
            self.featurizer_ = FEATURIZERS[state["featurizer"]["name"]].from_state(
                state["featurizer"], arrays)
        self.head_ = head_from_state(state["head"], arrays)
        self.cv_results_ = state["cv_results"]
        # an artifact saved before experts scored on few prompts leaned on the others has none
        self.lean_ = sparse.from_arrays(bool(state.get("lean")), arrays, len(self.experts_), "classifier")
