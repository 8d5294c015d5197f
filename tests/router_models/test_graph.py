"""The graph router on tiny hand-made logs and graphs (PyG style: assert shapes, then the
behaviour that must follow from the graph).

The logs are test_routers.py's: 20 arithmetic and 20 poem prompts; expert ``math`` scores
1 on arithmetic and 0 on poems, ``poet`` the reverse, ``generalist`` 0.5 everywhere.
Hyper-parameters are small (hidden 16, tens of epochs) so the file runs in seconds.
"""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest
import torch

from router_models import ROUTERS, load_router, sparse
from router_models.base import NotFittedError
from router_models.graph import GraphRouter
from router_models.graph_data import (
    EDGE_TYPES,
    EQ,
    ET,
    QE,
    QQ,
    QT,
    TE,
    TQ,
    PAIR_DIM,
    CostScale,
    Edges,
    Probe,
    assign_tasks,
    hetero_graph,
    soft_tasks,
    task_expert_stats,
    with_probe,
)
from router_models.graph_model import (
    HeteroGNN,
    NewQueryPass,
    ScoreGatedConv,
    SourceFirstGeneralConv,
    messages_into_new,
)
from router_models.logs import BenchmarkLogs, load_logs, write_logs
from tests.router_models.test_routers import (
    EXPERTS,
    HELD_OUT_MATH,
    HELD_OUT_POEMS,
    assert_learned_the_signal,
    training_rows,
)

SMALL = dict(hidden=16, epochs=80, k=5, lr=0.01, progress=False)
QUERIES = HELD_OUT_MATH + HELD_OUT_POEMS + ["an unrelated query about nothing in particular"]


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> BenchmarkLogs:
    return load_logs(write_logs(training_rows(), tmp_path_factory.mktemp("g") / "train.jsonl"))


@pytest.fixture(scope="module")
def router(logs) -> GraphRouter:
    return GraphRouter(**SMALL).fit(logs)


def unlabelled(logs: BenchmarkLogs) -> BenchmarkLogs:
    return BenchmarkLogs(logs.prompt_ids, logs.prompts, [""] * logs.n_prompts, logs.experts,
                         logs.scores.copy(), logs.costs.copy())


# ---- graph construction ----------------------------------------------------------------

def test_fitted_graph_has_the_documented_nodes_edges_and_attrs(router, logs):
    data = router._graph()
    n, m, k = logs.n_prompts, logs.n_experts, SMALL["k"]
    assert (data["query"].x.shape, data["task"].x.shape, data["expert"].x.shape) == \
        ((n, 384), (2, 385), (m, 385))
    assert set(data.edge_types) == set(EDGE_TYPES)
    shapes = {QQ: n * k, QE: n * m, EQ: n * m, QT: n, TQ: n, TE: 2 * m, ET: 2 * m}
    for et, count in shapes.items():
        assert data[et].edge_index.shape == (2, count), et
    for et, dim in ((QQ, 1), (QE, 2), (EQ, 2), (TQ, 1), (TE, 3), (ET, 3)):
        assert data[et].edge_attr.shape == (shapes[et], dim), et
    assert "edge_attr" not in data[QT]
    for fwd, rev in ((QE, EQ), (TE, ET)):  # reverse edges: flipped index, the same attrs
        assert torch.equal(data[rev].edge_index, data[fwd].edge_index.flip(0))
        assert torch.equal(data[rev].edge_attr, data[fwd].edge_attr)
    qq = data[QQ].edge_index
    assert not (qq[0] == qq[1]).any()  # a training query is not its own neighbour
    poem = [i for i, t in enumerate(logs.tasks) if t == "poetry"]
    src_of_poems = qq[0][torch.isin(qq[1], torch.tensor(poem))]
    assert np.mean([logs.tasks[i] == "poetry" for i in src_of_poems.tolist()]) > 0.9


