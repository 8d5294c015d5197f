"""The heterogeneous GNN of the graph router: encoders, ``HeteroConv`` layers, a decoder.

Per node type ``v`` a linear encoder ``h_v^0 = W_v x_v``; then ``L`` layers, each one
:class:`~torch_geometric.nn.conv.HeteroConv` over the edge types of
:mod:`router_models.graph_data` (relations into one node type summed)::

    h_v^{l+1} = LayerNorm(h_v^l + Dropout(ReLU(sum_{r: * -> v} conv_r(h_src^l, h_v^l, e_r))))

``conv_r`` is :class:`~torch_geometric.nn.conv.GeneralConv` with additive attention where an
edge carries features (similarity, score and cost, task weight, task-expert means), so
that the attention ``alpha_ij = softmax_j(a^T (W x_j + W_e e_ij))`` can weigh an expert
by the score it got and a neighbour by its similarity (a plain sum of ``W x_j + W_e e_ij``
would lose which expert got which score); :class:`~torch_geometric.nn.conv.SAGEConv`
(mean) for query -> task membership. The decoder scores a (query, expert) pair from the
states and the pair features ``p_qe`` (:func:`~router_models.graph_data.pair_features` and
the linear :class:`~router_models.graph_data.Probe`)::

    logit(q, e) = MLP([h_q^L, h_e^L, h_q^L * h_e^L, p_qe])          # [.., 3H + 6] -> H -> 1
                + a . [logit(knn), knn_support, logit(task), task_support,
                       logit(probe), probe_support]                  # the prior

The prior starts at ``a = (1/4, 0, 1/4, 0, 1/2, 0)`` and the MLP's output at 0, so an
untrained network predicts a blend of the probe and the label messages (Correct &
Smooth's base predictor and label propagation) and training learns the correction. The
probe's logit enters weighted by its support ``s`` (near 1 for the training experts, lower
for an expert added with a few calls, 0 without a probe), the neighbours' score making up
the rest: ``s logit(probe) + (1 - s) logit(knn)``. Training epochs that thin an expert to
a few calls refit its probe on those calls, so the decoder learns to read a weak probe.

Shapes: ``x_dict[v] [N_v, F_v]``, ``edge_index_dict[r] [2, E_r]``, ``edge_attr_dict[r]
[E_r, D_r]``; every state ``[N_v, H]``.

:meth:`HeteroGNN.forward_new` computes only new query nodes (incoming edges only) from the
cached states of every other node, layer by layer, with the same conv modules' weights as
the full graph, so both give the same numbers. It runs each relation's formula above in a
few tensor ops (:func:`messages_into_new`) rather than through PyG's ``propagate``, whose
per-call bookkeeping was most of the graph's part of a decision. A live query goes further
from torch: :class:`NewQueryPass` is the same computation in NumPy, with each relation's
source nodes projected once per graph (0.33 against 1.3 ms per query on a 2-core Xeon).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch_geometric.nn import GeneralConv, HeteroConv, MessagePassing, SAGEConv
from torch_geometric.nn.conv.hetero_conv import group
from torch_geometric.utils import softmax

from router_models.graph_data import (
    EDGE_DIMS,
    EDGE_TYPES,
    PAIR_DIM,
    EQ,
    ET,
    QE,
    QT,
    TE,
    E,
    Edges,
    Probe,
    Q,
    T,
    hetero_graph,
    neighbours,
    soft_tasks,
)

State = dict[str, Tensor]
SCORED = (QE, EQ, TE, ET)  # edges whose first attr is a score


def _logit(p: Tensor, eps: float = 0.02) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class SourceFirstGeneralConv(GeneralConv):
    r""":class:`~torch_geometric.nn.conv.GeneralConv` (directed messages, additive
    attention) with ``lin_msg`` applied to the source nodes before they are gathered onto
    the edges: the same numbers, with ``|V_s|`` instead of ``|E|`` rows through the
    linear map (kNN edges outnumber queries 20 to 1)::

        m_ij = W x_j + W_e e_ij,   alpha_ij = softmax_j(LeakyReLU(a^T m_ij)),
        x_i' = W_self x_i + mean_heads(sum_j alpha_ij m_ij)

    Shapes: ``x`` ``[N, F]`` or ``([N_s, F], [N_t, F])``, ``edge_index [2, E]``,
    ``edge_attr [E, D]`` -> ``[N_t, F_out]``.
    """

    def forward(self, x, edge_index, edge_attr=None, size=None):
        if isinstance(x, Tensor):
            x = (x, x)
        out = self.propagate(edge_index, x=(self.lin_msg(x[0]), x[1]), size=size,
                             edge_attr=edge_attr)
        return out.mean(dim=1) + self.lin_self(x[1])

    def message_basic(self, x_i: Tensor, x_j: Tensor, edge_attr: Tensor | None) -> Tensor:
        return x_j if edge_attr is None else x_j + self.lin_edge(edge_attr)

    def message(self, x_j: Tensor, edge_index_i: Tensor, size_i: int | None,
                edge_attr: Tensor | None) -> Tensor:
        x_j = self.message_basic(None, x_j, edge_attr).view(-1, self.heads, self.out_channels)
        alpha = torch.nn.functional.leaky_relu((x_j * self.att_msg).sum(dim=-1), 0.2)
        alpha = softmax(alpha, edge_index_i, num_nodes=size_i)
        return x_j * alpha.unsqueeze(-1)


class ScoreGatedConv(MessagePassing):
    r"""Mean over scored edges of a message gated by the edge's score ``s_ij`` in 0..1
    (GC-MC's one relation per rating, with soft ratings)::

        x_i' = W_self x_i + 1/|N(i)| sum_j [s_ij W_hi x_j + (1 - s_ij) W_lo x_j + W_e e_ij]

    A sum of ``W x_j + W_e e_ij`` forgets which neighbour got which score; here a query's
    state is a linear code of its whole score vector over the experts, and an expert's
    state holds the mean of the queries it got right and of those it got wrong apart.
    ``e_ij [E, D]`` with ``s_ij = e_ij[:, 0]``. Shapes: ``x`` ``[N, F]`` or
    ``([N_s, F], [N_t, F])``, ``edge_index [2, E]`` -> ``[N_t, F_out]``.
    """

    def __init__(self, in_channels: int, out_channels: int, edge_dim: int):
        super().__init__(aggr="mean")
        self.lin_hi = torch.nn.Linear(in_channels, out_channels)
        self.lin_lo = torch.nn.Linear(in_channels, out_channels, bias=False)
        self.lin_edge = torch.nn.Linear(edge_dim, out_channels, bias=False)
        self.lin_self = torch.nn.Linear(in_channels, out_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        for lin in (self.lin_hi, self.lin_lo, self.lin_edge, self.lin_self):
            lin.reset_parameters()

    def forward(self, x, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        if isinstance(x, Tensor):
            x = (x, x)
        out = self.propagate(edge_index, hi=self.lin_hi(x[0]), lo=self.lin_lo(x[0]),
                             edge_attr=edge_attr, size=(len(x[0]), len(x[1])))
        return out + self.lin_self(x[1])

    def message(self, hi_j: Tensor, lo_j: Tensor, edge_attr: Tensor) -> Tensor:
        s = edge_attr[:, :1]
        return s * hi_j + (1 - s) * lo_j + self.lin_edge(edge_attr)


def messages_into_new(conv: MessagePassing, x: tuple[Tensor, Tensor], edge_index: Tensor,
                      edge_attr: Tensor | None) -> Tensor:
    """``conv(x, edge_index, edge_attr)`` for one relation into new nodes, written out for
    :class:`SourceFirstGeneralConv` and :class:`ScoreGatedConv` (their class docs' formulas,
    the same numbers as ``propagate`` to float rounding); any other conv is called."""
    src, dst = edge_index[0], edge_index[1]
    n_t = len(x[1])
    if type(conv) is SourceFirstGeneralConv and conv.attention and conv.directed_msg \
            and conv.attention_type == "additive" and not conv.normalize_l2:
        m = conv.lin_msg(x[0]).index_select(0, src)
        if edge_attr is not None:
            m = m + conv.lin_edge(edge_attr)
        m = m.view(-1, conv.heads, conv.out_channels)
        alpha = softmax(torch.nn.functional.leaky_relu((m * conv.att_msg).sum(dim=-1), 0.2),
                        dst, num_nodes=n_t)
        out = m.new_zeros((n_t, conv.heads, conv.out_channels)).index_add_(0, dst, m * alpha.unsqueeze(-1))
        return out.mean(dim=1) + conv.lin_self(x[1])
    if type(conv) is ScoreGatedConv:
        out = conv.lin_self(x[1])
        if src.numel():
            score = edge_attr[:, :1]
            m = (score * conv.lin_hi(x[0]).index_select(0, src)
                 + (1 - score) * conv.lin_lo(x[0]).index_select(0, src) + conv.lin_edge(edge_attr))
            count = torch.bincount(dst, minlength=n_t).clamp(min=1).unsqueeze(-1).to(m.dtype)
            out = out + m.new_zeros((n_t, m.shape[1])).index_add_(0, dst, m) / count
        return out   # a node without edges: PyG's mean over nothing is 0
    return conv(x, edge_index) if edge_attr is None else conv(x, edge_index, edge_attr=edge_attr)


class HeteroGNN(torch.nn.Module):
    """Encoders, ``layers`` x HeteroConv and the pair decoder (module docstring)."""

    def __init__(self, in_dims: dict[str, int], hidden: int = 64, layers: int = 2, heads: int = 2,
                 dropout: float = 0.1, gated: bool = True):
        super().__init__()
        self.hidden, self.dropout = hidden, dropout
        self.encoders = torch.nn.ModuleDict({v: torch.nn.Linear(d, hidden) for v, d in in_dims.items()})
        self.convs = torch.nn.ModuleList()
        self.norms = torch.nn.ModuleList()
        for _ in range(layers):
            convs = {}
            for et in EDGE_TYPES:
                if et == QT:
                    convs[et] = SAGEConv((hidden, hidden), hidden, aggr="mean")
                elif et in SCORED and gated:
                    convs[et] = ScoreGatedConv(hidden, hidden, EDGE_DIMS[et])
                else:
                    convs[et] = SourceFirstGeneralConv((hidden, hidden), hidden, EDGE_DIMS[et], aggr="add",
                                                       skip_linear=True, heads=heads, attention=True)
            self.convs.append(HeteroConv(convs, aggr="sum"))
            self.norms.append(torch.nn.ModuleDict({v: torch.nn.LayerNorm(hidden) for v in (Q, T, E)}))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(3 * hidden + PAIR_DIM, hidden), torch.nn.ReLU(),
                                           torch.nn.Linear(hidden, 1))
        self.prior = torch.nn.Linear(PAIR_DIM, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for lin in self.encoders.values():
            lin.reset_parameters()
        for conv, norm in zip(self.convs, self.norms):
            conv.reset_parameters()
            for ln in norm.values():
                ln.reset_parameters()
        self.decoder[0].reset_parameters()
        # start from the label-propagation prior (C&S-style): the network learns a correction
        torch.nn.init.zeros_(self.decoder[-1].weight)
        torch.nn.init.zeros_(self.decoder[-1].bias)
        with torch.no_grad():
            self.prior.weight.copy_(torch.tensor([[0.25, 0.0, 0.25, 0.0, 0.5, 0.0]]))
            self.prior.bias.zero_()

    def _update(self, layer: int, v: str, h: Tensor, agg: Tensor) -> Tensor:
        agg = torch.nn.functional.dropout(torch.relu(agg), self.dropout, self.training)
        return self.norms[layer][v](h + agg)

    def forward(self, x_dict: dict[str, Tensor], edge_index_dict: dict, edge_attr_dict: dict
                ) -> list[State]:
        """States of every node after each layer: ``[h^0, .., h^L]``, each ``{v: [N_v, H]}``."""
        h = {v: self.encoders[v](x) for v, x in x_dict.items()}
        states = [h]
        for layer, conv in enumerate(self.convs):
            agg = conv(h, edge_index_dict, edge_attr_dict=edge_attr_dict)
            h = {v: self._update(layer, v, h[v], agg[v]) for v in h}
            states.append(h)
        return states

    def forward_new(self, x_new: Tensor, states: list[State], edge_index_dict: dict,
                    edge_attr_dict: dict, propagate: bool = False) -> Tensor:
        """``h^L [b, H]`` of ``b`` new query nodes, from cached ``states`` (:meth:`forward`
        of the graph without them). ``edge_index_dict[r]`` for each relation ``r`` into
        ``query``: ``[2, E_r]`` with src indexing the cached nodes of ``r``'s source type
        and dst in ``0..b-1`` (empty where a new node has no such edge). The relations run
        through :func:`messages_into_new`; ``propagate=True`` calls the conv modules."""
        h = self.encoders[Q](x_new)
        for layer, conv in enumerate(self.convs):
            outs = []
            for et, c in conv.convs.items():  # HeteroConv's order, so its sum is reproduced
                if et[-1] != Q:
                    continue
                # only the cached sources that send to the new nodes, renumbered
                used, src = torch.unique(edge_index_dict[et][0], return_inverse=True)
                ei = torch.stack([src.view(-1), edge_index_dict[et][1]])
                x = (states[layer][et[0]][used], h)
                attr = edge_attr_dict.get(et)
                if propagate:
                    outs.append(c(x, ei) if attr is None else c(x, ei, edge_attr=attr))
                else:
                    outs.append(messages_into_new(c, x, ei, attr))
            h = self._update(layer, Q, h, group(outs, conv.aggr))
        return h

    def decode(self, h_q: Tensor, h_e: Tensor, pair: Tensor) -> Tensor:
        """Logits of aligned pairs: ``h_q [P, H], h_e [P, H], pair [P, PAIR_DIM] -> [P]``."""
        knn, knn_support, task, task_support, probe, probe_support = pair.unbind(-1)
        # the probe as far as its support goes, the neighbours' score for the rest
        probe = probe_support * _logit(probe) + (1 - probe_support) * _logit(knn)
        prior = torch.stack([_logit(knn) * (knn_support > 0), knn_support,
                             _logit(task) * (task_support > 0), task_support,
                             probe * ((probe_support > 0) | (knn_support > 0)), probe_support], dim=-1)
        return (self.decoder(torch.cat([h_q, h_e, h_q * h_e, pair], dim=-1))
                + self.prior(prior)).squeeze(-1)

    def decode_all(self, h_q: Tensor, h_e: Tensor, pair: Tensor) -> Tensor:
        """Logits of every pair: ``h_q [b, H], h_e [m, H], pair [b, m, PAIR_DIM] -> [b, m]``."""
        b, m = len(h_q), len(h_e)
        return self.decode(h_q[:, None, :].expand(b, m, -1).reshape(b * m, -1),
                           h_e[None, :, :].expand(b, m, -1).reshape(b * m, -1),
                           pair.reshape(b * m, -1)).view(b, m)


# ---- the live path in NumPy ------------------------------------------------------------

def _np(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy().astype(np.float32, copy=True)


def _np_logit(p: np.ndarray, eps: float = 0.02) -> np.ndarray:
    p = np.clip(p, eps, 1 - eps)
    return np.log(p) - np.log1p(-p)


def _segment_softmax(a: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray:
    """``torch_geometric.utils.softmax(a, dst, num_nodes=n)`` for ``a [E, heads]``."""
    top = np.full((n, a.shape[1]), -np.inf, np.float32)
    np.maximum.at(top, dst, a)
    e = np.exp(a - top[dst])
    total = np.zeros((n, a.shape[1]), np.float32)
    np.add.at(total, dst, e)
    return e / (total[dst] + 1e-16)


class NewQueryPass:
    """:meth:`HeteroGNN.forward_new` and :meth:`HeteroGNN.decode_all` for live queries, in
    NumPy: the same formulas (module docstring, :class:`SourceFirstGeneralConv`,
    :class:`ScoreGatedConv`) with each relation's sources already projected
    (``lin_msg``, ``lin_hi``, ``lin_lo`` of every cached state, once per graph), equal to
    the torch path to float rounding (tests). A decision asks for one or a few queries;
    torch's per-op dispatch over ~150 tiny tensors was most of its graph part (1.3 of
    1.8 ms on a 2-core Xeon), which NumPy does in a fraction. :meth:`build` returns None
    when a relation into queries is not of those two kinds (the torch path is used)."""

    def __init__(self, encoder: tuple, layers: list, decoder: tuple):
        self.encoder, self.layers, self.decoder = encoder, layers, decoder

    @classmethod
    def build(cls, model: HeteroGNN, states: list[State]) -> "NewQueryPass | None":
        if model.training:
            return None
        layers = []
        with torch.no_grad():
            for layer, conv in enumerate(model.convs):
                rels = []
                for et, c in conv.convs.items():
                    if et[-1] != Q:
                        continue
                    src = states[layer][et[0]]
                    if type(c) is SourceFirstGeneralConv and c.attention and c.directed_msg \
                            and c.attention_type == "additive" and not c.normalize_l2:
                        rels.append((et, "attention", (
                            _np(c.lin_msg(src)), _np(c.lin_edge.weight), _np(c.lin_edge.bias),
                            _np(c.att_msg)[0], c.heads, c.out_channels,
                            _np(c.lin_self.weight), _np(c.lin_self.bias))))
                    elif type(c) is ScoreGatedConv:
                        rels.append((et, "gated", (
                            _np(c.lin_hi(src)), _np(c.lin_lo(src)), _np(c.lin_edge.weight),
                            _np(c.lin_self.weight))))
                    else:
                        return None
                norm = model.norms[layer][Q]
                layers.append((rels, (_np(norm.weight), _np(norm.bias), float(norm.eps))))
        enc = model.encoders[Q]
        d1, d2 = model.decoder[0], model.decoder[-1]
        h = model.hidden
        w1 = _np(d1.weight)
        decoder = (w1[:, :h], w1[:, h:2 * h], w1[:, 2 * h:3 * h], w1[:, 3 * h:], _np(d1.bias),
                   _np(d2.weight)[0], float(_np(d2.bias)[0]), _np(model.prior.weight)[0],
                   float(_np(model.prior.bias)[0]))
        return cls((_np(enc.weight), _np(enc.bias)), layers, decoder)

    @staticmethod
    def _relation(kind: str, p: tuple, h: np.ndarray, edges: tuple[np.ndarray, np.ndarray] | None
                  ) -> np.ndarray:
        if kind == "attention":
            proj, we, be, att, heads, out, ws, bs = p
            agg = h @ ws.T
            if bs is not None:
                agg += bs
            if edges is None or not len(edges[0][0]):
                return agg
            (src, dst), attr = edges
            m = proj[src] + attr @ we.T
            if be is not None:
                m += be
            m = m.reshape(-1, heads, out)
            a = (m * att).sum(-1)
            alpha = _segment_softmax(np.where(a > 0, a, 0.2 * a), dst, len(h))
            msg = np.zeros((len(h), heads, out), np.float32)
            np.add.at(msg, dst, m * alpha[..., None])
            return agg + msg.mean(1)
        hi, lo, we, ws = p
        agg = h @ ws.T
        if edges is None or not len(edges[0][0]):
            return agg   # a node without edges: PyG's mean over nothing is 0
        (src, dst), attr = edges
        s = attr[:, :1]
        m = s * hi[src] + (1 - s) * lo[src] + attr @ we.T
        total = np.zeros_like(agg)
        np.add.at(total, dst, m)
        return agg + total / np.maximum(np.bincount(dst, minlength=len(h)), 1)[:, None]

    def states(self, x_new: np.ndarray, edges: dict) -> np.ndarray:
        """``h^L [b, H]`` of ``b`` new queries with features ``x_new [b, F]``; ``edges[r] =
        ((src, dst), attr [E, D])`` per relation into queries (as for ``forward_new``; a
        missing relation has no edges)."""
        w, b = self.encoder
        h = np.asarray(x_new, np.float32) @ w.T + b
        for rels, (g, beta, eps) in self.layers:
            agg = sum(self._relation(kind, p, h, edges.get(et)) for et, kind, p in rels)
            x = h + np.maximum(agg, 0)
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            h = (x - mu) / np.sqrt(var + eps) * g + beta
        return h

    def logits(self, h_q: np.ndarray, h_e: np.ndarray, pair: np.ndarray) -> np.ndarray:
        """``decode_all``: ``h_q [b, H], h_e [m, H], pair [b, m, 6] -> [b, m]``."""
        wq, we, wqe, wp, b1, w2, b2, a, a0 = self.decoder
        hidden = ((h_q @ wq.T)[:, None, :] + (h_e @ we.T)[None, :, :]
                  + (h_q[:, None, :] * h_e[None, :, :]) @ wqe.T + pair @ wp.T + b1)
        mlp = np.maximum(hidden, 0) @ w2 + b2
        knn, knn_s, task, task_s, probe, probe_s = np.moveaxis(pair, -1, 0)
        probe = probe_s * _np_logit(probe) + (1 - probe_s) * _np_logit(knn)
        prior = np.stack([_np_logit(knn) * (knn_s > 0), knn_s, _np_logit(task) * (task_s > 0), task_s,
                          probe * ((probe_s > 0) | (knn_s > 0)), probe_s], axis=-1)
        return mlp + prior @ a + a0


# ---- training ------------------------------------------------------------------------

def _bce(model: HeteroGNN, states: list[State], pair: Tensor, qe: np.ndarray,
         target: np.ndarray) -> Tensor:
    h = states[-1]
    logits = model.decode(h[Q][qe[0]], h[E][qe[1]], pair[qe[0], qe[1]])
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(target))


def epoch_edges(visible: np.ndarray, cand: np.ndarray, cand_sim: np.ndarray, k: int,
                q_task: np.ndarray, qe: np.ndarray, qe_attr: np.ndarray,
                thin: tuple[int, int] | None = None, rng: np.random.Generator | None = None) -> Edges:
    """One epoch's graph over labelled queries, of which only ``visible [n]`` keep their
    logged calls and outgoing edges; the others look new. ``cand [n, K]`` / ``cand_sim``:
    each query's nearest labelled queries, nearest first; the first ``k`` visible ones
    become its neighbours. ``thin = (expert, N)`` keeps only ``N`` random visible calls of
    that expert (a few-shot expert)."""
    ok = visible[cand]
    take = ok & (np.cumsum(ok, axis=1) <= k)
    hidden, vis = np.flatnonzero(~visible), np.flatnonzero(visible)
    rows, tasks, w = soft_tasks(np.where(take[hidden], cand[hidden], -1), cand_sim[hidden], q_task)
    keep = visible[qe[0]]
    if thin is not None:
        cells = np.flatnonzero(keep & (qe[1] == thin[0]))
        keep[rng.permutation(cells)[thin[1]:]] = False
    return Edges(qq=np.stack([cand[take], np.nonzero(take)[0]]), qq_sim=cand_sim[take],
                 qe=qe[:, keep], qe_attr=qe_attr[keep], qt=np.stack([vis, q_task[vis]]),
                 tq=np.stack([np.r_[q_task[vis], tasks], np.r_[vis, hidden[rows]]]),
                 tq_w=np.r_[np.ones(len(vis), np.float32), w], q_task=q_task)


def train_gnn(router: Any, progress: bool = False) -> dict:
    """Train ``router.model_`` on the router's graph arrays (``q_emb_``, ``q_task_``,
    ``t_x_``, ``e_x_``, ``qe_``, ``qe_attr_``) with its hyper-parameters (module docstring
    of :mod:`router_models.graph`). Returns the history: per-epoch training loss, the
    validation loss every 5 epochs and the epoch whose weights were kept."""
    from tqdm import tqdm

    r, model = router, router.model_
    rng = np.random.default_rng(r.seed)
    n, m = len(r.q_emb_), len(r.e_x_)
    n_val = int(r.val_frac * n) if n >= 50 else 0
    is_val = np.zeros(n, bool)
    is_val[rng.permutation(n)[:n_val]] = True
    pool = np.flatnonzero(~is_val)
    slot = np.full(n, -1)
    slot[pool] = np.arange(len(pool))
    cand, cand_sim = neighbours(r.q_emb_, r.q_emb_[pool], 3 * r.k, slot)
    cand = pool[cand]
    x = {Q: r.q_emb_, T: r.t_x_, E: r.e_x_}
    target = r.qe_attr_[:, 0]
    opt = torch.optim.Adam(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    history: dict[str, Any] = {"train_loss": [], "val_loss": [], "best_epoch": r.epochs}
    best, best_loss, stale = None, np.inf, 0
    ema = copy.deepcopy(model)
    bar = tqdm(range(r.epochs), desc="gnn", unit="epoch", disable=not progress)
    for epoch in bar:
        model.train()
        visible = ~is_val & (rng.random(n) >= r.mask_frac)
        if not (~visible & ~is_val).any():
            visible[rng.choice(pool)] = False
        thin = ((int(rng.integers(m)), int(np.exp(rng.uniform(np.log(2), np.log(200)))))
                if rng.random() < r.fewshot_prob else None)
        edges = epoch_edges(visible, cand, cand_sim, r.k, r.q_task_, r.qe_, r.qe_attr_, thin, rng)
        probe = r.probe_oof_ if thin is None or r.probe_oof_ is None else \
            _few_shot_probe(r.probe_oof_, r.q_emb_, edges, thin[0])
        data = hetero_graph(x[Q], x[T], x[E], edges, probe)
        cells = ~visible[r.qe_[0]] & ~is_val[r.qe_[0]]
        opt.zero_grad()
        loss = _bce(model, model(data.x_dict, data.edge_index_dict, data.edge_attr_dict),
                    data[Q].pair, r.qe_[:, cells], target[cells])
        loss.backward()
        opt.step()
        with torch.no_grad():  # Polyak averaging: an epoch is one noisy step of a resampled graph
            decay = min(r.ema, (1 + epoch) / (10 + epoch))
            for p_avg, p in zip(ema.parameters(), model.parameters()):
                p_avg.lerp_(p, 1 - decay)
        history["train_loss"].append(round(loss.item(), 5))
        if n_val and (epoch % 5 == 4 or epoch == r.epochs - 1):
            val = _validate(ema, x, ~is_val, cand, cand_sim, r, is_val[r.qe_[0]])
            history["val_loss"].append([epoch, round(val, 5)])
            bar.set_postfix(loss=f"{loss.item():.4f}", val=f"{val:.4f}")
            if val < best_loss - 1e-5:
                best, best_loss, stale = copy.deepcopy(ema.state_dict()), val, 0
                history["best_epoch"] = epoch + 1
            else:
                stale += 5
                if stale >= r.patience:
                    break
    bar.close()
    model.load_state_dict(best if best is not None else ema.state_dict())
    return history


def _few_shot_probe(probe: tuple[np.ndarray, np.ndarray], emb: np.ndarray, edges: Edges, j: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The training probe with expert ``j``'s column refitted on its few visible calls
    in ``edges``, as :meth:`~router_models.graph.GraphRouter.add_expert` fits a new
    expert's: every query not among those calls sees an out-of-sample score."""
    scores, support = probe[0].copy(), probe[1].copy()
    mine = edges.qe[1] == j
    empty = Probe(np.zeros((emb.shape[1] + 1, 0), np.float32), np.zeros(0))
    scores[:, j:j + 1], support[j:j + 1] = empty.with_expert(emb[edges.qe[0][mine]],
                                                             edges.qe_attr[mine, 0])(emb)
    return scores, support


