"""Per-expert score models: fitted with scikit-learn, predicted and saved as plain arrays.

Scores are 0..1 and may be fractional (F1, partial credit), and an expert may have no
score logged for some prompts (NaN). Each head predicts ``[n, m]`` expected scores.

- :class:`SoftLabelLogisticRegression`: logistic regression on soft labels. A row with
  score ``s`` counts as a positive with weight ``s`` and a negative with weight ``1 - s``,
  which is exactly the cross-entropy against ``s``. A scikit-learn estimator (passes
  ``check_estimator`` where the checks apply).
- :class:`LogisticHeads`: one soft-label logistic regression per expert, kept as
  ``W [d, m]``, ``b [m]``; ``predict = sigmoid(X @ W + b)``.
- :class:`MLPHead`: one multi-output MLP regressor (ReLU, one hidden layer) on all
  experts at once; missing scores are filled with the expert's mean for training.

Prediction is numpy (and scipy.sparse for TF-IDF) so a saved head predicts exactly what
the fitted one did, and the gateway needs no scikit-learn object at serving time.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import _check_sample_weight, check_is_fitted, validate_data


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


class SoftLabelLogisticRegression(RegressorMixin, BaseEstimator):
    """Logistic regression whose targets are probabilities in [0, 1].

    Minimises ``sum_i w_i [s_i log p_i + (1 - s_i) log(1 - p_i)] + ||coef||^2 / (2C)``
    with ``p_i = sigmoid(x_i . coef + intercept)``; ``predict`` returns ``p``.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000):
        self.C = C
        self.max_iter = max_iter

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # fit/predict take CSR (TF-IDF features)
        return tags

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> "SoftLabelLogisticRegression":
        from sklearn.linear_model import LogisticRegression

        X, y = validate_data(self, X, y, accept_sparse="csr", y_numeric=True,
                             dtype=[np.float64, np.float32])
        y = np.asarray(y, dtype=float)
        if np.any((y < 0) | (y > 1)):
            raise ValueError("SoftLabelLogisticRegression needs targets in [0, 1]")
        # Validated: right length, non-negative, not all zero.
        w = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
        n = X.shape[0]
        self.coef_ = np.zeros(X.shape[1])
        pos, neg = w * y, w * (1.0 - y)
        if pos.sum() <= 0 or neg.sum() <= 0:  # one class only: a constant predictor
            p = float(np.clip(pos.sum() / w.sum(), 1e-6, 1 - 1e-6))  # weighted mean of y
            self.intercept_ = float(np.log(p / (1 - p)))
            self.n_iter_ = 1  # closed form
            return self
        from scipy import sparse

        X2 = sparse.vstack([X, X]).tocsr() if sparse.issparse(X) else np.vstack([X, X])
        y2 = np.r_[np.ones(n), np.zeros(n)]
        w2 = np.r_[pos, neg]
        keep = w2 > 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr = LogisticRegression(C=self.C, max_iter=self.max_iter)
            lr.fit(X2[keep], y2[keep], sample_weight=w2[keep])
        self.coef_ = lr.coef_[0].astype(float)
        self.intercept_ = float(lr.intercept_[0])
        self.n_iter_ = int(np.max(lr.n_iter_))
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "coef_")
        X = validate_data(self, X, accept_sparse="csr", reset=False,
                          dtype=[np.float64, np.float32])
        return np.asarray(X @ self.coef_).ravel() + self.intercept_

    def predict(self, X: Any) -> np.ndarray:
        return _sigmoid(self.decision_function(X))


class LogisticHeads:
    """Per-expert soft-label logistic regression; ``W [d, m]``, ``b [m]``."""

    kind = "logreg"

    def __init__(self, C: float = 1.0):
        self.C = C

    def fit(self, X: Any, Y: np.ndarray) -> "LogisticHeads":
        d, m = X.shape[1], Y.shape[1]
        self.W = np.zeros((d, m))
        self.b = np.zeros(m)
        for j in range(m):
            ok = ~np.isnan(Y[:, j])
            if not ok.any():
                continue
            est = SoftLabelLogisticRegression(C=self.C).fit(X[ok], Y[ok, j])
            self.W[:, j], self.b[j] = est.coef_, est.intercept_
        return self

    def logits(self, X: Any) -> np.ndarray:
        return np.asarray(X @ self.W) + self.b

    def predict(self, X: Any) -> np.ndarray:
        return _sigmoid(self.logits(X))

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"kind": self.kind, "C": self.C}, {"head.W": self.W, "head.b": self.b}

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "LogisticHeads":
        self = cls(C=state["C"])
        self.W, self.b = arrays["head.W"], arrays["head.b"]
        return self


class MLPHead:
    """One hidden ReLU layer, multi-output, squared error on scores (sklearn's
    MLPRegressor with early stopping); predictions clipped to [0, 1] by the router."""

    kind = "mlp"

    def __init__(self, hidden: int = 128, alpha: float = 1e-3, seed: int = 0):
        self.hidden = hidden
        self.alpha = alpha
        self.seed = seed

    def fit(self, X: Any, Y: np.ndarray) -> "MLPHead":
        from sklearn.neural_network import MLPRegressor

        means = np.nan_to_num(np.nanmean(np.where(np.isnan(Y), np.nan, Y), axis=0))
        Yf = np.where(np.isnan(Y), means[None, :], Y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            mlp = MLPRegressor(hidden_layer_sizes=(self.hidden,), alpha=self.alpha, max_iter=300,
                               early_stopping=X.shape[0] >= 50, random_state=self.seed)
            mlp.fit(X, Yf)
        self.W1, self.W2 = mlp.coefs_
        self.b1, self.b2 = mlp.intercepts_
        return self

    def predict(self, X: Any) -> np.ndarray:
        h = np.maximum(np.asarray(X @ self.W1) + self.b1, 0.0)
        return h @ self.W2 + self.b2

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"kind": self.kind, "hidden": self.hidden, "alpha": self.alpha,
                 "seed": self.seed},
                {"head.W1": self.W1, "head.b1": self.b1, "head.W2": self.W2,
                 "head.b2": self.b2})

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "MLPHead":
        self = cls(hidden=state["hidden"], alpha=state["alpha"], seed=state["seed"])
        self.W1, self.b1 = arrays["head.W1"], arrays["head.b1"]
        self.W2, self.b2 = arrays["head.W2"], arrays["head.b2"]
        return self


HEADS = {"logreg": LogisticHeads, "mlp": MLPHead}


def make_head(spec: dict) -> Any:
    """A head from ``{"kind": ..., **hyper-parameters}``."""
    kind = spec["kind"]
    if kind not in HEADS:
        raise ValueError(f"unknown model {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](**{k: v for k, v in spec.items() if k != "kind"})


def head_from_state(state: dict, arrays: dict[str, np.ndarray]) -> Any:
    return HEADS[state["kind"]].from_state(state, arrays)
