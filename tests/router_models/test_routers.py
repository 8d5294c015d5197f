"""kNN and classifier routers on hand-made logs with a signal they must learn, the cost
model, and the artifact files (JSON + safetensors, never a pickle).

The logs: 20 arithmetic prompts and 20 poem prompts. Expert ``math`` scores 1 on
arithmetic and 0 on poems, ``poet`` the reverse, ``generalist`` 0.5 everywhere; each
expert's cost is a known linear function of the prompt's length.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from router_models import ROUTERS, ClassifierRouter, KNNRouter, load_router
from router_models.base import (
    ARRAYS_FILE,
    ROUTER_FILE,
    ArtifactError,
    CostModel,
    NotFittedError,
)
from router_models.classifier import CANDIDATES
from router_models.featurize import minilm_model
from router_models.logs import BenchmarkLogs, load_logs, write_logs

EXPERTS = ["generalist", "math", "poet"]  # sorted, as experts_ must be
PRICE = {"math": (0.002, 1e-5), "poet": (0.0004, 1e-6), "generalist": (0.001, 0.0)}
SUBJECTS = ["the moon", "the ocean", "autumn leaves", "a lonely lighthouse", "spring rain",
            "the desert wind", "a sleeping cat", "winter stars", "a mountain river", "city lights"]
POEM_FORMS = ["Write a short poem about {}.", "Compose a haiku about {}."]
SUMS = ["What is {} plus {}?", "Compute {} times {}."]

HELD_OUT_MATH = ["What is 123 plus 456?", "Compute 7 times 8.", "What is 91 plus 5?"]
HELD_OUT_POEMS = ["Write a short poem about the summer sun.", "Compose a haiku about falling snow.",
                  "Write a short poem about an old oak tree."]


def price(model: str, prompt: str) -> float:
    a, b = PRICE[model]
    return a + b * len(prompt)


def training_rows(skip: set[tuple[str, str]] = frozenset()) -> list[dict]:
    rng = np.random.default_rng(0)
    prompts = []
    for i in range(20):
        a, b = rng.integers(2, 500, size=2)
        prompts.append((f"m{i:02d}", "math", SUMS[i % 2].format(a, b)))
        prompts.append((f"p{i:02d}", "poetry", POEM_FORMS[i % 2].format(SUBJECTS[i // 2])))
    rows = []
    for pid, task, text in prompts:
        for model in ("poet", "math", "generalist"):  # not sorted: loading sorts them
            if (pid, model) in skip:
                continue
            score = 0.5 if model == "generalist" else float((model == "math") == (task == "math"))
            rows.append({"prompt_id": pid, "prompt": text, "task": task, "model": model,
                         "score": score, "cost_usd": price(model, text)})
    return rows


@pytest.fixture(scope="session")
def minilm():
    return minilm_model()  # the real offline model, loaded once


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkLogs:
    path = write_logs(training_rows(), tmp_path_factory.mktemp("logs") / "train.jsonl")
    return load_logs(path)


@pytest.fixture(scope="module")
def gappy_logs(tmp_path_factory: pytest.TempPathFactory) -> BenchmarkLogs:
    """Some (prompt, expert) cells never logged: their scores and costs are NaN."""
    skip = {(f"m{i:02d}", "poet") for i in range(0, 20, 3)} | {(f"p{i:02d}", "math") for i in range(1, 20, 4)}
    skip |= {("m05", "generalist"), ("m05", "math")}
    path = write_logs(training_rows(skip), tmp_path_factory.mktemp("gappy") / "train.csv")
    out = load_logs(path)
    assert np.isnan(out.scores).sum() == len(skip)
    return out


# Every router kind and head; cv=1 skips model selection where it is not the subject.
KINDS = {
    "knn": lambda: KNNRouter(k=5),
    "tfidf-logreg": lambda: ClassifierRouter(featurizer="tfidf", model="logreg", cv=1),
    "tfidf-mlp": lambda: ClassifierRouter(featurizer="tfidf", model="mlp", cv=1),
    "minilm-logreg": lambda: ClassifierRouter(featurizer="minilm", model="logreg", cv=1),
    "minilm-mlp": lambda: ClassifierRouter(featurizer="minilm", model="mlp", cv=1),
}


@pytest.fixture(scope="module")
def fitted(logs: BenchmarkLogs, minilm) -> dict:
    return {name: make().fit(logs) for name, make in KINDS.items()}


def assert_learned_the_signal(router, queries_math=HELD_OUT_MATH, queries_poems=HELD_OUT_POEMS):
    q = router.predict_quality(queries_math + queries_poems)
    assert q.shape == (len(queries_math) + len(queries_poems), 3)
    assert np.isfinite(q).all() and (q >= 0).all() and (q <= 1).all()
    math, poet = router.experts_.index("math"), router.experts_.index("poet")
    k = len(queries_math)
    assert (q[:k, math] - q[:k, poet] > 0.05).all(), q
    assert (q[k:, poet] - q[k:, math] > 0.05).all(), q


# ---- learning ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_router_predicts_the_right_expert_on_held_out_prompts(fitted, kind):
    router = fitted[kind]
    assert router.experts_ == EXPERTS
    assert_learned_the_signal(router)


@pytest.mark.parametrize("kind", list(KINDS))
def test_router_tolerates_unlogged_scores(gappy_logs, minilm, kind):
    router = KINDS[kind]().fit(gappy_logs)
    assert_learned_the_signal(router)
    assert np.isfinite(router.predict_cost(HELD_OUT_MATH)).all()


def test_knn_prediction_is_the_mean_of_the_k_nearest_training_scores(logs, fitted):
    router = fitted["knn"]
    q = router.predict_quality([logs.prompts[0]])[0]    # a training prompt: itself is nearest
    sims = router.X_ @ router.X_[0]
    nearest = np.argsort(-sims)[:5]
    np.testing.assert_allclose(q, logs.scores[nearest].mean(axis=0), rtol=1e-6)


@pytest.mark.parametrize("kind", list(KINDS))
def test_shapes_and_empty_input(fitted, kind):
    router = fitted[kind]
    assert router.predict_quality([]).shape == (0, 3)
    assert router.predict_cost([]).shape == (0, 3)
    assert router.predict_quality(["x"] * 4).shape == (4, 3)


def test_cost_predictions_follow_the_logged_linear_prices(fitted):
    queries = HELD_OUT_MATH + ["Write a much, much longer poem about " + "the sea " * 30]
    expected = np.array([[price(e, t) for e in EXPERTS] for t in queries])
    for router in fitted.values():
        np.testing.assert_allclose(router.predict_cost(queries), expected, rtol=1e-6)


def test_cost_scale_is_the_dearest_experts_mean_predicted_cost(logs, fitted):
    expected = max(np.mean([price(e, p) for p in logs.prompts]) for e in EXPERTS)
    assert fitted["tfidf-logreg"].cost_scale_ == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("router", [KNNRouter(), ClassifierRouter(featurizer="tfidf")],
                         ids=["knn", "classifier"])
def test_unfitted_router_raises_not_fitted(router, tmp_path):
    for call in (lambda: router.predict_quality(["x"]), lambda: router.predict_cost(["x"]),
                 lambda: router.explain("x"), lambda: router.save(tmp_path / "r")):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("router, match", [
    (ClassifierRouter(featurizer="bow"), "unknown featurizer 'bow'"),
    (ClassifierRouter(featurizer="tfidf", model="forest"), "unknown model 'forest'"),
    (KNNRouter(k=0), "k must be >= 1"),
])
def test_bad_hyper_parameters_raise_value_error(logs, router, match):
    with pytest.raises(ValueError, match=match):
        router.fit(logs)


def test_fit_on_empty_logs_raises(logs):
    with pytest.raises(ValueError, match="empty"):
        KNNRouter().fit(logs.subset([]))


def test_cv_model_selection_records_results_and_picks_from_the_grid(logs):
    router = ClassifierRouter(featurizer="tfidf", model="auto", cv=3).fit(logs)
    grid = CANDIDATES["logreg"] + CANDIDATES["mlp"]
    assert [r["model"] for r in router.cv_results_] == grid
    for r in router.cv_results_:
        assert 0 <= r["brier"] <= 1 and np.isfinite(r["aiq"])
    best = max(router.cv_results_, key=lambda r: (r["aiq"], -r["brier"]))
    chosen = router.head_.state()[0]
    assert {k: chosen[k] for k in best["model"]} == best["model"]
    # a learnable signal: the chosen head beats always predicting 0.5 out of fold
    assert best["brier"] < 0.25 * (2 / 3) + 1e-9
    assert router.explain(HELD_OUT_MATH[0])["cross_validation"] == router.cv_results_
    assert_learned_the_signal(router)


def test_no_cv_when_disabled_uses_the_first_candidate(fitted):
    router = fitted["tfidf-logreg"]
    assert router.cv_results_ == []
    assert router.head_.state()[0] == CANDIDATES["logreg"][0]


# ---- explain -------------------------------------------------------------------------

def test_explain_knn_names_the_neighbours(fitted):
    router = fitted["knn"]
    out = router.explain(HELD_OUT_MATH[0])
    assert out["router"] == "knn"
    q, c = router.predict_quality(HELD_OUT_MATH[:1])[0], router.predict_cost(HELD_OUT_MATH[:1])[0]
    assert list(out["experts"]) == EXPERTS
    for j, e in enumerate(EXPERTS):
        assert out["experts"][e]["quality"] == round(float(q[j]), 4)
        assert out["experts"][e]["cost_usd"] == pytest.approx(c[j])
    nb = out["neighbours"]
    assert len(nb) == 5
    assert all(n["prompt_id"].startswith("m") for n in nb), nb   # arithmetic neighbours
    sims = [n["similarity"] for n in nb]
    assert sims == sorted(sims, reverse=True)
    json.dumps(out)  # plain JSON for the decision log


def test_explain_tfidf_logreg_gives_top_terms(fitted):
    router = fitted["tfidf-logreg"]
    out = router.explain(HELD_OUT_POEMS[0])
    assert out["router"] == "classifier" and out["features"] == "tfidf"
    assert set(out["top_terms"]) == set(EXPERTS)
    poet_terms = out["top_terms"]["poet"]
    assert poet_terms and all(t in HELD_OUT_POEMS[0].lower() for t, _ in poet_terms)
    contribs = [v for _, v in poet_terms]
    assert contribs == sorted(contribs, reverse=True) and contribs[0] > 0
    math_top = out["top_terms"]["math"][0][1]
    assert contribs[0] > math_top  # poem words push the poet up, not the math expert
    json.dumps(out)


def test_explain_mlp_has_no_top_terms(fitted):
    out = fitted["tfidf-mlp"].explain(HELD_OUT_POEMS[0])
    assert "top_terms" not in out and out["model"]["kind"] == "mlp"


# ---- artifacts -----------------------------------------------------------------------

QUERIES = HELD_OUT_MATH + HELD_OUT_POEMS + ["an unrelated query about nothing in particular"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_is_identical_and_never_unpickles(fitted, kind, tmp_path, monkeypatch):
    router = fitted[kind]
    before = router.predict_quality(QUERIES)   # what a prediction caches is not saved
    d = router.save(tmp_path / kind)
    assert sorted(p.name for p in d.iterdir()) == sorted([ROUTER_FILE, ARRAYS_FILE])
    assert not any(b"\x80\x04\x95" in p.read_bytes()[:64] for p in d.iterdir())  # no pickle header

    def refuse(*a, **k):
        raise AssertionError("load_router unpickled something")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", refuse)
    loaded = load_router(d)

    assert type(loaded) is type(router)
    assert loaded.get_params() == router.get_params()
    assert loaded.experts_ == router.experts_
    np.testing.assert_array_equal(loaded.predict_quality(QUERIES), before)
    np.testing.assert_array_equal(loaded.predict_cost(QUERIES), router.predict_cost(QUERIES))
    assert loaded.cost_scale_ == router.cost_scale_
    assert loaded.explain(QUERIES[0]) == router.explain(QUERIES[0])


LONG_QUERY = " ".join(f"Example {i}: what is {i} plus {i}? Answer: {2 * i}." for i in range(30)) + \
    " Now write a short poem about the moon."


@pytest.mark.parametrize("name", ["knn", "classifier", "symbolic", "gnn"])
def test_a_loaded_router_cuts_queries_as_it_was_trained(logs, minilm, name, tmp_path):
    """Every MiniLM router saves its featurizer's cut (the last 128 word pieces by
    default); one saved before the cut existed reads the first 256, as it was trained."""
    params = {"knn": {"k": 5}, "classifier": {"model": "logreg", "cv": 1},
              "symbolic": {"cv": 1}, "gnn": {"epochs": 20}}[name]
    router = ROUTERS[name](**params).fit(logs)
    assert router.featurizer_.state()[0] == {"name": "minilm", "max_pieces": 128, "keep": "tail"}
    d = router.save(tmp_path / name)
    loaded = load_router(d)
    assert loaded.featurizer_.state()[0] == router.featurizer_.state()[0]
    queries = [LONG_QUERY, HELD_OUT_MATH[0]]
    np.testing.assert_array_equal(loaded.predict_quality(queries), router.predict_quality(queries))

    meta = json.loads((d / ROUTER_FILE).read_text())
    if name == "classifier":
        meta["state"]["featurizer"] = {"name": "minilm"}
    else:
        del meta["state"]["featurizer"]
    (d / ROUTER_FILE).write_text(json.dumps(meta))
    old = load_router(d)
    assert (old.featurizer_.max_pieces, old.featurizer_.keep) == (256, "head")
    assert (old.query_pieces, old.query_keep) == (256, "head")   # its params say how it reads
    q_old, q_new = old.predict_quality(queries), loaded.predict_quality(queries)
    assert np.abs(q_old[0] - q_new[0]).max() > 1e-6       # the long query is read differently
    np.testing.assert_allclose(q_old[1], q_new[1], atol=1e-6)   # a short one alike


@pytest.mark.parametrize("name", ["knn", "classifier", "symbolic", "gnn"])
def test_the_query_cut_is_a_hyper_parameter_of_every_minilm_router(logs, minilm, name, tmp_path):
    params = {"knn": {"k": 5}, "classifier": {"model": "logreg", "cv": 1},
              "symbolic": {"cv": 1}, "gnn": {"epochs": 20}}[name]
    router = ROUTERS[name](**params, query_pieces=24, query_keep="head").fit(logs)
    assert router.featurizer_.state()[0] == {"name": "minilm", "max_pieces": 24, "keep": "head"}
    loaded = load_router(router.save(tmp_path / name))
    assert loaded.get_params() == router.get_params() and loaded.featurizer_.max_pieces == 24
    # reading the first 24 pieces of the last 1,000 characters, it does not see what a
    # long query asks at its end
    other = LONG_QUERY.replace("a short poem about the moon", "python code to sort a list!")
    assert len(other) == len(LONG_QUERY)
    X = loaded.featurizer_.transform([LONG_QUERY, other])
    np.testing.assert_allclose(X[0], X[1], atol=1e-6)
    np.testing.assert_allclose(*loaded.predict_quality([LONG_QUERY, other]), atol=1e-6)
    with pytest.raises(ValueError, match="query_pieces=1: expected a whole number from 2 to 256"):
        ROUTERS[name](**params, query_pieces=1).fit(logs)


def test_round_trip_keeps_cv_results(logs, tmp_path):
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=2).fit(logs)
    assert len(router.cv_results_) == len(CANDIDATES["logreg"])
    loaded = load_router(router.save(tmp_path / "r"))
    assert loaded.cv_results_ == router.cv_results_


def test_registry_names_every_router():
    from router_models.graph import GraphRouter
    from router_models.symbolic import SymbolicRouter

    assert ROUTERS == {"knn": KNNRouter, "classifier": ClassifierRouter, "symbolic": SymbolicRouter,
                       "gnn": GraphRouter}


@pytest.fixture()
def artifact(fitted, tmp_path) -> Path:
    return fitted["tfidf-logreg"].save(tmp_path / "good")


def _edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / ROUTER_FILE).read_text())
    meta.update(changes)
    (d / ROUTER_FILE).write_text(json.dumps(meta))


def test_load_missing_directory(tmp_path):
    with pytest.raises(ArtifactError, match=r"not a router directory \(no router.json\)"):
        load_router(tmp_path / "nowhere")


def test_load_directory_without_router_json(artifact):
    (artifact / ROUTER_FILE).unlink()
    with pytest.raises(ArtifactError, match="not a router directory"):
        load_router(artifact)


def test_load_broken_json(artifact):
    (artifact / ROUTER_FILE).write_text('{"version": 1, "router": ')
    with pytest.raises(ArtifactError, match="router.json is not valid JSON"):
        load_router(artifact)


def test_load_json_that_is_not_an_object(artifact):
    (artifact / ROUTER_FILE).write_text("[1, 2, 3]")
    with pytest.raises(ArtifactError, match="not a JSON object"):
        load_router(artifact)


def test_load_unknown_router_name(artifact):
    _edit_meta(artifact, router="gnn-from-the-future")
    with pytest.raises(ArtifactError, match="unknown router 'gnn-from-the-future'; known: classifier, gnn, knn, symbolic"):
        load_router(artifact)


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_load_wrong_version(artifact, version):
    _edit_meta(artifact, version=version)
    with pytest.raises(ArtifactError, match=f"artifact version {version!r}, this Switchyard reads version 1"):
        load_router(artifact)


def test_load_binary_garbage_json(artifact):
    (artifact / ROUTER_FILE).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_router(artifact)


def test_load_without_arrays_file(artifact):
    (artifact / ARRAYS_FILE).unlink()
    with pytest.raises(ArtifactError, match="incomplete or damaged classifier artifact.*tfidf.idf"):
        load_router(artifact)


def test_load_damaged_arrays_file(artifact):
    (artifact / ARRAYS_FILE).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ArtifactError, match="arrays.safetensors is not a safetensors file"):
        load_router(artifact)


def test_load_json_missing_a_field(artifact):
    meta = json.loads((artifact / ROUTER_FILE).read_text())
    del meta["cost_model"]
    (artifact / ROUTER_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="incomplete or damaged classifier artifact.*cost_model"):
        load_router(artifact)


def test_load_copy_elsewhere_still_works(artifact, tmp_path):
    moved = Path(shutil.copytree(artifact, tmp_path / "moved"))
    assert load_router(moved).predict_quality(QUERIES).shape == (len(QUERIES), 3)


# ---- cost model ------------------------------------------------------------------------

def test_cost_model_fits_a_known_linear_cost_exactly():
    prompts = ["x" * n for n in (3, 10, 40, 41, 200, 1000)]
    costs = np.array([[0.01 + 2e-5 * len(p), 0.5e-3 + 0.0 * len(p)] for p in prompts])
    cm = CostModel.fit(prompts, costs)
    np.testing.assert_allclose(cm.intercept, [0.01, 0.5e-3], rtol=1e-9)
    np.testing.assert_allclose(cm.slope, [2e-5, 0.0], atol=1e-15)
    np.testing.assert_allclose(cm.predict(["y" * 77]), [[0.01 + 77 * 2e-5, 0.5e-3]], rtol=1e-9)
    again = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())))
    np.testing.assert_array_equal(again.predict(prompts), cm.predict(prompts))


def test_cost_model_negative_fits_fall_back_to_the_mean():
    prompts = ["x" * n for n in (10, 20, 30, 40)]
    falling = [4.0, 3.0, 2.0, 1.0]                   # negative slope
    negative_icept = [0.0, 1.0, 2.0, 3.0]            # slope 0.1, intercept -1
    costs = np.array([falling, negative_icept]).T
    cm = CostModel.fit(prompts, costs)
    np.testing.assert_allclose(cm.intercept, [2.5, 1.5])
    np.testing.assert_array_equal(cm.slope, [0.0, 0.0])


def test_cost_model_missing_costs():
    prompts = ["a", "bbb", "ccccc", "ddddddd"]
    costs = np.array([[np.nan, 1.0, 2.0], [np.nan, np.nan, 2.0], [np.nan, 3.0, np.nan],
                      [np.nan, np.nan, np.nan]])
    cm = CostModel.fit(prompts, costs)
    # all-NaN column -> 0; two points -> their mean; NaN rows are skipped
    np.testing.assert_array_equal(cm.intercept, [0.0, 2.0, 2.0])
    np.testing.assert_array_equal(cm.slope, [0.0, 0.0, 0.0])
    assert np.isfinite(cm.predict(prompts)).all()


def kind_priced_logs(tmp_path: Path) -> BenchmarkLogs:
    """Code and multiple-choice questions of one length: ``verbose`` writes long answers to
    code questions ($0.01 a call) and a letter to the others ($0.001); ``flat`` costs
    $0.002 whatever it is asked. The length-only model can only average ``verbose``."""
    rows = []
    for i in range(24):
        code = i % 2 == 0
        text = (f"Write a python function that returns item {i:02d}" if code
                else f"Pick A or B: which letter comes first? {i:02d}")
        for model, cost in (("verbose", 0.01 if code else 0.001), ("flat", 0.002)):
            rows.append({"prompt_id": f"q{i}", "prompt": text.ljust(60, "."), "model": model,
                         "score": float(code == (model == "verbose")), "cost_usd": cost,
                         "task": "mixed"})
    return load_logs(write_logs(rows, tmp_path / "kinds.jsonl"))


def test_cost_model_reads_the_kind_of_question_from_the_routers_features(tmp_path):
    logs = kind_priced_logs(tmp_path)
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs)
    code = ["Write a python function that returns item 99".ljust(60, ".")]
    choice = ["Pick A or B: which letter comes first? 99".ljust(60, ".")]
    verbose, flat = router.experts_.index("verbose"), router.experts_.index("flat")
    length_only = CostModel.fit(logs.prompts, logs.costs).predict(code + choice)
    np.testing.assert_allclose(length_only[:, verbose], [0.0055, 0.0055], rtol=1e-6)
    c = router.predict_cost(code + choice)
    assert 0.008 < c[0, verbose] < 0.012 and 0.0005 < c[1, verbose] < 0.002, c
    np.testing.assert_allclose(c[:, flat], 0.002, rtol=1e-6)  # its cost never varied
    assert router.explain(code[0])["experts"]["verbose"]["cost_usd"] == pytest.approx(c[0, verbose])


def test_cost_model_kind_part_round_trips_and_old_artifacts_load(tmp_path):
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(kind_priced_logs(tmp_path))
    queries = ["Write a python function that returns item 7", "Pick A or B: 7", ""]
    d = router.save(tmp_path / "r")
    np.testing.assert_array_equal(load_router(d).predict_cost(queries), router.predict_cost(queries))

    # an artifact written before the kind part: the length model alone
    meta = json.loads((d / ROUTER_FILE).read_text())
    assert meta["cost_model"].pop("ratio") is True
    (d / ROUTER_FILE).write_text(json.dumps(meta))
    old = load_router(d)
    assert not old.cost_model_.has_ratio
    np.testing.assert_array_equal(old.predict_cost(queries),
                                  CostModel.from_dict(meta["cost_model"]).predict(queries))

    # router.json promises a kind part that the arrays file lacks
    meta["cost_model"]["ratio"] = True
    (d / ROUTER_FILE).write_text(json.dumps(meta))
    from safetensors.numpy import load_file, save_file
    arrays = load_file(str(d / ARRAYS_FILE))
    save_file({k: v for k, v in arrays.items() if not k.startswith("cost_model.")}, str(d / ARRAYS_FILE))
    with pytest.raises(ArtifactError, match="lacks cost_model.ratio_coef"):
        load_router(d)


@pytest.mark.parametrize("kind", ["classifier", "symbolic"])
def test_model_selection_prices_the_kind_of_question(tmp_path, monkeypatch, kind):
    """The inner cross-validation chooses with the cost model the router routes with:
    the verbose expert's code questions cost it ~10x its multiple-choice ones, where the
    length-only model priced both at $0.0055."""
    import router_models.classifier as classifier_module
    from router_models.symbolic import SymbolicRouter

    seen = []
    if kind == "classifier":
        real = classifier_module.cross_validate
        monkeypatch.setattr(classifier_module, "cross_validate",
                            lambda X, Y, costs, c_hat, *a, **k: seen.append(c_hat) or real(X, Y, costs, c_hat, *a, **k))
        router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=2)
    else:
        real = SymbolicRouter._cross_validate
        monkeypatch.setattr(SymbolicRouter, "_cross_validate",
                            lambda self, X, Y, costs, c_hat, *a: seen.append(c_hat) or real(self, X, Y, costs, c_hat, *a))
        router = SymbolicRouter(cv=2)
    logs = kind_priced_logs(tmp_path)
    router.fit(logs)
    assert len(seen) == 1 and router.cost_model_.has_ratio
    verbose = router.experts_.index("verbose")
    code = np.array(["python function" in p for p in logs.prompts])
    c = seen[0][:, verbose]
    assert c[code].mean() > 3 * c[~code].mean(), c
    # the same kind part routes afterwards (fitted once, during model selection)
    np.testing.assert_allclose(router.predict_cost(logs.prompts), seen[0], rtol=1e-5)


def test_a_fitted_router_does_not_keep_its_training_features(tmp_path):
    for router in (ClassifierRouter(featurizer="tfidf", model="logreg", cv=0),
                   KNNRouter(k=3)):
        router.fit(kind_priced_logs(tmp_path))
        assert router.featurizer_._last is None
        router.predict_cost(["Pick A or B: 1"])   # a query's features are kept again
        assert router.featurizer_._last is not None


def test_cost_model_new_expert_costs_its_price_shaped_like_the_others(tmp_path):
    """An added expert has only a price: it costs that on average over the training
    prompts, more for a question that costs the fitted experts more (here a code question:
    ``verbose`` writes a long answer), as a flat price among kind-aware ones misroutes."""
    logs = kind_priced_logs(tmp_path)
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs)
    cm = router.cost_model_
    before = cm.predict(logs.prompts, router.featurizer_.transform(logs.prompts))
    np.testing.assert_allclose(cm.typical, before.mean(axis=0))
    cm.add_expert(0.003)
    X = router.featurizer_.transform(logs.prompts)
    c = cm.predict(logs.prompts, X)
    assert c.shape == (len(logs.prompts), 3)
    np.testing.assert_array_equal(c[:, :2], before)          # the fitted experts are untouched
    assert c[:, 2].mean() == pytest.approx(0.003, rel=1e-6)   # its price, on average
    code = np.array(["python function" in p for p in logs.prompts])
    assert c[code, 2].mean() > 2 * c[~code, 2].mean()         # and dearer for code, like verbose
    shape = (before / cm.typical[:2]).mean(axis=1)
    np.testing.assert_allclose(c[:, 2], 0.003 * shape, rtol=1e-6)

    back = CostModel.from_dict(json.loads(json.dumps(cm.to_dict())), cm.arrays())
    np.testing.assert_allclose(back.predict(logs.prompts, X), c)
    old = cm.to_dict()
    del old["typical"], old["added"]                          # saved before this existed: flat
    flat = CostModel.from_dict(old, cm.arrays()).predict(logs.prompts, X)
    np.testing.assert_allclose(flat[:, 2], 0.003, rtol=1e-6)
    with pytest.raises(ValueError, match="typical and added must list 3 experts"):
        CostModel.from_dict(cm.to_dict() | {"typical": [1.0]}, cm.arrays())


def test_cost_model_prices_an_expert_logged_on_few_prompts_by_the_others_shape(tmp_path):
    """``newbie`` has costs for 4 of 24 prompts: it is priced like an added expert (its
    logged costs over the fitted experts' shape on those prompts, times the shape), not by
    a ridge that reads its unlogged prompts, nor from 4 calls alone."""
    logs = kind_priced_logs(tmp_path)
    rows = [0, 1, 2, 3]   # two code questions, two multiple-choice ones
    newbie = np.full((logs.n_prompts, 1), np.nan)
    newbie[rows, 0] = [0.004, 0.001, 0.004, 0.001]
    wide = BenchmarkLogs(logs.prompt_ids, logs.prompts, logs.tasks, logs.experts + ["newbie"],
                         np.c_[logs.scores, np.where(np.isnan(newbie), np.nan, 0.5)], np.c_[logs.costs, newbie])
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(wide)
    cm = router.cost_model_
    X = router.featurizer_.transform(logs.prompts)
    c = cm.predict(logs.prompts, X)
    assert np.isnan(cm.added[:2]).all() and not np.isnan(cm.added[2])
    shape = (c[:, :2] / cm.typical[:2]).mean(axis=1)
    price = newbie[rows, 0].sum() / shape[rows].sum()
    np.testing.assert_allclose(c[:, 2], price * shape, rtol=1e-6)
    np.testing.assert_allclose(cm.typical[2], price, rtol=1e-6)   # its mean over the prompts
    code = np.array(["python function" in p for p in logs.prompts])
    assert c[code, 2].mean() > 2 * c[~code, 2].mean()
    # the fitted experts are priced as without it
    alone = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs)
    np.testing.assert_allclose(c[:, :2], alone.predict_cost(logs.prompts), rtol=1e-6)
    back = load_router(router.save(tmp_path / "r"))
    np.testing.assert_allclose(back.predict_cost(logs.prompts), router.predict_cost(logs.prompts), rtol=1e-6)


def test_cost_model_fits_an_expert_with_gaps_on_its_logged_calls(tmp_path):
    """A missing cost is not read as the length model's price: ``verbose`` with half its
    multiple-choice costs unlogged still costs $0.001 for them and $0.01 for code; with
    every expert logged on few prompts, each is fitted on its own calls."""
    logs = kind_priced_logs(tmp_path)
    j = logs.experts.index("verbose")
    code = np.array(["python function" in p for p in logs.prompts])
    gappy = np.flatnonzero(~code)[::2]
    costs = logs.costs.copy()
    costs[gappy, j] = np.nan
    holes = BenchmarkLogs(logs.prompt_ids, logs.prompts, logs.tasks, logs.experts, logs.scores, costs)
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(holes)
    c = router.predict_cost(logs.prompts)[:, j]
    assert np.isnan(router.cost_model_.added).all()
    whole = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs).predict_cost(logs.prompts)[:, j]
    np.testing.assert_allclose(c[gappy], whole[gappy], rtol=0.3)   # near as if they were logged
    assert (c[gappy] < 0.002).all()   # a missing cost read as ratio 1 priced them at $0.0042
    assert c[code].mean() > 4 * c[~code].mean()
    # every column logged on few prompts: no shape to borrow, each from its own calls
    few = np.full_like(logs.costs, np.nan)
    few[:6] = logs.costs[:6]
    sparse = BenchmarkLogs(logs.prompt_ids, logs.prompts, logs.tasks, logs.experts, logs.scores, few)
    r = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(sparse)
    assert np.isnan(r.cost_model_.added).all()
    assert np.isfinite(r.predict_cost(logs.prompts)).all()


def test_a_new_experts_price_from_calls_on_dear_questions_is_below_their_mean(tmp_path):
    """Three calls at $0.004, all on code questions, which cost the fitted experts ~1.4x
    their mean: the expert's price per call over all questions is $0.004 / 1.4."""
    logs = kind_priced_logs(tmp_path)
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs)
    cm = router.cost_model_
    code = [p for p in logs.prompts if "python function" in p][:3]
    X = router.featurizer_.transform(code)
    shape = (cm.predict(code, X) / cm.typical).mean(axis=1)
    assert 1.2 < shape.mean() < 1.6
    price = cm.price_from_calls(code, X, [0.004] * 3)
    assert price == pytest.approx(0.012 / shape.sum(), rel=1e-9)
    cm.typical = None   # a model saved without typical costs: the calls' mean
    assert cm.price_from_calls(code, X, [0.004] * 3) == pytest.approx(0.004)