@torch.no_grad()
def _validate(model: HeteroGNN, x: dict, visible: np.ndarray, cand: np.ndarray,
              cand_sim: np.ndarray, r: Any, cells: np.ndarray) -> float:
    """Loss on the validation queries, inserted as new queries (as at inference)."""
    model.eval()
    data = hetero_graph(x[Q], x[T], x[E], epoch_edges(visible, cand, cand_sim, r.k, r.q_task_,
                                                      r.qe_, r.qe_attr_), r.probe_oof_)
    states = model(data.x_dict, data.edge_index_dict, data.edge_attr_dict)
    return float(_bce(model, states, data[Q].pair, r.qe_[:, cells], r.qe_attr_[cells, 0]))


def finetune_expert(router: Any, j: int, rows: np.ndarray, scores: np.ndarray, steps: int,
                    lr: float = 0.01, l2: float = 0.1) -> None:
    """Fit ``router.e_shift_[j] [H]`` (added to expert ``j``'s final state) and
    ``router.e_bias_[j]`` (added to its logits) to its logged calls, everything else
    frozen. Each example query is scored as a new query (its own logged calls unseen,
    training queries not their own neighbour), so the fit sees what a test query sees."""
    self_rows = np.where(rows < router.n_lab_, rows, -1)
    h_q, pair = router._new_states(router.q_emb_[rows], self_rows)
    pair, h_e = pair[:, j], router.states_[-1][E][j]
    shift = torch.zeros(router.hidden, requires_grad=True)
    bias = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([shift, bias], lr=lr)
    target = torch.as_tensor(scores, dtype=torch.float32)
    for _ in range(steps):
        opt.zero_grad()
        logits = router.model_.decode(h_q, (h_e + shift).expand(len(h_q), -1), pair) + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        (loss + l2 * (shift.square().mean() + bias.square())).backward()
        opt.step()
    router.e_shift_[j] = shift.detach().numpy()
    router.e_bias_[j] = float(bias.detach())
