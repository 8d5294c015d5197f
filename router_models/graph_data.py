"""The heterogeneous graph behind the GNN router: queries, tasks and experts.

With ``n`` query nodes (the first ``n_lab`` are the labelled training queries), ``T`` tasks,
``m`` experts and ``d = 384`` (MiniLM), a graph (:class:`torch_geometric.data.HeteroData`)
built by :func:`hetero_graph` holds::

    query   x [n, d]        MiniLM embedding (L2-normalised)
    task    x [T, d + 1]    mean embedding of the task's training queries, log1p(size) / 10
    expert  x [m, d + 1]    MiniLM embedding of the expert's description, standardised
                            log10 price per call (:class:`CostScale`)

    (query, similar, query)    src is one of dst's k nearest labelled queries (cosine), attr [E, 1] = sim
    (query, scored, expert)    a logged call, attr [E, 2] = (score, standardised log10 cost)
    (expert, rev_scored, query)   the same edges reversed, same attr
    (query, in, task)          a labelled query's own task (no attr)
    (task, rev_in, query)      attr [E, 1] = weight: 1 for a labelled query's own task; for a
                               query without a label, w_t = sum_{j in N_k, task(j) = t} s_j / sum_j s_j
                               over its k nearest labelled queries j with similarity s_j >= 0
    (task, rates, expert)      attr [E, 3] = (mean score, mean cost attr, log1p(count) / 10) of
                               the task's visible scored calls of that expert
    (expert, rev_rates, task)  the same edges reversed, same attr

    query   pair [n, m, 6]  two-hop label messages per expert (:func:`pair_features`): the
                            neighbours' mean logged score of the expert and the tasks' mean
                            score, each with its support; and the linear probe's score of the
                            query for the expert with its support (:class:`Probe`); the decoder
                            reads them with the states

A query that must look new (a test query, or a training query masked for an epoch) has
only incoming edges: ``similar`` from its labelled neighbours and ``rev_in`` soft task
weights; it sends nothing, so the rest of the graph does not change when it is added.
Tasks are the logs' labels; prompts without one ("") get k-means clusters of their
embeddings as pseudo-tasks (:func:`assign_tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch_geometric.data import HeteroData

Q, T, E = "query", "task", "expert"
QQ = (Q, "similar", Q)
QE = (Q, "scored", E)
EQ = (E, "rev_scored", Q)
QT = (Q, "in", T)
TQ = (T, "rev_in", Q)
TE = (T, "rates", E)
ET = (E, "rev_rates", T)
EDGE_TYPES = (QQ, QE, EQ, QT, TQ, TE, ET)
EDGE_DIMS = {QQ: 1, QE: 2, EQ: 2, TQ: 1, TE: 3, ET: 3}  # QT carries no attr
LABEL_DIM = 4  # two-hop label features of a (query, expert) pair, see pair_features
PAIR_DIM = LABEL_DIM + 2  # and the probe's score with its support, see Probe


@dataclass(frozen=True)
class CostScale:
    """Costs as edge/node features: ``(log10(c + 1e-9) - mu) / sd`` with ``mu``, ``sd`` over
    the training logs' logged costs (0 for a missing cost)."""

    mu: float
    sd: float

    @classmethod
    def fit(cls, costs: np.ndarray) -> "CostScale":
        c = np.log10(costs[~np.isnan(costs)] + 1e-9)
        if c.size == 0:
            return cls(0.0, 1.0)
        return cls(float(c.mean()), float(max(c.std(), 1e-3)))

    def __call__(self, costs: np.ndarray) -> np.ndarray:
        z = (np.log10(np.asarray(costs, dtype=float) + 1e-9) - self.mu) / self.sd
        return np.nan_to_num(z, nan=0.0).astype(np.float32)