def test_hand_made_graph_shapes_and_task_expert_means():
    # 3 queries (tasks 0, 0, 1), 2 experts; 4 logged calls
    edges = Edges(qq=np.array([[1, 0], [0, 1]]), qq_sim=np.array([0.9, 0.9], np.float32),
                  qe=np.array([[0, 1, 1, 2], [0, 0, 1, 1]]),
                  qe_attr=np.array([[1, 0], [0, 0], [1, 2], [0.5, 4]], np.float32),
                  qt=np.array([[0, 1, 2], [0, 0, 1]]), tq=np.array([[0, 0, 1], [0, 1, 2]]),
                  tq_w=np.ones(3, np.float32), q_task=np.array([0, 0, 1]))
    data = hetero_graph(np.zeros((3, 4)), np.zeros((2, 5)), np.zeros((2, 5)), edges)
    assert data[QE].edge_index.shape == (2, 4) and data[EQ].edge_attr.shape == (4, 2)
    te = {tuple(p): a for p, a in zip(data[TE].edge_index.T.tolist(), data[TE].edge_attr.tolist())}
    assert set(te) == {(0, 0), (0, 1), (1, 1)}
    np.testing.assert_allclose(te[(0, 0)], [0.5, 0.0, np.log1p(2) / 10], rtol=1e-6)  # mean of 1, 0
    np.testing.assert_allclose(te[(1, 1)], [0.5, 4.0, np.log1p(1) / 10], rtol=1e-6)
    ei, attr = task_expert_stats(np.array([0]), np.array([1]), np.array([1.0]), np.array([0.0]), 2, 2)
    assert ei.tolist() == [[0], [1]] and attr.shape == (1, 3)


def test_soft_task_weights_follow_neighbour_similarity():
    lab_task = np.array([0, 0, 1, 2])
    nbr = np.array([[0, 1, 2], [3, -1, -1]])
    rows, tasks, w = soft_tasks(nbr, np.array([[0.5, 0.3, 0.2], [0.9, 0, 0]]), lab_task)
    got = {(r, t): x for r, t, x in zip(rows, tasks, w)}
    assert got == pytest.approx({(0, 0): 0.8, (0, 1): 0.2, (1, 2): 1.0}, abs=1e-5)


def test_unknown_tasks_become_k_means_pseudo_tasks(logs):
    from router_models.featurize import MiniLMFeaturizer

    emb = MiniLMFeaturizer().transform(logs.prompts)
    task, names = assign_tasks([""] * logs.n_prompts, emb, n_clusters=2, seed=0)
    assert names == ["cluster-0", "cluster-1"] and task.shape == (logs.n_prompts,)
    truth = np.array([t == "math" for t in logs.tasks])
    agree = max(np.mean((task == 0) == truth), np.mean((task == 1) == truth))
    assert agree > 0.9  # the clusters are the two topics
    mixed, names = assign_tasks(["a", ""] * 20, emb, None, 0)
    assert names[0] == "a" and all(n.startswith("cluster-") for n in names[1:])
    assert (mixed[::2] == 0).all() and (mixed[1::2] >= 1).all()


def test_router_on_unlabelled_logs_uses_pseudo_tasks(logs):
    r = GraphRouter(**SMALL, n_clusters=3).fit(unlabelled(logs))
    assert r.tasks_ == ["cluster-0", "cluster-1", "cluster-2"]
    assert r._graph()["task"].x.shape == (3, 385)
    assert r.explain(HELD_OUT_POEMS[0])["tasks"][0]["task"].startswith("cluster-")


def test_cost_scale_standardises_log_costs():
    scale = CostScale.fit(np.array([[1e-4, np.nan], [1e-2, 1e-3]]))
    assert scale.mu == pytest.approx(-3.0, abs=1e-4)
    np.testing.assert_allclose(scale(np.array([1e-3, np.nan])), [0.0, 0.0], atol=1e-5)


# ---- the network -----------------------------------------------------------------------