def test_classifier_expert_scored_on_few_prompts_leans_on_the_others(tmp_path):
    """``newbie`` is scored on 4 of 24 prompts: its own head weighs 4 / 204, the rest is
    the other experts' mean prediction shifted toward its mean logged score there (the
    shift trusted by 4 / 54)."""
    import router_models.classifier as classifier_module
    from router_models.sparse import SHIFT_CALLS

    logs = kind_priced_logs(tmp_path)
    rows = [0, 1, 2, 3]
    newbie = np.full((logs.n_prompts, 1), np.nan)
    newbie[rows, 0] = [1.0, 1.0, 1.0, 0.0]
    wide = BenchmarkLogs(logs.prompt_ids, logs.prompts, logs.tasks, logs.experts + ["newbie"],
                         np.c_[logs.scores, newbie], np.c_[logs.costs, np.where(np.isnan(newbie), np.nan, 1e-3)])
    router = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(wide)
    lean = router.lean_
    np.testing.assert_array_equal(lean["base"], [True, True, False])
    w = 4 / (4 + classifier_module.SHRINK_CALLS)
    np.testing.assert_allclose(lean["weight"], [1, 1, w])
    X = router.featurizer_.transform(logs.prompts)
    head = router.head_.predict(X)
    shift = (0.75 - head[rows, :2].mean()) * 4 / (4 + SHIFT_CALLS)
    np.testing.assert_allclose(lean["shift"][2], shift)
    q = router.predict_quality(logs.prompts)
    np.testing.assert_allclose(q[:, :2], np.clip(head[:, :2], 0, 1))   # the others: their heads
    prior = np.clip(head[:, :2].mean(axis=1) + shift, 0, 1)
    np.testing.assert_allclose(q[:, 2], w * head[:, 2] + (1 - w) * prior)
    assert np.abs(q[:, 2] - head[:, 2]).max() > 0.005   # it changed something
    assert router.explain(logs.prompts[0])["own_head_weight"] == {"newbie": round(w, 4)}
    back = load_router(router.save(tmp_path / "r"))
    np.testing.assert_array_equal(back.predict_quality(logs.prompts), q)
    # every expert scored on most prompts: the heads alone, nothing saved for it
    full = ClassifierRouter(featurizer="tfidf", model="logreg", cv=0).fit(logs)
    assert full.lean_ is None
    d = full.save(tmp_path / "full")
    meta = json.loads((d / ROUTER_FILE).read_text())
    assert meta["state"]["lean"] is False
    del meta["state"]["lean"]                               # saved before this existed
    (d / ROUTER_FILE).write_text(json.dumps(meta))
    np.testing.assert_array_equal(load_router(d).predict_quality(logs.prompts), full.predict_quality(logs.prompts))


