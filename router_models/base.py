"""The Router contract, the per-expert cost model, and safe artifact files.

A router is scikit-learn style (DESIGN.md): ``__init__`` stores hyper-parameters only,
``fit(logs)`` returns ``self``, learned state ends in ``_``::

    router = ROUTERS["classifier"](featurizer="minilm").fit(train_logs)
    q = router.predict_quality(["What is 2+2?"])     # [1, len(router.experts_)]
    c = router.predict_cost(["What is 2+2?"])        # USD per call, same columns
    router.save("out/"); same = load_router("out/")

Artifacts are a directory: ``router.json`` (class name, hyper-parameters, experts,
cost model, whatever small state) plus ``arrays.safetensors`` for the arrays. Nothing
is ever unpickled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from router_models.logs import BenchmarkLogs
from router_models.sparse import SPARSE_BELOW

log = logging.getLogger(__name__)

ARTIFACT_VERSION = 1
ROUTER_FILE = "router.json"
ARRAYS_FILE = "arrays.safetensors"


class NotFittedError(RuntimeError):
    """A router was used before ``fit`` (or ``load``)."""


class ArtifactError(ValueError):
    """A router directory is missing, incomplete or from an unknown router."""


class CostModel:
    """Per-expert cost of one call, from the prompt's length and, when the router has
    features, from what kind of prompt it is.

    The length part: ``lin_j(prompt) = a_j + b_j * chars(prompt)``, least squares on the
    logged calls of expert ``j`` with ``a_j, b_j >= 0`` (a negative fit falls back to the
    expert's mean cost). Prompt length drives input tokens.

    The kind part (``fit_ratio``): the answer's length, which the length part can only
    average, depends on the question (a coding task gets a long answer, a multiple-choice
    one a letter). A ridge regression per expert on the router's query features ``x``
    predicts the ratio of the logged cost to the length part::

        cost_j(prompt) = lin_j(prompt) * clip(w_j . x + u_j, RATIO_MIN, RATIO_MAX)

    fitted on ``cost / lin_j`` (a missing cost counts as ratio 1). On RouterBench this
    cuts the mean absolute error of out-of-fold cost predictions 2.6x (GPT-4 costs $0.0094
    per MBPP question and $0.0035 per Winogrande one, with the longer prompt).

    An expert added after fitting (:meth:`add_expert`) has only a price. Its cost for a
    question is that price times the fitted experts' mean relative cost for it,
    ``mean_k cost_k(prompt) / typical_k`` (``typical``: each expert's mean predicted cost
    over the training prompts, which :meth:`Router.fit` records), so it averages its
    price and follows the kind of question as the others do. A flat price among
    kind-aware ones misroutes: on LLMRouter a held-out expert priced flat cost the
    classifier up to 0.028 of routing AIQ; priced this way it scored as well as with its
    true logged cost (benchmarks/README.md, "New expert with few examples"). A model saved
    without ``typical`` prices added experts flat. An expert in the training logs with
    costs for few of the prompts is priced the same way (:meth:`fit_ratio`).
    """

    RATIO_MIN, RATIO_MAX = 0.05, 20.0
    # share of the prompts: an expert logged on fewer is priced by shape (and its quality
    # leans on the other experts', router_models.sparse)
    SHAPED_BELOW = SPARSE_BELOW

    def __init__(self, intercept: np.ndarray, slope: np.ndarray,
                 ratio_coef: np.ndarray | None = None, ratio_bias: np.ndarray | None = None):
        self.intercept = np.asarray(intercept, dtype=float)
        self.slope = np.asarray(slope, dtype=float)
        self.ratio_coef = ratio_coef    # [m, d] float32, or None: the length part only
        self.ratio_bias = ratio_bias    # [m]
        self.typical: np.ndarray | None = None   # [m] mean predicted cost on the training prompts
        self.added = np.full(len(self.intercept), np.nan)   # [m] price of an added expert, else NaN

    @classmethod
    def fit(cls, prompts: list[str], costs: np.ndarray) -> "CostModel":
        length = np.array([len(p) for p in prompts], dtype=float)
        m = costs.shape[1]
        a, b = np.zeros(m), np.zeros(m)
        for j in range(m):
            ok = ~np.isnan(costs[:, j])
            if not ok.any():
                continue
            x, y = length[ok], costs[ok, j]
            mean = float(y.mean())
            a[j] = mean
            if ok.sum() >= 3 and x.std() > 0:
                slope, icept = np.polyfit(x, y, 1)
                if slope >= 0 and icept >= 0:
                    a[j], b[j] = icept, slope
        return cls(a, b)

    def fit_ratio(self, features: Any, prompts: list[str], costs: np.ndarray,
                  alpha: float = 1.0) -> "CostModel":
        """Fit the kind part on ``features`` [n, d] (dense or sparse) of ``prompts``.

        Each expert's ridge is fitted on the prompts with a logged cost for it. An expert
        with costs for fewer than ``SHAPED_BELOW`` of the prompts (a model new to the logs,
        with a few calls) is priced as an added one: its logged costs over the fitted
        experts' mean relative cost for the same prompts, times that shape. On LLMRouter a
        held-out expert with 10 logged calls routed 0.02-0.05 of AIQ better priced so than
        by a ridge on its own calls (0-0.02 better with 50-200 calls, equal with 1,000),
        and better still than by one that read its unlogged prompts as costing the length
        model (benchmarks/README.md, "New expert with few examples").
        """
        from sklearn.linear_model import Ridge

        lin = self._length_part(prompts)
        n, m = costs.shape
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = costs / lin
        logged = ~np.isnan(costs) & (lin > 0)
        counts = logged.sum(axis=0)
        sparse = (counts > 0) & (counts < self.SHAPED_BELOW * n)
        if sparse.all():
            sparse[:] = False   # nothing to take a shape from: each from its own calls
        coef = np.zeros((m, features.shape[1]), np.float32)
        bias = np.ones(m, np.float32)   # no logged cost at all: the length part
        full = counts == n
        if full.any():
            ridge = Ridge(alpha=alpha).fit(features, ratio[:, full])
            coef[full], bias[full] = np.atleast_2d(ridge.coef_), np.atleast_1d(ridge.intercept_)
        for j in np.flatnonzero(~full & ~sparse & (counts > 0)):
            rows = np.flatnonzero(logged[:, j])
            ridge = Ridge(alpha=alpha).fit(features[rows], ratio[rows, j])
            coef[j], bias[j] = ridge.coef_, ridge.intercept_
        self.ratio_coef, self.ratio_bias = coef, bias
        if sparse.any():
            own = np.asarray(features @ coef.T, dtype=float) + bias[None, :]
            pred = lin * np.clip(own, self.RATIO_MIN, self.RATIO_MAX)
            self.typical = np.where(~sparse & (counts > 0), pred.mean(axis=0), 0.0)
            shape = self._shape(pred)
            for j in np.flatnonzero(sparse) if shape is not None else ():
                rows = logged[:, j]
                self.added[j] = self.typical[j] = costs[rows, j].sum() / max(shape[rows].sum(), 1e-300)
        return self

    @property
    def has_ratio(self) -> bool:
        return self.ratio_coef is not None

    def add_expert(self, price: float) -> None:
        """A new column: the expert costs ``price`` per call on average, shaped like the
        fitted experts' costs (flat where ``typical`` is unknown)."""
        self.intercept = np.r_[self.intercept, price]
        self.slope = np.r_[self.slope, 0.0]
        self.added = np.r_[self.added, float(price)]
        if self.typical is not None:
            self.typical = np.r_[self.typical, float(price)]
        if self.has_ratio:
            self.ratio_coef = np.vstack([self.ratio_coef, np.zeros((1, self.ratio_coef.shape[1]),
                                                                   np.float32)])
            self.ratio_bias = np.r_[self.ratio_bias, np.float32(1.0)].astype(np.float32)

    def _shape(self, cost: np.ndarray) -> np.ndarray | None:
        """``[n]`` the fitted experts' mean relative cost ``mean_k cost_k / typical_k`` of
        predicted ``cost [n, m]``; None where ``typical`` is unknown."""
        if self.typical is None:
            return None
        base = np.isnan(self.added) & (self.typical > 0)
        if not base.any():
            return None
        return (cost[:, base] / self.typical[base][None, :]).mean(axis=1)

    def _shape_added(self, cost: np.ndarray) -> np.ndarray:
        """Added experts' columns: their price times the fitted experts' mean relative cost."""
        added = ~np.isnan(self.added)
        shape = self._shape(cost) if added.any() else None
        if shape is not None:
            cost[:, added] = shape[:, None] * self.added[added][None, :]
        return cost

    def price_from_calls(self, prompts: list[str], features: Any, costs: np.ndarray) -> float:
        """A new expert's price per call from its logged ``costs [N]`` on ``prompts``: their
        sum over the fitted experts' relative cost of the same prompts (so that a few calls
        on dear questions do not read as a dear expert), or their mean without ``typical``."""
        costs = np.asarray(costs, dtype=float)
        shape = self._shape(self.predict(prompts, features)) if len(prompts) else None
        if shape is None:
            return float(costs.mean())
        return float(costs.sum() / max(shape.sum(), 1e-300))

    def _length_part(self, prompts: list[str]) -> np.ndarray:
        length = np.array([len(p) for p in prompts], dtype=float)
        return self.intercept[None, :] + length[:, None] * self.slope[None, :]

    def predict(self, prompts: list[str], features: Any = None) -> np.ndarray:
        """[n, m] USD per call; ``features`` (the router's, for the same prompts) applies
        the kind part when it was fitted, else the length part alone is returned."""
        lin = self._length_part(prompts)
        if not self.has_ratio or features is None or not len(prompts):
            return self._shape_added(lin)
        ratio = np.asarray(features @ self.ratio_coef.T, dtype=float) + self.ratio_bias[None, :]
        return self._shape_added(lin * np.clip(ratio, self.RATIO_MIN, self.RATIO_MAX))

    def to_dict(self) -> dict:
        out = {"intercept": self.intercept.tolist(), "slope": self.slope.tolist(),
               "ratio": self.has_ratio}
        if self.typical is not None:
            out["typical"] = self.typical.tolist()
            out["added"] = [None if np.isnan(v) else float(v) for v in self.added]
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.has_ratio:
            return {}
        return {"cost_model.ratio_coef": self.ratio_coef, "cost_model.ratio_bias": self.ratio_bias}

    @classmethod
    def from_dict(cls, d: dict, arrays: dict[str, np.ndarray] | None = None) -> "CostModel":
        model = cls(np.asarray(d["intercept"]), np.asarray(d["slope"]))
        m = model.intercept.shape[0]
        if d.get("typical") is not None:
            typical = np.asarray(d["typical"], dtype=float)
            added = np.array([np.nan if v is None else float(v) for v in d.get("added") or [None] * m])
            if typical.shape != (m,) or added.shape != (m,):
                raise ValueError(f"router.json's cost model: typical and added must list {m} experts")
            model.typical, model.added = typical, added
        if d.get("ratio"):
            arrays = arrays or {}
            coef, bias = arrays.get("cost_model.ratio_coef"), arrays.get("cost_model.ratio_bias")
            if coef is None or bias is None or coef.ndim != 2 or coef.shape[0] != m \
                    or bias.shape != (m,):
                raise ValueError("router.json's cost model has a kind part, but the arrays "
                                 "file lacks cost_model.ratio_coef [experts, d] and "
                                 "cost_model.ratio_bias [experts]")
            model.ratio_coef, model.ratio_bias = coef.astype(np.float32), bias.astype(np.float32)
        return model


class Router:
    """Base class. Subclasses set ``name``, implement ``_fit``, ``_predict``,
    ``_explain``, ``_state`` / ``_restore`` (small JSON state + named arrays)."""

    name: ClassVar[str] = "router"

    # ---- the contract --------------------------------------------------------
    def fit(self, logs: BenchmarkLogs) -> "Router":
        if logs.n_prompts == 0 or logs.n_experts == 0:
            raise ValueError("cannot fit a router on empty logs")
        self.experts_ = list(logs.experts)
        self.train_prompt_ids_ = list(logs.prompt_ids)
        self.cost_model_ = CostModel.fit(logs.prompts, logs.costs)
        self.competence_ = logs.mean_score()  # [m] mean logged score: each expert's global competence
        try:
            self._fit(logs)
        except BaseException:
            del self.experts_  # a failed fit leaves the router unfitted, not half-fitted
            raise
        features = self._cost_features(logs.prompts)
        if not self.cost_model_.has_ratio:   # else _fit fitted it (_training_costs)
            self._fit_cost_kind(logs, features)
        costs = self.cost_model_.predict(logs.prompts, features)
        self.cost_model_.typical = costs.mean(axis=0)   # what an added expert's price is shaped by
        self.cost_scale_ = float(max(self.cost_model_.typical.max(), 1e-12))
        forget = getattr(getattr(self, "featurizer_", None), "forget", None)
        if forget is not None:   # its last call was the training matrix: not kept
            forget()
        return self

    def predict_quality(self, queries: list[str]) -> np.ndarray:
        self._check_fitted()
        if not queries:
            return np.zeros((0, len(self.experts_)))
        return np.clip(self._predict(list(queries)), 0.0, 1.0)

    def predict_cost(self, queries: list[str]) -> np.ndarray:
        self._check_fitted()
        queries = list(queries)
        features = self._cost_features(queries) if self.cost_model_.has_ratio and queries else None
        return self.cost_model_.predict(queries, features)

    def _fit_cost_kind(self, logs: BenchmarkLogs, features: Any) -> None:
        if features is not None and logs.n_prompts >= 2:
            self.cost_model_.fit_ratio(features, logs.prompts, logs.costs)

    def _training_costs(self, logs: BenchmarkLogs, features: Any) -> np.ndarray:
        """[n, m] predicted cost of the training prompts, for a ``_fit`` that chooses its
        hyper-parameters by AIQ: fits the cost model's kind part on ``features`` (the
        router's own, of ``logs.prompts``) first, so that the choice is made with the cost
        model the router will route with."""
        self._fit_cost_kind(logs, features)
        return self.cost_model_.predict(logs.prompts, features)

    def _cost_features(self, queries: list[str]) -> Any:
        """The router's own query features (``featurizer_``) for the cost model's kind
        part, or None for a router without one."""
        featurizer = getattr(self, "featurizer_", None)
        return None if featurizer is None else featurizer.transform(queries)

    def explain(self, query: str) -> dict[str, Any]:
        self._check_fitted()
        q = self.predict_quality([query])[0]
        c = self.predict_cost([query])[0]
        return {
            "router": self.name,
            "experts": {e: {"quality": round(float(q[j]), 4), "cost_usd": float(c[j])}
                        for j, e in enumerate(self.experts_)},
            **self._explain(query),
        }

    def get_params(self) -> dict[str, Any]:
        """The constructor's arguments: not fitted state (``name_``), nor private caches
        (``_name``), which a prediction may have built."""
        return {k: v for k, v in vars(self).items() if not (k.endswith("_") or k.startswith("_"))}

    # ---- persistence ---------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._check_fitted()
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state, arrays = self._state()
        meta = {
            "version": ARTIFACT_VERSION,
            "router": self.name,
            "params": self.get_params(),
            "experts": self.experts_,
            "cost_model": self.cost_model_.to_dict(),
            "cost_scale": self.cost_scale_,
            "competence": [None if np.isnan(v) else float(v) for v in self.competence_],
            "train_prompt_ids": self.train_prompt_ids_,
            "state": state,
        }
        arrays = {**arrays, **self.cost_model_.arrays()}
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                  str(d / ARRAYS_FILE))
        self._write_files(d)
        (d / ROUTER_FILE).write_text(json.dumps(meta, indent=1))
        return d

    @classmethod
    def _from_meta(cls, meta: dict, arrays: dict[str, np.ndarray]) -> "Router":
        router = cls(**meta["params"])
        router.experts_ = list(meta["experts"])
        router.cost_scale_ = float(meta["cost_scale"])
        comp = meta.get("competence") or [None] * len(router.experts_)
        router.competence_ = np.array([np.nan if v is None else float(v) for v in comp])
        router.train_prompt_ids_ = list(meta.get("train_prompt_ids", []))
        router._restore(meta["state"], arrays)
        router.cost_model_ = CostModel.from_dict(meta["cost_model"], arrays)
        return router

    # ---- for subclasses ------------------------------------------------------
    def _fit(self, logs: BenchmarkLogs) -> None:
        raise NotImplementedError

    def _predict(self, queries: list[str]) -> np.ndarray:
        raise NotImplementedError

    def _explain(self, query: str) -> dict[str, Any]:
        return {}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        pass

    def _write_files(self, directory: Path) -> None:
        """Extra files a user may read and edit (e.g. skill profiles as JSON)."""

    def _read_files(self, directory: Path) -> None:
        """Read back ``_write_files``' files after ``_restore``; an edited file wins over
        the state in ``router.json``. Raise ``ValueError`` on a malformed file."""

    def _check_fitted(self) -> None:
        if not hasattr(self, "experts_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: "
                                 "call fit(logs) or load_router(dir) first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


def read_artifact(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    d = Path(directory)
    if not (d / ROUTER_FILE).is_file():
        raise ArtifactError(f"{d} is not a router directory (no {ROUTER_FILE})")
    try:
        meta = json.loads((d / ROUTER_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{d / ROUTER_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{d / ROUTER_FILE} is not a JSON object")
    if meta.get("version") != ARTIFACT_VERSION:
        raise ArtifactError(f"{d}: artifact version {meta.get('version')!r}, "
                            f"this Switchyard reads version {ARTIFACT_VERSION}")
    try:
        arrays = load_file(str(d / ARRAYS_FILE)) if (d / ARRAYS_FILE).is_file() else {}
    except SafetensorError as exc:
        raise ArtifactError(f"{d / ARRAYS_FILE} is not a safetensors file: {exc}") from exc
    return meta, arrays


def load_router(directory: str | Path) -> Router:
    """Load a saved router (JSON + safetensors; never unpickles)."""
    from router_models import ROUTERS

    meta, arrays = read_artifact(directory)
    cls = ROUTERS.get(meta.get("router"))
    if cls is None:
        raise ArtifactError(f"{directory}: unknown router {meta.get('router')!r}; "
                            f"known: {', '.join(sorted(ROUTERS))}")
    try:
        router = cls._from_meta(meta, arrays)
        router._read_files(Path(directory))
        return router
    except (KeyError, TypeError, ValueError) as exc:  # a missing field or array
        raise ArtifactError(f"{directory}: incomplete or damaged {meta['router']} artifact "
                            f"({type(exc).__name__}: {exc})") from exc