def assign_tasks(tasks: list[str], emb: np.ndarray, n_clusters: int | None, seed: int
                 ) -> tuple[np.ndarray, list[str]]:
    """Task index per query [n] and the task names. Labelled queries keep their label; the
    unlabelled ones ("") are clustered by k-means on their embeddings into pseudo-tasks
    ``cluster-0 ..`` (``n_clusters`` default ``clip(round(sqrt(n_unlabelled / 2)), 1, 32)``)."""
    names = sorted({t for t in tasks if t})
    index = {t: i for i, t in enumerate(names)}
    out = np.array([index.get(t, -1) for t in tasks], dtype=np.int64)
    unknown = np.flatnonzero(out < 0)
    if unknown.size:
        k = n_clusters or int(np.clip(round(np.sqrt(unknown.size / 2)), 1, 32))
        k = min(k, unknown.size)
        if k == 1:
            labels = np.zeros(unknown.size, dtype=np.int64)
        else:
            from sklearn.cluster import KMeans

            labels = KMeans(k, n_init=3, random_state=seed).fit_predict(emb[unknown])
        out[unknown] = len(names) + labels
        names += [f"cluster-{i}" for i in range(k)]
    return out, names


def task_features(emb: np.ndarray, task: np.ndarray, n_tasks: int) -> np.ndarray:
    """[T, d + 1]: mean member embedding and log1p(size) / 10 (a task without members: 0)."""
    x = np.zeros((n_tasks, emb.shape[1] + 1), dtype=np.float32)
    np.add.at(x[:, :-1], task, emb)
    size = np.bincount(task, minlength=n_tasks).astype(np.float32)
    x[:, :-1] /= np.maximum(size, 1)[:, None]
    x[:, -1] = np.log1p(size) / 10
    return x


def expert_features(desc_emb: np.ndarray, log_price: np.ndarray) -> np.ndarray:
    """[m, d + 1]: description embedding and the standardised log price per call."""
    return np.concatenate([desc_emb, np.asarray(log_price, np.float32)[:, None]], axis=1
                          ).astype(np.float32)


