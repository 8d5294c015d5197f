"""kNN router (RouterBench's baseline): a query's predicted score for each expert is the
mean logged score of its ``k`` nearest training prompts (cosine on MiniLM embeddings).

    q[i, j] = mean_{t in N_k(x_i)} s[t, j]     (NaN scores skipped; none -> expert mean)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from router_models.base import Router
from router_models.featurize import QUERY_PIECES, QueryCut
from router_models.logs import BenchmarkLogs


def neighbour_mean(sims: np.ndarray, Y: np.ndarray, k: int, fill: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims [n, t]``: the top-``k`` training rows and the nan-mean of their
    ``Y [t, m]`` (``fill [m]`` where all neighbours miss a score)."""
    k = min(k, sims.shape[1])
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    picked = Y[idx]                                   # [n, k, m]
    have = ~np.isnan(picked)
    total = np.where(have, picked, 0.0).sum(axis=1)
    count = have.sum(axis=1)
    q = np.where(count > 0, total / np.maximum(count, 1), fill[None, :])
    return q, idx


class KNNRouter(QueryCut, Router):
    name = "knn"

    def __init__(self, k: int = 40, query_pieces: int = QUERY_PIECES, query_keep: str = "tail"):
        self.k = k
        self.query_pieces = query_pieces
        self.query_keep = query_keep

    def _fit(self, logs: BenchmarkLogs) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        self.featurizer_ = self._minilm()
        self.X_ = self.featurizer_.transform(logs.prompts)
        self.Y_ = np.asarray(logs.scores, dtype=np.float32)
        self.prompt_ids_ = list(logs.prompt_ids)
        self.fill_ = np.nan_to_num(np.nanmean(np.where(np.isnan(self.Y_), np.nan, self.Y_), axis=0))

    def _neighbours(self, queries: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        X = self.featurizer_.transform(queries)
        sims = X @ self.X_.T
        q, idx = neighbour_mean(sims, self.Y_, self.k, self.fill_)
        return q, idx, sims

    def _predict(self, queries: list[str]) -> np.ndarray:
        return self._neighbours(queries)[0]

    def _explain(self, query: str) -> dict[str, Any]:
        _, idx, sims = self._neighbours([query])
        order = idx[0][np.argsort(-sims[0, idx[0]])][:5]
        return {"neighbours": [{"prompt_id": self.prompt_ids_[t],
                                "similarity": round(float(sims[0, t]), 4)} for t in order]}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"prompt_ids": self.prompt_ids_, "featurizer": self.featurizer_.state()[0]},
                {"X": self.X_, "Y": self.Y_, "fill": self.fill_.astype(np.float32)})

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self.featurizer_ = self._minilm_from_state(state.get("featurizer"))
        self.prompt_ids_ = list(state["prompt_ids"])
        self.X_, self.Y_ = arrays["X"], arrays["Y"]
        self.fill_ = arrays["fill"].astype(float)