def test_sparse_lean_arithmetic_on_hand_made_counts():
    """Base experts (logged on at least half of the prompts) keep their own prediction;
    a sparse one weighs its own by n / (n + K) and shifts the base mean by its logged
    offset times n / (n + SHIFT_CALLS); one with no calls is the base mean."""
    from router_models import sparse

    asked = []

    def own_mean(j, base):
        asked.append((j, base.tolist()))
        return 0.9, 0.6

    lean = sparse.fit_lean(np.array([100, 60, 10, 0]), 100, 40, own_mean)
    assert asked == [(2, [True, True, False, False])]   # no calls: nothing to read
    np.testing.assert_allclose(lean["weight"], [1, 1, 10 / 50, 0])
    np.testing.assert_allclose(lean["shift"], [0, 0, 0.3 * 10 / (10 + sparse.SHIFT_CALLS), 0])
    q = np.array([[0.2, 0.4, 1.0, 0.7], [0.9, 0.9, 0.0, 0.0]])
    out = sparse.lean(q, lean)
    np.testing.assert_allclose(out[:, :2], q[:, :2])
    np.testing.assert_allclose(out[:, 3], [0.3, 0.9])
    np.testing.assert_allclose(out[:, 2], 0.2 * q[:, 2] + 0.8 * np.clip([0.3 + 0.05, 0.9 + 0.05], 0, 1))
    assert sparse.own_weights(["a", "b", "c", "d"], lean) == {"c": 0.2, "d": 0.0}
    back = sparse.from_arrays(True, sparse.to_arrays(lean), 4, "test")
    assert all(np.array_equal(back[k], lean[k]) for k in sparse.KEYS) and back["base"].dtype == bool
    with pytest.raises(ValueError, match="must list 3 experts"):
        sparse.from_arrays(True, sparse.to_arrays(lean), 3, "test")
    assert sparse.fit_lean(np.array([50, 80]), 100, 40, own_mean) is None   # none sparse
    assert sparse.fit_lean(np.array([5, 8]), 100, 40, own_mean) is None     # none to lean on
    assert sparse.lean(q, None) is q