def top_k(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``sims [b, n]`` the ``k`` largest columns, sorted by similarity (ties by
    index): ``(idx [b, k'], sims [b, k'])`` with ``k' = min(k, n)``."""
    k = min(k, sims.shape[1])
    if k == 0:
        return np.zeros((len(sims), 0), np.int64), np.zeros((len(sims), 0), np.float32)
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < sims.shape[1] else \
        np.tile(np.arange(sims.shape[1]), (len(sims), 1))
    s = np.take_along_axis(sims, idx, axis=1)
    order = np.lexsort((idx, -s), axis=1)
    return np.take_along_axis(idx, order, 1).astype(np.int64), np.take_along_axis(s, order, 1)


def soft_tasks(nbr: np.ndarray, sim: np.ndarray, lab_task: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Task edges of unlabelled queries from their neighbours ``nbr [b, k]`` (indices of
    labelled queries, -1 = none) with similarities ``sim [b, k]``:
    ``(row [E], task [E], weight [E])``, weights of one row summing to 1 (uniform over
    the neighbours' tasks when no similarity is positive)."""
    ok = nbr >= 0
    w = np.where(ok, np.maximum(sim, 0.0) + 1e-6, 0.0)[ok]
    rows = np.nonzero(ok)[0]
    n_tasks = int(lab_task.max(initial=0)) + 1
    pair, inv = np.unique(rows * n_tasks + lab_task[nbr[ok]], return_inverse=True)
    total = np.bincount(inv, weights=w)
    u_rows = pair // n_tasks
    norm = np.bincount(u_rows, weights=total, minlength=len(nbr))
    return u_rows.astype(np.int64), (pair % n_tasks).astype(np.int64), \
        (total / norm[u_rows]).astype(np.float32)


def task_expert_stats(q_task: np.ndarray, e: np.ndarray, score: np.ndarray, cost: np.ndarray,
                      n_tasks: int, n_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(task, expert) pairs with at least one scored call among the given ones:
    ``(edge_index [2, E], attr [E, 3] = (mean score, mean cost attr, log1p(count) / 10))``."""
    key = q_task * n_experts + e
    uniq, inv = np.unique(key, return_inverse=True)
    count = np.bincount(inv).astype(np.float64)
    attr = np.stack([np.bincount(inv, weights=score) / count, np.bincount(inv, weights=cost) / count,
                     np.log1p(count) / 10], axis=1).astype(np.float32)
    return np.stack([uniq // n_experts, uniq % n_experts]).astype(np.int64), attr


@dataclass
class Edges:
    """One graph's edges as numpy arrays (query indices are rows of the query features)."""

    qq: np.ndarray          # [2, E] (src labelled neighbour, dst)
    qq_sim: np.ndarray      # [E]
    qe: np.ndarray          # [2, E] (query, expert)
    qe_attr: np.ndarray     # [E, 2] (score, cost attr)
    qt: np.ndarray          # [2, E] (labelled query, its task)
    tq: np.ndarray          # [2, E] (task, query)
    tq_w: np.ndarray        # [E]
    q_task: np.ndarray      # [n] hard task of every query node (for the task-expert stats)


def score_matrix(qe: np.ndarray, score: np.ndarray, n: int, m: int) -> np.ndarray:
    """Logged scores as ``[n, m]``, NaN where no call is in the graph."""
    out = np.full((n, m), np.nan)
    out[qe[0], qe[1]] = score
    return out


def task_expert_dense(te: np.ndarray, te_attr: np.ndarray, n_tasks: int, m: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(task, expert) edges as ``(mean score [T, m] NaN if none, log1p(count) / 10 [T, m])``."""
    mean, size = np.full((n_tasks, m), np.nan), np.zeros((n_tasks, m))
    mean[te[0], te[1]], size[te[0], te[1]] = te_attr[:, 0], te_attr[:, 2]
    return mean, size


def pair_features(qq: np.ndarray, qq_sim: np.ndarray, tq: np.ndarray, tq_w: np.ndarray,
                  scores: np.ndarray, te_mean: np.ndarray, te_size: np.ndarray, n_dst: int,
                  shrink: float = 2.0) -> np.ndarray:
    """Two-hop label messages into each query node, per expert: ``[n_dst, m, LABEL_DIM]``.

    Along ``rev_in`` then ``rates`` (soft task weights ``w_t``), and along ``similar`` then
    ``scored`` (``a_j = max(sim_j, 0) + 1e-6`` over the query's neighbours ``j``), where
    ``[.]`` says the call is logged; the neighbours' mean is shrunk towards the tasks' mean
    by ``shrink`` pseudo-neighbours (a few binary outcomes are a noisy estimate)::

        task_e = sum_t w_t ybar_te [.] / sum_t w_t [.]   task_support_e = sum_t w_t log1p(n_te) / 10
        knn_e  = (sum_j a_j y_je [.] + shrink task_e [task_e]) / (sum_j a_j [.] + shrink [task_e])
        knn_support_e = sum_j a_j [.] / sum_j a_j

    Features are ``(knn, knn_support, task, task_support)``; a mean without support is 0.
    ``scores [n_src, m]`` (NaN = not in the graph), ``te_mean`` / ``te_size`` ``[T, m]``
    from :func:`task_expert_dense`.
    """
    def flow(src, dst, w, table):
        y = table[src]
        ok = ~np.isnan(y)
        num, den, tot = np.zeros((n_dst, m)), np.zeros((n_dst, m)), np.zeros(n_dst)
        np.add.at(num, dst, np.where(ok, y, 0.0) * w[:, None])
        np.add.at(den, dst, ok * w[:, None])
        np.add.at(tot, dst, w)
        return num, den, tot

    m = scores.shape[1]
    out = np.zeros((n_dst, m, LABEL_DIM))
    num, den, _ = flow(tq[0], tq[1], tq_w.astype(float), te_mean)
    has_task = den > 0
    out[:, :, 2] = np.where(has_task, num / np.maximum(den, 1e-12), 0.0)
    np.add.at(out[:, :, 3], tq[1], te_size[tq[0]] * tq_w[:, None])
    num, den, tot = flow(qq[0], qq[1], np.maximum(qq_sim, 0) + 1e-6, scores)
    prior = shrink * has_task
    out[:, :, 0] = (num + prior * out[:, :, 2]) / np.maximum(den + prior, 1e-12)
    out[:, :, 1] = den / np.maximum(tot, 1e-12)[:, None]
    return out.astype(np.float32)


def with_probe(label: np.ndarray, probe: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    """``[n, m, PAIR_DIM]``: the label features ``[n, m, LABEL_DIM]`` and the probe's
    ``(score, support)`` from ``probe = (scores [n, m], support [m])`` (a NaN score or
    ``None``: no probe, ``(0, 0)``)."""
    if probe is None:
        scores, support = np.full(label.shape[:2], np.nan), np.zeros(label.shape[1])
    else:
        scores, support = probe
    ok = ~np.isnan(scores)
    return np.concatenate([label, np.stack([np.where(ok, scores, 0.0), ok * support[None, :]], axis=-1)],
                          axis=-1).astype(np.float32)


@dataclass
class Probe:
    """A ridge regression per expert from a query's embedding to its logged score, the
    graph's non-graph base predictor (Correct & Smooth's): the decoder combines it with
    the label messages of the query's neighbours and tasks and with the node states.

    ``w [d + 1, m]`` (last row the intercept; an expert with fewer than ``MIN_CALLS``
    logged calls has no probe: a NaN column) and ``n [m]`` the calls each was fitted on.
    Its *support* ``n / (n + HALF_CALLS)`` (0 without a probe) tells the decoder how far
    to trust it over the neighbours' scores: about 1 for an expert of the training logs,
    0.3 for one added with 20 calls. :meth:`fit` also returns out-of-fold scores of the
    training queries, so that training sees the probe as a new query does.
    """

    w: np.ndarray
    n: np.ndarray

    MIN_CALLS = 20
    HALF_CALLS = 50
    ALPHAS = (0.3, 1.0, 3.0, 10.0, 30.0)

    @classmethod
    def fit_one(cls, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """``x [N, d]``, ``y [N]`` (all logged) -> ``(w [d + 1], ridge penalty)``, the
        penalty chosen by efficient leave-one-out (``RidgeCV``); a NaN column and NaN
        when ``N < MIN_CALLS``."""
        from sklearn.linear_model import RidgeCV

        if len(y) < cls.MIN_CALLS:
            return np.full(x.shape[1] + 1, np.nan), np.nan
        cv = RidgeCV(alphas=cls.ALPHAS).fit(x, y)
        return np.r_[cv.coef_, cv.intercept_], float(cv.alpha_)

    @classmethod
    def fit(cls, emb: np.ndarray, Y: np.ndarray, folds: int = 5, seed: int = 0
            ) -> tuple["Probe", np.ndarray]:
        """``emb [n, d]``, ``Y [n, m]`` (NaN = not logged) -> ``(probe, out-of-fold [n, m])``:
        per expert :meth:`fit_one` on all its calls, then each fold's rows scored by a
        ridge with the same penalty fitted on the other folds."""
        from sklearn.linear_model import Ridge

        n, m = Y.shape
        w, calls = np.full((emb.shape[1] + 1, m), np.nan), np.zeros(m)
        oof = np.full((n, m), np.nan)
        fold = np.random.default_rng(seed).permutation(n) % max(folds, 2)
        for j in range(m):
            rows = np.flatnonzero(~np.isnan(Y[:, j]))
            x, y = emb[rows], Y[rows, j]
            w[:, j], alpha = cls.fit_one(x, y)
            if np.isnan(alpha):
                continue
            calls[j] = len(rows)
            for f in np.unique(fold[rows]):
                inside = fold[rows] == f
                if inside.all():
                    continue
                r = Ridge(alpha=alpha).fit(x[~inside], y[~inside])
                oof[rows[inside], j] = r.predict(x[inside])
        return cls(w.astype(np.float32), calls), np.clip(oof, 0.0, 1.0)

    @classmethod
    def support_of(cls, n: np.ndarray) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        return n / (n + cls.HALF_CALLS)

    @property
    def support(self) -> np.ndarray:
        return self.support_of(self.n)

    def __call__(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [b, m] in 0..1, NaN without a probe; support [m])`` of ``emb [b, d]``."""
        return np.clip(emb @ self.w[:-1] + self.w[-1], 0.0, 1.0), self.support

    def with_expert(self, x: np.ndarray, y: np.ndarray) -> "Probe":
        """This probe and one more expert fitted on its ``N`` calls ``x [N, d]``, ``y [N]``."""
        col, alpha = self.fit_one(x, y)
        return Probe(np.concatenate([self.w, col[:, None].astype(np.float32)], axis=1),
                     np.r_[self.n, 0.0 if np.isnan(alpha) else len(y)])


def hetero_graph(q_x: np.ndarray, t_x: np.ndarray, e_x: np.ndarray, edges: Edges,
                 probe: tuple[np.ndarray, np.ndarray] | None = None) -> "HeteroData":
    """The :class:`HeteroData` of the module docstring, reverse edges included;
    ``probe = (scores [n, m], support [m])`` of the query nodes (:func:`with_probe`)."""
    def t(a, dtype=None):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype or torch.float32)

    import torch
    from torch_geometric.data import HeteroData

    data = HeteroData()
    data[Q].x, data[T].x, data[E].x = t(q_x), t(t_x), t(e_x)
    te, te_attr = task_expert_stats(edges.q_task[edges.qe[0]], edges.qe[1], edges.qe_attr[:, 0],
                                    edges.qe_attr[:, 1], len(t_x), len(e_x))
    data[Q].pair = t(with_probe(pair_features(
        edges.qq, edges.qq_sim, edges.tq, edges.tq_w,
        score_matrix(edges.qe, edges.qe_attr[:, 0], len(q_x), len(e_x)),
        *task_expert_dense(te, te_attr, len(t_x), len(e_x)), len(q_x)), probe))
    for et, ei, attr in ((QQ, edges.qq, edges.qq_sim[:, None]),
                         (QE, edges.qe, edges.qe_attr), (EQ, edges.qe[::-1], edges.qe_attr),
                         (QT, edges.qt, None), (TQ, edges.tq, edges.tq_w[:, None]),
                         (TE, te, te_attr), (ET, te[::-1], te_attr)):
        data[et].edge_index = t(ei.reshape(2, -1), torch.long)
        if attr is not None:
            data[et].edge_attr = t(attr.reshape(-1, EDGE_DIMS[et]))
    return data


def neighbours(emb: np.ndarray, lab: np.ndarray, k: int, self_rows: np.ndarray | None = None,
               chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``lab [n, d]`` for each row of ``emb [b, d]`` (cosine):
    ``(idx [b, k'], sim [b, k'])``, nearest first. ``self_rows [b]`` (a row of ``lab`` or
    -1) is excluded, and then ``k' = min(k, n - 1)``, else ``min(k, n)``."""
    k = max(min(k, len(lab) - (self_rows is not None)), 0)
    idx, sim = [np.zeros((0, k), np.int64)], [np.zeros((0, k), np.float32)]
    for s in range(0, len(emb), chunk):
        sims = emb[s:s + chunk] @ lab.T
        if self_rows is not None:
            me = self_rows[s:s + chunk]
            sims[np.flatnonzero(me >= 0), me[me >= 0]] = -np.inf
        i, v = top_k(sims, k + (self_rows is not None))
        idx.append(i[:, :k])
        sim.append(v[:, :k])
    return np.concatenate(idx), np.concatenate(sim).astype(np.float32)
