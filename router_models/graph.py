"""The graph router (after GraphRouter and AgentRouter): a heterogeneous GNN over queries,
tasks and experts that predicts the score of a (query, expert) edge.

The graph and its features are in :mod:`router_models.graph_data`, the network and its
training in :mod:`router_models.graph_model`. Beside the graph, a ridge probe per expert
from the query embedding (``probe=True``, the default) gives the decoder a non-graph base
score to correct; its scores of the training queries are out of fold, as a new query's
are (on RouterBench it lifts the router's AIQ from kNN's 0.835 to 0.844; the classifier
router: 0.849). Training masks the logged calls of a random share of the training
queries each epoch, so that they look like new queries (incoming
edges only: their labelled kNN neighbours and soft task weights), and learns to predict
their scores (soft-label cross-entropy; NaN scores skipped)::

    L = -mean_{(q, e) masked, s_qe logged} [s_qe log p_qe + (1 - s_qe) log(1 - p_qe)],
    p_qe = sigmoid(logit(q, e))

With some probability an epoch also thins one expert down to a few logged calls, so that
the network learns to read an expert that has only a handful of examples. A held-out
share of the training prompts (inserted as new queries) stops training early.

After ``fit`` every node's state per layer is cached: a new query is linked to its ``k``
nearest training queries (cosine) and their tasks, and only its own layers are computed
(``HeteroGNN.forward_new``; for a live query its NumPy twin ``NewQueryPass``, which reads
each relation's sources already projected). :meth:`GraphRouter.add_expert` puts a new expert into the
graph with a few logged calls, without retraining::

    router = ROUTERS["gnn"]().fit(logs)
    router.add_expert("new-model", prompts, scores, costs)   # N logged calls
    router.predict_quality(["What is 2+2?"])                  # [1, m + 1]

torch and torch_geometric are imported when a graph router is fitted or loaded, not when
``router_models`` is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from router_models import sparse
from router_models.base import Router
from router_models.featurize import QUERY_PIECES, QueryCut, query_text, text_key
from router_models.graph_data import (
    EQ,
    QQ,
    TQ,
    CostScale,
    E,
    Edges,
    Probe,
    Q,
    T,
    assign_tasks,
    expert_features,
    neighbours,
    pair_features,
    score_matrix,
    soft_tasks,
    task_expert_dense,
    task_expert_stats,
    task_features,
    with_probe,
)
from router_models.logs import BenchmarkLogs

log = logging.getLogger(__name__)

_BATCH = 4096  # new queries per cached forward pass
OWN_CALLS = 50  # an expert with few logged calls: its own prediction weighs n / (n + OWN_CALLS)
_ARRAYS = ("q_emb", "q_task", "t_x", "e_x", "qe", "qe_attr", "e_shift", "e_bias", "probe_w", "probe_n")


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (None: as set), restored afterwards."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tensor(a: np.ndarray, long: bool = False) -> Any:
    import torch

    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long if long else torch.float32)


class GraphRouter(QueryCut, Router):
    name = "gnn"

    def __init__(self, hidden: int = 32, layers: int = 2, heads: int = 1, k: int = 10,
                 epochs: int = 300, lr: float = 3e-3, weight_decay: float = 1e-5,
                 dropout: float = 0.1, mask_frac: float = 0.25, val_frac: float = 0.1,
                 patience: int = 40, ema: float = 0.9, fewshot_prob: float = 0.5,
                 gated: bool = True, probe: bool = True, n_clusters: int | None = None,
                 descriptions: dict[str, str] | None = None, seed: int = 0,
                 threads: int | None = 1, progress: bool | None = None,
                 query_pieces: int = QUERY_PIECES, query_keep: str = "tail"):
        self.hidden = hidden
        self.layers = layers
        self.heads = heads
        self.k = k
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.mask_frac = mask_frac
        self.val_frac = val_frac
        self.patience = patience
        self.ema = ema
        self.fewshot_prob = fewshot_prob
        self.gated = gated
        self.probe = probe
        self.n_clusters = n_clusters
        self.descriptions = descriptions
        self.seed = seed
        self.threads = threads
        self.progress = progress
        self.query_pieces = query_pieces
        self.query_keep = query_keep

    # ---- fit -----------------------------------------------------------------------
    def _check_params(self) -> None:
        for name in ("hidden", "layers", "heads", "k", "epochs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, lo, hi in (("mask_frac", 0, 1), ("val_frac", 0, 1), ("ema", 0, 1)):
            if not (lo < getattr(self, name) < hi or (name != "mask_frac" and getattr(self, name) == 0)):
                raise ValueError(f"{name} must be in [{lo}, {hi}), got {getattr(self, name)}")

    def _description(self, expert: str) -> str:
        return (self.descriptions or {}).get(expert, expert)

    def _fit(self, logs: BenchmarkLogs) -> None:
        import torch

        from router_models.graph_model import train_gnn

        self._check_params()
        self.featurizer_ = self._minilm()
        emb = self.featurizer_.transform(logs.prompts)
        Y = np.asarray(logs.scores, dtype=float)
        self.cost_attr_ = CostScale.fit(logs.costs)
        q_task, self.tasks_ = assign_tasks(logs.tasks, emb, self.n_clusters, self.seed)
        mean_cost = logs.mean_cost()
        mean_cost = np.where(np.isnan(mean_cost), np.nanmean(mean_cost) if
                             (~np.isnan(mean_cost)).any() else 0.0, mean_cost)
        desc = self.featurizer_.transform([self._description(e) for e in logs.experts])
        self.q_emb_, self.n_lab_, self.q_task_ = emb, len(emb), q_task
        self.t_x_ = task_features(emb, q_task, len(self.tasks_))
        self.e_x_ = expert_features(desc, self.cost_attr_(mean_cost))
        qi, ei = np.nonzero(~np.isnan(Y))
        cost = np.where(np.isnan(logs.costs[qi, ei]), mean_cost[ei], logs.costs[qi, ei])
        self.qe_ = np.stack([qi, ei]).astype(np.int64)
        self.qe_attr_ = np.stack([Y[qi, ei], self.cost_attr_(cost)], axis=1).astype(np.float32)
        self.text_keys_ = [text_key(query_text(p)) for p in logs.prompts]
        if self.probe:
            probe, oof = Probe.fit(emb, Y, seed=self.seed)
            self.probe_oof_ = (oof, probe.support)
        else:
            probe = Probe(np.full((emb.shape[1] + 1, Y.shape[1]), np.nan, np.float32), np.zeros(Y.shape[1]))
            self.probe_oof_ = None
        self.probe_w_, self.probe_n_ = probe.w, probe.n
        self.e_shift_ = np.zeros((len(logs.experts), self.hidden), np.float32)
        self.e_bias_ = np.zeros(len(logs.experts), np.float32)
        progress = self.progress if self.progress is not None else logs.n_prompts > 1000
        with torch.random.fork_rng(devices=[]), _torch_threads(self.threads):
            torch.manual_seed(self.seed)
            self.model_ = self._make_model()
            self.history_ = train_gnn(self, progress)
            del self.probe_oof_  # training only: new queries get the probe fitted on all
            self._refresh()
            self._fit_lean()

    def _make_model(self) -> Any:
        from router_models.graph_model import HeteroGNN

        dims = {Q: self.q_emb_.shape[1], T: self.t_x_.shape[1], E: self.e_x_.shape[1]}
        return HeteroGNN(dims, self.hidden, self.layers, self.heads, self.dropout, self.gated)

    # ---- the graph of the fitted router ---------------------------------------------
    def _link(self, emb: np.ndarray, self_rows: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Neighbours ``[b, k]`` among the labelled queries, their similarities and the soft
        task edges ``(row, task, weight)`` of ``emb [b, d]``."""
        nbr, sim = neighbours(emb, self.q_emb_[:self.n_lab_], self.k, self_rows)
        return nbr, sim, soft_tasks(nbr, sim, self.q_task_)

    def _edges(self) -> Edges:
        """The fitted graph: every labelled query linked to its k nearest other labelled
        queries and its own task; extra query nodes (new prompts of ``add_expert``) as new
        queries: incoming kNN and soft task edges only, counted under their likeliest task
        in the task-expert means."""
        n, n_lab = len(self.q_emb_), self.n_lab_
        self_rows = np.where(np.arange(n) < n_lab, np.arange(n), -1)
        nbr, sim, (rows, tasks, w) = self._link(self.q_emb_, self_rows)
        extra = rows >= n_lab
        best = np.zeros(n - n_lab, np.int64)
        order = np.lexsort((-w[extra], rows[extra]))
        first = np.r_[True, np.diff(rows[extra][order]) != 0] if order.size else order.astype(bool)
        best[rows[extra][order][first] - n_lab] = tasks[extra][order][first]
        lab = np.arange(n_lab)
        return Edges(
            qq=np.stack([nbr.ravel(), np.repeat(np.arange(n), nbr.shape[1])]), qq_sim=sim.ravel(),
            qe=self.qe_, qe_attr=self.qe_attr_, qt=np.stack([lab, self.q_task_]),
            tq=np.stack([np.r_[self.q_task_, tasks[extra]], np.r_[lab, rows[extra]]]),
            tq_w=np.r_[np.ones(n_lab, np.float32), w[extra]], q_task=np.r_[self.q_task_, best])

    def _graph(self) -> Any:
        """The fitted graph as :class:`~torch_geometric.data.HeteroData`."""
        from router_models.graph_data import hetero_graph

        return hetero_graph(self.q_emb_, self.t_x_, self.e_x_, self._edges())

    def _refresh(self) -> None:
        """Recompute and cache every node's state per layer on the current graph, and the
        label tables new queries read their two-hop features from."""
        import torch

        from router_models.graph_data import hetero_graph

        edges = self._label_tables()
        self.model_.eval()
        data = hetero_graph(self.q_emb_, self.t_x_, self.e_x_, edges)
        with torch.no_grad():
            self.states_ = self.model_(data.x_dict, data.edge_index_dict, data.edge_attr_dict)

    def _label_tables(self) -> Edges:
        """Cache the labelled queries' scores ``[n_lab, m]`` and the task-expert means and
        sizes ``[T, m]`` of the current graph; returns its edges."""
        edges = self._edges()
        te, te_attr = task_expert_stats(edges.q_task[edges.qe[0]], edges.qe[1], edges.qe_attr[:, 0],
                                        edges.qe_attr[:, 1], len(self.tasks_), len(self.experts_))
        self.labels_ = score_matrix(self.qe_, self.qe_attr_[:, 0], len(self.q_emb_),
                                    len(self.experts_))[:self.n_lab_]
        self.te_mean_, self.te_size_ = task_expert_dense(te, te_attr, len(self.tasks_),
                                                         len(self.experts_))
        return edges

    # ---- predict ---------------------------------------------------------------------
    def _new_edges(self, emb: np.ndarray, self_rows: np.ndarray | None = None) -> tuple[dict, np.ndarray]:
        """The edges into new queries ``{relation: ((src, dst), attr)}`` and their pair
        features ``[b, m, 6]``; ``self_rows [b]``: a labelled query that must not be its
        own neighbour, or -1."""
        nbr, sim, (rows, tasks, w) = self._link(emb, self_rows)
        b, k = nbr.shape
        qq = np.stack([nbr.ravel(), np.repeat(np.arange(b), k)])
        tq = np.stack([tasks, rows])
        pair = with_probe(pair_features(qq, sim.ravel(), tq, w, self.labels_, self.te_mean_,
                                        self.te_size_, b), self._probe()(emb))
        return {QQ: (qq, sim.reshape(-1, 1).astype(np.float32)),
                TQ: (tq, np.asarray(w, np.float32)[:, None])}, pair

    def _new_states(self, emb: np.ndarray, self_rows: np.ndarray | None = None) -> tuple[Any, Any]:
        """``(h^L [b, H], pair [b, m, 6])`` tensors of new queries from the cached states
        (messages into them only), through the torch modules (for training)."""
        import torch

        edges, pair = self._new_edges(emb, self_rows)
        index = {r: _tensor(edges[r][0], long=True) for r in (QQ, TQ)}
        attrs = {r: _tensor(edges[r][1]) for r in (QQ, TQ)}
        index[EQ], attrs[EQ] = torch.zeros((2, 0), dtype=torch.long), torch.zeros((0, 2))
        with torch.no_grad():
            return self.model_.forward_new(_tensor(emb), self.states_, index, attrs), _tensor(pair)

    def _probe(self) -> Probe:
        return Probe(self.probe_w_, self.probe_n_)

    def _scores(self, h_q: Any, pair: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            h_e = self.states_[-1][E] + _tensor(self.e_shift_)
            logits = self.model_.decode_all(h_q, h_e, pair) + _tensor(self.e_bias_)
            return torch.sigmoid(logits).numpy().astype(float)

    def _live(self) -> Any:
        """The NumPy pass over the current model and cached states (:class:`NewQueryPass`),
        rebuilt when either is replaced; None where the model has no such pass."""
        from router_models.graph_model import NewQueryPass

        built = getattr(self, "_live_for", (None, None))
        if built[0] is not self.model_ or built[1] is not self.states_:
            self._live_pass = NewQueryPass.build(self.model_, self.states_)
            self._live_for = (self.model_, self.states_)
        return self._live_pass

    def _predict(self, queries: list[str]) -> np.ndarray:
        own = self._own_predict(self.featurizer_.transform(queries))
        return sparse.lean(own, getattr(self, "lean_", None))

    def _own_predict(self, emb: np.ndarray) -> np.ndarray:
        """Each expert's own predicted scores of new queries ``emb [b, d]``, before the
        sparse experts lean on the others."""
        live = self._live()
        out = []
        for s in range(0, len(emb), _BATCH):
            if live is None:
                out.append(self._scores(*self._new_states(emb[s:s + _BATCH])))
                continue
            edges, pair = self._new_edges(emb[s:s + _BATCH])
            h_e = self.states_[-1][E].numpy() + self.e_shift_
            logits = live.logits(live.states(emb[s:s + _BATCH], edges), h_e, pair) + self.e_bias_
            out.append(1 / (1 + np.exp(-logits.astype(float))))
        return np.concatenate(out)

    def _predict_full_graph(self, queries: list[str]) -> np.ndarray:
        """Reference for :meth:`_predict`: the whole graph with the queries inserted as new
        nodes (incoming edges only), run through every layer; slow, for tests."""
        import torch

        from router_models.graph_data import hetero_graph

        emb = self.featurizer_.transform(queries)
        n = len(self.q_emb_)
        nbr, sim, (rows, tasks, w) = self._link(emb)
        e = self._edges()
        new = n + np.repeat(np.arange(len(emb)), nbr.shape[1])
        e.qq = np.concatenate([e.qq, np.stack([nbr.ravel(), new])], 1)
        e.qq_sim = np.r_[e.qq_sim, sim.ravel()]
        e.tq = np.concatenate([e.tq, np.stack([tasks, n + rows])], 1)
        e.tq_w = np.r_[e.tq_w, w]
        e.q_task = np.r_[e.q_task, np.zeros(len(emb), np.int64)]  # unused: no scored edges
        scores, support = self._probe()(emb)
        probe = np.concatenate([np.full((n, len(self.experts_)), np.nan), scores]), support
        data = hetero_graph(np.concatenate([self.q_emb_, emb]), self.t_x_, self.e_x_, e, probe)
        with torch.no_grad():
            states = self.model_(data.x_dict, data.edge_index_dict, data.edge_attr_dict)
        own = np.clip(self._scores(states[-1][Q][n:], data[Q].pair[n:]), 0, 1)
        return sparse.lean(own, getattr(self, "lean_", None))

    def _fit_lean(self) -> None:
        """``lean_`` (:mod:`router_models.sparse`): an expert with logged calls on fewer
        than half of the training queries (one added with a few) leans on the others, its
        own prediction weighing ``n / (n + OWN_CALLS)``."""
        counts = np.bincount(self.qe_[1], minlength=len(self.experts_))

        def own_mean(j: int, base: np.ndarray) -> tuple[float, float]:
            mine = self.qe_[1] == j
            predicted = self._own_predict(self.q_emb_[self.qe_[0][mine]])[:, base]
            return float(self.qe_attr_[mine, 0].mean()), float(predicted.mean())

        self.lean_ = sparse.fit_lean(counts, self.n_lab_, OWN_CALLS, own_mean)

    # ---- a new expert ----------------------------------------------------------------
    def add_expert(self, name: str, prompts: list[str], scores: Any, costs: Any = None,
                   description: str | None = None, price_per_call: float | None = None,
                   finetune_steps: int = 0) -> "GraphRouter":
        """Add expert ``name`` with ``N`` logged calls (``prompts``, ``scores [N]`` in 0..1,
        NaN skipped; ``costs [N]`` USD or ``price_per_call``), without retraining.

        A prompt that is a training query links to that node; any other prompt becomes a
        new query node (inserted like a test query). The expert node gets ``description``
        (default its name) and its price; every cached state is recomputed. Its price is
        read from its logged costs (:meth:`CostModel.price_from_calls`: what they come to
        over the training prompts, next to the other experts' costs of the same prompts),
        else ``price_per_call``; the cost model shapes it per question like the others
        (:meth:`CostModel.add_expert`). ``finetune_steps > 0``
        fits a shift of the new expert's final state and a logit bias to its examples
        (Adam, the rest frozen), which changes no other expert's predictions.
        """
        from router_models.graph_model import finetune_expert

        self._check_fitted()
        if name in self.experts_:
            raise ValueError(f"expert {name!r} is already in the router")
        prompts = list(prompts)
        scores = np.asarray(scores, dtype=float).reshape(-1)
        costs = np.full(len(prompts), np.nan) if costs is None else \
            np.asarray(costs, dtype=float).reshape(-1)
        if not (len(prompts) == len(scores) == len(costs)):
            raise ValueError(f"{len(prompts)} prompts, {len(scores)} scores, {len(costs)} costs")
        ok = ~np.isnan(scores)
        if ((scores[ok] < 0) | (scores[ok] > 1)).any():
            raise ValueError("scores must be in [0, 1] (NaN = not logged)")
        logged = ok & ~np.isnan(costs)
        priced = [p for p, keep in zip(prompts, logged) if keep]
        price = (self.cost_model_.price_from_calls(priced, self._cost_features(priced), costs[logged])
                 if logged.any() else price_per_call)
        if price is None:
            raise ValueError("give costs for the logged calls or price_per_call: "
                             "a router must know what an expert costs")
        prompts = [p for p, keep in zip(prompts, ok) if keep]
        scores, costs = scores[ok], np.where(np.isnan(costs[ok]), price, costs[ok])
        j = len(self.experts_)
        desc = self.featurizer_.transform([description or name])
        self.e_x_ = np.concatenate([self.e_x_, expert_features(desc, self.cost_attr_([price]))])
        rows = self._query_rows(prompts)
        probe = self._probe().with_expert(self.q_emb_[rows], scores)
        self.probe_w_, self.probe_n_ = probe.w, probe.n
        self.qe_ = np.concatenate([self.qe_, np.stack([rows, np.full(len(rows), j)])], 1)
        self.qe_attr_ = np.concatenate([self.qe_attr_, np.stack(
            [scores, self.cost_attr_(costs)], axis=1).astype(np.float32)])
        self.e_shift_ = np.concatenate([self.e_shift_, np.zeros((1, self.hidden), np.float32)])
        self.e_bias_ = np.r_[self.e_bias_, np.float32(0)]
        self.experts_.append(name)
        self.competence_ = np.r_[self.competence_, scores.mean() if len(scores) else np.nan]
        self.cost_model_.add_expert(price)
        self.cost_scale_ = float(max(self.cost_scale_, price))
        with _torch_threads(self.threads):
            self._refresh()
            if finetune_steps > 0 and len(prompts):
                finetune_expert(self, j, rows, scores, finetune_steps)
            self._fit_lean()
        return self

    def _query_rows(self, prompts: list[str]) -> np.ndarray:
        """Query node of each prompt: the training query with the same text, else a new
        extra node (one per distinct text)."""
        known = {k: i for i, k in enumerate(self.text_keys_)}
        keys = [text_key(query_text(p)) for p in prompts]
        fresh = [k for k in dict.fromkeys(keys) if k not in known]
        if fresh:
            first = {k: p for k, p in zip(keys, prompts)}
            emb = self.featurizer_.transform([first[k] for k in fresh])
            known.update({k: len(self.text_keys_) + i for i, k in enumerate(fresh)})
            self.text_keys_ = self.text_keys_ + fresh
            self.q_emb_ = np.concatenate([self.q_emb_, emb])
        return np.array([known[k] for k in keys], dtype=np.int64)

    # ---- explain, save, load ---------------------------------------------------------
    def _explain(self, query: str) -> dict[str, Any]:
        emb = self.featurizer_.transform([query])
        nbr, sim, (rows, tasks, w) = self._link(emb)
        order = np.argsort(-w, kind="stable")
        calls = np.bincount(self.qe_[1], minlength=len(self.experts_))
        return {"neighbours": [{"prompt_id": self.train_prompt_ids_[i], "similarity": round(float(s), 4)}
                               for i, s in zip(nbr[0][:5], sim[0][:5])],
                "tasks": [{"task": self.tasks_[tasks[i]], "weight": round(float(w[i]), 4)}
                          for i in order],
                "logged_calls": {e: int(c) for e, c in zip(self.experts_, calls)},
                **({"own_prediction_weight": sparse.own_weights(self.experts_, self.lean_)}
                   if getattr(self, "lean_", None) is not None else {})}

    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {f"model.{k}": v.detach().numpy() for k, v in self.model_.state_dict().items()}
        for layer, state in enumerate(self.states_):
            arrays.update({f"state.{layer}.{v}": h.numpy() for v, h in state.items()})
        arrays.update({name: getattr(self, name + "_") for name in _ARRAYS})
        return ({"n_lab": self.n_lab_, "tasks": self.tasks_, "text_keys": self.text_keys_,
                 "cost_attr": [self.cost_attr_.mu, self.cost_attr_.sd],
                 "history": self.history_, "featurizer": self.featurizer_.state()[0],
                 "lean": getattr(self, "lean_", None) is not None},
                {**arrays, **sparse.to_arrays(getattr(self, "lean_", None))})

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        import torch

        self.featurizer_ = self._minilm_from_state(state.get("featurizer"))
        self.n_lab_, self.tasks_ = int(state["n_lab"]), list(state["tasks"])
        self.text_keys_, self.history_ = list(state["text_keys"]), state["history"]
        self.cost_attr_ = CostScale(*state["cost_attr"])
        if "probe_w" not in arrays or "probe_n" not in arrays:
            raise ValueError("this graph router was saved before the router had its probe; "
                             "train it again (switchyard train --router gnn)")
        for name in _ARRAYS:
            setattr(self, name + "_", arrays[name])
        self.model_ = self._make_model()
        self.model_.load_state_dict({k[6:]: torch.from_numpy(v.copy()) for k, v in arrays.items()
                                     if k.startswith("model.")})
        self.model_.eval()
        # saved before experts with few calls leaned on the others: none
        self.lean_ = sparse.from_arrays(bool(state.get("lean")), arrays, len(self.experts_), "graph router")
        self._label_tables()  # the cached states come back from the file, as saved
        self.states_ = [{v: torch.from_numpy(arrays[f"state.{layer}.{v}"].copy()) for v in (Q, T, E)}
                        for layer in range(self.layers + 1)]