def test_forward_and_decoder_shapes():
    rng = np.random.default_rng(0)
    edges = Edges(qq=np.array([[0, 1, 2], [1, 2, 0]]), qq_sim=np.ones(3, np.float32),
                  qe=np.array([[0, 1, 2, 3], [0, 1, 0, 1]]), qe_attr=rng.random((4, 2)).astype(np.float32),
                  qt=np.array([[0, 1], [0, 0]]), tq=np.array([[0, 0], [0, 1]]),
                  tq_w=np.ones(2, np.float32), q_task=np.zeros(5, np.int64))
    data = hetero_graph(rng.random((5, 8)), rng.random((1, 9)), rng.random((2, 9)), edges)
    model = HeteroGNN({"query": 8, "task": 9, "expert": 9}, hidden=12, layers=3)
    states = model(data.x_dict, data.edge_index_dict, data.edge_attr_dict)
    assert len(states) == 4
    for s in states:
        assert {v: tuple(h.shape) for v, h in s.items()} == {"query": (5, 12), "task": (1, 12),
                                                              "expert": (2, 12)}
    assert data["query"].pair.shape == (5, 2, PAIR_DIM)
    assert model.decode_all(states[-1]["query"], states[-1]["expert"], data["query"].pair).shape == (5, 2)
    before = [p.clone() for p in model.parameters()]
    model.reset_parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_probe_learns_a_linear_signal_and_its_training_scores_are_out_of_fold():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16))
    Y = np.stack([(emb[:, 0] > 0).astype(float), rng.integers(0, 2, 300).astype(float),
                  np.full(300, np.nan)], axis=1)
    Y[290:, 2] = 1.0                           # 10 logged calls: too few for a probe
    probe, oof = Probe.fit(emb, Y, seed=0)
    assert probe.w.shape == (17, 3) and oof.shape == (300, 3)
    np.testing.assert_array_equal(probe.n, [300, 300, 0])
    np.testing.assert_allclose(probe.support, [300 / 350, 300 / 350, 0])
    assert np.isnan(probe.w[:, 2]).all() and np.isnan(oof[:, 2]).all()
    test = rng.normal(size=(200, 16))
    scores, support = probe(test)
    assert np.isnan(scores[:, 2]).all() and support[2] == 0
    assert np.mean(np.abs(scores[:, 0] - (test[:, 0] > 0))) < 0.3   # the signal, on new rows
    assert np.mean(np.abs(oof[:, 0] - Y[:, 0])) < 0.3
    # noise: fitted on all rows it finds some, out of fold it cannot
    in_sample = np.mean((probe(emb)[0][:, 1] - Y[:, 1]) ** 2)
    assert np.mean((oof[:, 1] - Y[:, 1]) ** 2) > in_sample
    assert ((0 <= oof[:, :2]) & (oof[:, :2] <= 1)).all()
    # one more expert from its own 40 calls: a probe of support 40 / 90
    more = probe.with_expert(emb[:40], (emb[:40, 1] > 0).astype(float))
    assert more.w.shape == (17, 4) and more.n[3] == 40
    assert np.mean(np.abs(more(test)[0][:, 3] - (test[:, 1] > 0))) < 0.4
    np.testing.assert_array_equal(more.w[:, :3], probe.w)
    assert probe.with_expert(emb[:5], np.ones(5)).n[3] == 0        # 5 calls: none


def test_probe_channels_carry_the_support_and_are_zero_without_a_probe():
    label = np.ones((2, 3, PAIR_DIM - 2), np.float32)
    scores = np.array([[0.7, np.nan, 0.1], [np.nan, np.nan, 0.2]])
    pair = with_probe(label, (scores, np.array([0.9, 0.0, 0.3])))
    np.testing.assert_allclose(pair[..., -2:], [[[0.7, 0.9], [0, 0], [0.1, 0.3]],
                                                [[0, 0], [0, 0], [0.2, 0.3]]], rtol=1e-6)
    np.testing.assert_array_equal(with_probe(label, None)[..., -2:], 0)


def test_router_without_probe_learns_from_the_graph_alone(logs):
    r = GraphRouter(probe=False, **SMALL).fit(logs)
    assert np.isnan(r.probe_w_).all()
    assert_learned_the_signal(r)


# ---- learning and inference --------------------------------------------------------------

def test_router_learns_the_signal_and_training_reduces_the_loss(router, logs):
    assert router.experts_ == EXPERTS
    assert_learned_the_signal(router)
    # cross-entropy above the targets' own entropy (the generalist's 0.5 cannot be beaten)
    s = np.clip(logs.scores, 1e-12, 1 - 1e-12)
    floor = float(np.mean(-(s * np.log(s) + (1 - s) * np.log(1 - s))))
    loss = np.array(router.history_["train_loss"])
    assert loss[0] - floor > 0.005  # the untrained network is not already there
    assert np.mean(loss[-10:]) - floor < 0.3 * (loss[0] - floor)


@pytest.mark.parametrize("conv", [
    SourceFirstGeneralConv((6, 6), 5, 1, aggr="add", skip_linear=True, heads=1, attention=True),
    SourceFirstGeneralConv((6, 6), 5, 3, aggr="add", skip_linear=True, heads=2, attention=True),
    ScoreGatedConv(6, 5, 2),
], ids=["attention-1-head", "attention-2-heads", "score-gated"])
@pytest.mark.parametrize("n_edges", [0, 1, 9])
def test_messages_into_new_nodes_equal_pyg_propagate(conv, n_edges):
    """The written-out relation (the live path) gives PyG's numbers, for several target
    nodes of which some receive no edge, and for no edge at all."""
    torch.manual_seed(0)
    x = (torch.randn(7, 6), torch.randn(4, 6))
    ei = torch.stack([torch.randint(0, 7, (n_edges,)), torch.randint(0, 3, (n_edges,))])  # node 3: none
    dim = conv.lin_edge.weight.shape[1]
    attr = torch.rand(n_edges, dim)
    with torch.no_grad():
        got = messages_into_new(conv, x, ei, attr)
        want = conv(x, ei, edge_attr=attr)
    assert got.shape == want.shape == (4, 5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if n_edges:
        with torch.no_grad():
            other = messages_into_new(conv, x, ei, 1 - attr)
        assert not torch.allclose(other[ei[1].unique()], got[ei[1].unique()])  # the edges count


def test_cached_inference_equals_the_full_graph_with_the_queries_inserted(router):
    cached = router.predict_quality(QUERIES)
    np.testing.assert_allclose(cached, router._predict_full_graph(QUERIES), atol=1e-5)
    one_by_one = np.vstack([router.predict_quality([q]) for q in QUERIES])
    np.testing.assert_allclose(cached, one_by_one, atol=1e-6)  # a query's batch does not matter


@pytest.mark.parametrize("params", [{}, {"heads": 2, "gated": False}], ids=["default", "2-heads-ungated"])
def test_the_numpy_live_pass_equals_the_torch_modules(logs, router, params):
    """Live queries go through :class:`NewQueryPass`; its states and scores are the torch
    path's (``forward_new`` + ``decode_all``) for one query and for a batch."""
    r = router if not params else GraphRouter(**SMALL, **params).fit(logs)
    live = r._live()
    assert isinstance(live, NewQueryPass)
    emb = r.featurizer_.transform(QUERIES)
    h_torch, pair_torch = r._new_states(emb)
    edges, pair = r._new_edges(emb)
    np.testing.assert_allclose(live.states(emb, edges), h_torch.numpy(), atol=1e-5)
    np.testing.assert_allclose(pair, pair_torch.numpy(), atol=0)
    np.testing.assert_allclose(r.predict_quality(QUERIES), r._scores(h_torch, pair_torch), atol=1e-6)
    np.testing.assert_allclose(r.predict_quality(QUERIES[:1]), r._scores(h_torch, pair_torch)[:1], atol=1e-6)


def test_the_live_pass_follows_the_graph_and_falls_back_to_torch(logs):
    from torch_geometric.nn import GeneralConv

    r = GraphRouter(**SMALL).fit(logs)
    before = r._live()
    r.add_expert("coin", MATH_TRAIN, [1.0] * len(MATH_TRAIN), price_per_call=1e-3)
    assert r._live() is not before   # the cached states changed: rebuilt
    np.testing.assert_allclose(r.predict_quality(QUERIES), r._predict_full_graph(QUERIES), atol=1e-5)
    # a relation into queries that the pass does not write out: the torch modules score
    model = copy.deepcopy(r.model_)
    model.convs[0].convs[QQ] = GeneralConv((16, 16), 16, 1, aggr="add", skip_linear=True, attention=True)
    assert NewQueryPass.build(model, r.states_) is None
    assert NewQueryPass.build(model.train(), r.states_) is None
    r.model_ = model.eval()
    assert r._live() is None
    emb = r.featurizer_.transform(QUERIES)
    own = r._scores(*r._new_states(emb))
    np.testing.assert_allclose(r._own_predict(emb), own, atol=1e-6)
    np.testing.assert_allclose(r.predict_quality(QUERIES), np.clip(sparse.lean(own, r.lean_), 0, 1), atol=1e-6)


def test_fit_is_deterministic(logs, router):
    again = GraphRouter(**SMALL).fit(logs)
    np.testing.assert_array_equal(again.predict_quality(QUERIES), router.predict_quality(QUERIES))


def test_nan_scores_are_skipped(logs):
    gappy = logs.subset(np.arange(logs.n_prompts))
    gappy.scores[::3, 1] = np.nan
    gappy.costs[::3, 1] = np.nan
    r = GraphRouter(**SMALL).fit(gappy)
    assert r.qe_.shape[1] == int((~np.isnan(gappy.scores)).sum())
    assert np.isfinite(r.qe_attr_).all()
    assert_learned_the_signal(r)


@pytest.mark.parametrize("n_prompts, n_experts", [(1, 1), (2, 3), (3, 2)])
def test_tiny_logs_do_not_crash(logs, n_prompts, n_experts):
    tiny = logs.subset(np.arange(n_prompts)).select_experts(EXPERTS[:n_experts])
    r = GraphRouter(**SMALL).fit(tiny)
    q = r.predict_quality(QUERIES)
    assert q.shape == (len(QUERIES), n_experts) and np.isfinite(q).all()
    r.add_expert("late", QUERIES[:2], [1.0, 0.0], [1e-3, 1e-3])
    assert r.predict_quality(QUERIES[:1]).shape == (1, n_experts + 1)


def test_unfitted_router_raises_not_fitted(tmp_path):
    r = GraphRouter()
    for call in (lambda: r.predict_quality(["x"]), lambda: r.explain("x"),
                 lambda: r.save(tmp_path / "r"), lambda: r.add_expert("e", ["x"], [1.0], [0.1])):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()


@pytest.mark.parametrize("params, match", [({"k": 0}, "k must be >= 1"),
                                           ({"mask_frac": 1.0}, "mask_frac")])
def test_bad_hyper_parameters_raise(logs, params, match):
    with pytest.raises(ValueError, match=match):
        GraphRouter(**{**SMALL, **params}).fit(logs)


def test_registry_names_the_graph_router():
    assert ROUTERS["gnn"] is GraphRouter


# ---- a new expert ----------------------------------------------------------------------

MATH_TRAIN = ["What is 12 plus 30?", "Compute 9 times 4.", "What is 250 plus 17?",
              "Compute 13 times 11.", "What is 8 plus 99?", "Compute 21 times 3."]
POEM_TRAIN = ["Write a short poem about the harbour at dawn.", "Compose a haiku about a red fox.",
              "Write a short poem about an empty train station.", "Compose a haiku about moss.",
              "Write a short poem about a paper boat.", "Compose a haiku about thunder."]


def test_new_expert_predictions_follow_its_few_examples(router, logs):
    r = GraphRouter(**SMALL).fit(logs)
    before = r.predict_quality(QUERIES)
    # 'calc' is right on arithmetic, 'bard' on poems: unseen prompts plus 4 training prompts
    math_pids = [i for i, t in enumerate(logs.tasks) if t == "math"][:2]
    poem_pids = [i for i, t in enumerate(logs.tasks) if t == "poetry"][:2]
    prompts = MATH_TRAIN + POEM_TRAIN + [logs.prompts[i] for i in math_pids + poem_pids]
    is_math = np.array([1] * 6 + [0] * 6 + [1, 1, 0, 0], float)
    pre = r.predict_cost(prompts)
    shape = (pre / r.cost_model_.typical).mean(axis=1)   # the others' relative cost of the 16
    r.add_expert("calc", prompts, is_math, costs=np.full(16, 2e-3))
    r.add_expert("bard", prompts, 1 - is_math, price_per_call=5e-4, description="a poet")
    assert r.experts_ == EXPERTS + ["calc", "bard"]
    assert r.n_lab_ == logs.n_prompts and len(r.q_emb_) == logs.n_prompts + 12  # 12 new nodes
    q = r.predict_quality(HELD_OUT_MATH + HELD_OUT_POEMS)
    assert q.shape == (6, 5)
    calc, bard = q[:, 3], q[:, 4]
    assert calc[:3].min() > calc[3:].max(), calc
    assert bard[3:].min() > bard[:3].max(), bard
    # priced from its logged costs next to the others' on the same prompts, and at its
    # price: that on average over the training prompts, shaped like the others
    calc_price = 16 * 2e-3 / shape.sum()
    np.testing.assert_allclose(r.predict_cost(logs.prompts)[:, 3:].mean(axis=0), [calc_price, 5e-4], rtol=1e-6)
    c = r.predict_cost(["x" * 50, logs.prompts[0]])
    np.testing.assert_allclose(c[:, 3] / c[:, 4], calc_price / 5e-4)
    assert r.cost_scale_ >= 2e-3
    # the old experts keep predicting what they did (states moved a little, not the signal)
    assert np.abs(r.predict_quality(QUERIES)[:, :3] - before).max() < 0.2
    assert r.explain(QUERIES[0])["logged_calls"]["calc"] == 16
    # 16 calls are too few for a probe: the new experts' pairs read the graph's labels only
    assert np.isnan(r.probe_w_[:, 3:]).all() and not np.isnan(r.probe_w_[:, :3]).any()
    _, pair = r._new_states(r.featurizer_.transform(QUERIES))
    assert (pair[:, :3, -1] > 0.4).all() and (pair[:, 3:, -1] == 0).all()
    r.add_expert("sage", prompts + logs.prompts[:20], np.r_[is_math, np.ones(20)], price_per_call=1e-3)
    assert r.probe_n_[-1] == 36
    _, pair = r._new_states(r.featurizer_.transform(QUERIES))
    np.testing.assert_allclose(pair[:, -1, -1], 36 / 86, rtol=1e-6)
    np.testing.assert_allclose(r.predict_quality(QUERIES), r._predict_full_graph(QUERIES), atol=1e-5)


def test_an_expert_with_few_calls_leans_on_the_others(logs, tmp_path):
    """An added expert's own prediction weighs n / (n + OWN_CALLS); the rest is the other
    experts' mean prediction shifted toward its mean logged score (by n / (n + 50)). With
    no calls it is their mean: an average expert at its own price."""
    from router_models.base import ROUTER_FILE
    from router_models.graph import OWN_CALLS

    r = GraphRouter(**SMALL).fit(logs)
    assert r.lean_ is None                        # every expert logged on every prompt
    r.add_expert("blank", [], [], price_per_call=1e-3)
    q = r.predict_quality(QUERIES)
    np.testing.assert_allclose(q[:, 3], q[:, :3].mean(axis=1), atol=1e-12)
    assert r.lean_["weight"][3] == 0 and r.lean_["shift"][3] == 0
    prompts = MATH_TRAIN + POEM_TRAIN
    is_math = np.array([1.0] * 6 + [0.0] * 6)
    r.add_expert("calc", prompts, is_math, price_per_call=1e-3)
    emb = r.featurizer_.transform(QUERIES)
    own = r._own_predict(emb)
    w = 12 / (12 + OWN_CALLS)
    base_on_its_prompts = r._own_predict(r.featurizer_.transform(prompts))[:, :3].mean()
    shift = (is_math.mean() - base_on_its_prompts) * 12 / (12 + sparse.SHIFT_CALLS)
    np.testing.assert_array_equal(r.lean_["base"], [True, True, True, False, False])
    np.testing.assert_allclose(r.lean_["weight"], [1, 1, 1, 0, w])
    np.testing.assert_allclose(r.lean_["shift"][4], shift, rtol=1e-6)
    q = r.predict_quality(QUERIES)
    np.testing.assert_allclose(q[:, :3], own[:, :3], atol=1e-12)   # the others: their own
    np.testing.assert_allclose(q[:, 4], w * own[:, 4] + (1 - w) * np.clip(own[:, :3].mean(axis=1) + shift, 0, 1))
    assert np.abs(q[:, 4] - own[:, 4]).max() > 0.01
    assert r.explain(QUERIES[0])["own_prediction_weight"] == {"blank": 0.0, "calc": round(w, 4)}
    d = r.save(tmp_path / "gnn")
    np.testing.assert_array_equal(load_router(d).predict_quality(QUERIES), q)
    meta = json.loads((d / ROUTER_FILE).read_text())
    del meta["state"]["lean"]                     # saved before added experts leaned
    (d / ROUTER_FILE).write_text(json.dumps(meta))
    old = load_router(d)
    assert old.lean_ is None and "own_prediction_weight" not in old.explain(QUERIES[0])
    np.testing.assert_allclose(old.predict_quality(QUERIES), np.clip(own, 0, 1), atol=1e-6)


def test_new_expert_fine_tuning_moves_only_its_own_column(logs):
    # 'coin' is right on a third of anything: its examples disagree with the topic signal
    prompts, scores = MATH_TRAIN + POEM_TRAIN, [1.0, 0.0, 0.0] * 4

    def example_loss(r):
        q = np.clip(r.predict_quality(prompts)[:, 3], 1e-6, 1 - 1e-6)
        return -np.mean(np.array(scores) * np.log(q) + (1 - np.array(scores)) * np.log(1 - q))

    frozen = GraphRouter(**SMALL).fit(logs).add_expert("coin", prompts, scores, price_per_call=1e-3)
    tuned = GraphRouter(**SMALL).fit(logs).add_expert("coin", prompts, scores, price_per_call=1e-3,
                                                       finetune_steps=50)
    q, q0 = tuned.predict_quality(QUERIES), frozen.predict_quality(QUERIES)
    np.testing.assert_allclose(q[:, :3], q0[:, :3], atol=1e-6)
    assert np.abs(q[:, 3] - q0[:, 3]).max() > 1e-3
    assert example_loss(tuned) < example_loss(frozen)


def test_add_expert_validates_its_input(router):
    r = copy.deepcopy(router)
    with pytest.raises(ValueError, match="already"):
        r.add_expert("math", ["x"], [1.0], [0.1])
    with pytest.raises(ValueError, match="price_per_call"):
        r.add_expert("new", ["x"], [1.0])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        r.add_expert("new", ["x"], [2.0], [0.1])
    with pytest.raises(ValueError, match="1 prompts, 2 scores"):
        r.add_expert("new", ["x"], [1.0, 0.0], [0.1])
    assert r.experts_ == EXPERTS


def test_new_expert_nan_scores_are_skipped(logs):
    r = GraphRouter(**SMALL).fit(logs)
    edges = r.qe_.shape[1]
    r.add_expert("calc", MATH_TRAIN[:3] + POEM_TRAIN[:1], [1.0, np.nan, 1.0, 0.0], [1e-3] * 4)
    assert r.qe_.shape[1] == edges + 3 and np.isfinite(r.predict_quality(QUERIES)).all()


# ---- explain, save, load -----------------------------------------------------------------

def test_explain_names_neighbours_tasks_and_scores(router):
    out = router.explain(HELD_OUT_POEMS[0])
    assert out["router"] == "gnn" and list(out["experts"]) == EXPERTS
    nb = out["neighbours"]
    assert len(nb) == 5 and all(n["prompt_id"].startswith("p") for n in nb), nb
    sims = [n["similarity"] for n in nb]
    assert sims == sorted(sims, reverse=True)
    assert out["tasks"][0]["task"] == "poetry"
    assert sum(t["weight"] for t in out["tasks"]) == pytest.approx(1.0, abs=1e-3)
    assert out["experts"]["poet"]["quality"] > out["experts"]["math"]["quality"]
    json.dumps(out)


def test_save_load_round_trip_is_identical_and_never_unpickles(logs, tmp_path, monkeypatch):
    r = GraphRouter(**SMALL).fit(logs)
    r.add_expert("calc", MATH_TRAIN + POEM_TRAIN, [1] * 6 + [0] * 6, [1e-3] * 12, finetune_steps=5)
    r.predict_quality(QUERIES)   # builds the live pass, which is not saved
    d = r.save(tmp_path / "gnn")

    def refuse(*a, **k):
        raise AssertionError("load_router unpickled something")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load_router(d)
    assert type(loaded) is GraphRouter and loaded.get_params() == r.get_params()
    assert loaded.experts_ == r.experts_
    np.testing.assert_array_equal(loaded.predict_quality(QUERIES), r.predict_quality(QUERIES))
    np.testing.assert_array_equal(loaded.predict_cost(QUERIES), r.predict_cost(QUERIES))
    assert loaded.explain(QUERIES[0]) == r.explain(QUERIES[0])
    loaded.add_expert("bard", POEM_TRAIN, [1.0] * 6, price_per_call=1e-4)  # still extensible
    assert loaded.predict_quality(QUERIES).shape == (len(QUERIES), 5)


def test_an_artifact_from_before_the_probe_asks_to_retrain(logs, tmp_path):
    from safetensors.numpy import load_file, save_file

    from router_models.base import ARRAYS_FILE, ArtifactError

    d = GraphRouter(**SMALL).fit(logs).save(tmp_path / "gnn")
    arrays = load_file(str(d / ARRAYS_FILE))
    del arrays["probe_w"]
    save_file(arrays, str(d / ARRAYS_FILE))
    with pytest.raises(ArtifactError, match="saved before the router had its probe; train it again"):
        load_router(d)
