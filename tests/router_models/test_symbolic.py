"""The symbolic (skill-profile) router on hand-made logs, with the real MiniLM model.

The logs: 12 maths, 12 cooking and 12 programming prompts. Expert ``mathematician``
scores 0.9 on maths and 0.1 elsewhere, ``chef`` and ``coder`` likewise on their topic,
``generalist`` 0.5 everywhere; a few cells are not logged (NaN).
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_models import ROUTERS, SymbolicRouter, load_router
from router_models.base import ARRAYS_FILE, ROUTER_FILE, ArtifactError, NotFittedError
from router_models.featurize import minilm_model
from router_models.logs import BenchmarkLogs
from router_models.skills import skill_weights
from router_models.symbolic import (
    GRID,
    PROFILES_FILE,
    parse_skill_list,
    skill_profiles,
    skill_prompt,
)

TOPICS = {
    "maths": [
        "Solve the equation 3x + 5 = 20 for x.",
        "What is the derivative of x^2 times sin x?",
        "Compute the integral of 1/x from 1 to e.",
        "Factor the polynomial x^2 - 5x + 6.",
        "Find the roots of the quadratic equation x^2 + 2x - 8 = 0.",
        "Simplify the fraction 42/56 and give the result as a decimal.",
        "What is the sum of the interior angles of a hexagon?",
        "Prove that the square root of 2 is irrational.",
        "Find the least common multiple of 12 and 18.",
        "Evaluate the limit of sin(x)/x as x approaches 0.",
        "Solve the system of linear equations x + y = 10 and x - y = 2.",
        "What is the probability of rolling two sixes with two dice?",
    ],
    "cooking": [
        "How long should I bake a chocolate cake in the oven at 180 degrees?",
        "Give me a recipe for a creamy tomato soup with fresh basil.",
        "How do I caramelize onions in a frying pan with butter?",
        "Which spices go well in a chicken curry recipe?",
        "How do I knead bread dough so the loaf rises in the oven?",
        "What is the best way to roast vegetables in the oven with olive oil?",
        "How do I make fluffy pancakes for breakfast with buttermilk?",
        "How long should pasta boil in salted water before draining?",
        "Which herbs season a roast lamb recipe best?",
        "How do I whisk eggs with butter for a light omelette?",
        "How can I stop cookies spreading while baking in the oven?",
        "What marinade with garlic and olive oil works for grilled salmon?",
    ],
    "code": [
        "Write a Python function that reverses a linked list.",
        "How do I fix a segmentation fault in my C program?",
        "Explain recursion with a JavaScript function example.",
        "Write a SQL query that joins two tables on customer id.",
        "How do I sort a dictionary by value in Python?",
        "What does a null pointer exception mean in a Java program?",
        "Implement binary search over a sorted array in Rust.",
        "How do I read a CSV file into a dataframe with Python pandas?",
        "Write a unit test for a Python function that parses dates.",
        "How do I declare a class with a constructor in TypeScript?",
        "Why does my Python loop raise an IndexError on a list?",
        "Write a bash script that renames all files in a folder.",
    ],
}
SPECIALIST = {"maths": "mathematician", "cooking": "chef", "code": "coder"}
EXPERTS = ["chef", "coder", "generalist", "mathematician"]  # sorted
HELD_OUT = {
    "maths": ["Solve the quadratic equation x^2 - 9 = 0.",
              "What is the derivative of cos x?"],
    "cooking": ["How long should I bake banana bread in the oven?",
                "Give me a recipe for a chicken soup with garlic."],
    "code": ["Write a Python function that checks whether a string is a palindrome.",
             "How do I fix a null pointer exception in my Java code?"],
}
NAN_CELLS = {("maths", 0, "chef"), ("maths", 1, "chef"), ("code", 3, "generalist")}


def make_logs() -> BenchmarkLogs:
    ids, prompts, tasks, rows = [], [], [], []
    for topic, texts in TOPICS.items():
        for i, text in enumerate(texts):
            ids.append(f"{topic}-{i}"), prompts.append(text), tasks.append(topic)
            rows.append([np.nan if (topic, i, e) in NAN_CELLS
                         else 0.5 if e == "generalist"
                         else 0.9 if e == SPECIALIST[topic] else 0.1 for e in EXPERTS])
    scores = np.array(rows)
    price = np.array([0.004, 0.003, 0.001, 0.002])
    costs = np.where(np.isnan(scores), np.nan, price[None, :] * np.ones_like(scores))
    return BenchmarkLogs(prompt_ids=ids, prompts=prompts, tasks=tasks, experts=list(EXPERTS),
                         scores=scores, costs=costs)


def topic_words(topic: str) -> set[str]:
    return {w for t in TOPICS[topic] for w in re.findall(r"[a-z]+", t.lower())}


@pytest.fixture(scope="module")
def minilm():
    return minilm_model()


@pytest.fixture(scope="module")
def logs() -> BenchmarkLogs:
    return make_logs()


@pytest.fixture(scope="module")
def router(logs, minilm) -> SymbolicRouter:
    return SymbolicRouter(cv=1).fit(logs)


ALL_HELD_OUT = [q for qs in HELD_OUT.values() for q in qs]


# ---- profile arithmetic ----------------------------------------------------------------

def test_skill_profiles_shrinkage_by_hand():
    W = np.array([[1.0, 0.0, 0.01],
                  [0.5, 0.5, 0.0],
                  [0.0, 1.0, 0.0]])
    Y = np.array([[1.0, 0.2],
                  [0.0, np.nan],
                  [np.nan, 0.8]])
    profile, evidence, g = skill_profiles(W, Y, alpha=2.0)
    np.testing.assert_allclose(g, [0.5, 0.5])
    np.testing.assert_allclose(evidence, [[1.5, 1.0], [0.5, 1.0], [0.01, 0.01]])
    np.testing.assert_allclose(profile, [
        [(1.0 + 2 * 0.5) / (1.5 + 2), (0.2 + 2 * 0.5) / (1.0 + 2)],
        [(0.0 + 2 * 0.5) / (0.5 + 2), (0.8 + 2 * 0.5) / (1.0 + 2)],
        [(0.01 + 2 * 0.5) / (0.01 + 2), (0.002 + 2 * 0.5) / (0.01 + 2)],
    ])
    # the rare skill (evidence 0.01) stays at the global competence although its only
    # prompt scored 1.0; without shrinkage it would be that 1.0
    assert abs(profile[2, 0] - g[0]) < 0.01
    no_shrink = skill_profiles(W, Y, alpha=0.0)[0]
    assert no_shrink[2, 0] == pytest.approx(1.0)
    assert no_shrink[0, 0] == pytest.approx(1.0 / 1.5)


def test_expert_without_logs_has_zero_competence():
    W = np.ones((2, 1))
    profile, evidence, g = skill_profiles(W, np.array([[0.6, np.nan], [0.8, np.nan]]), 1.0)
    np.testing.assert_allclose(g, [0.7, 0.0])
    np.testing.assert_allclose(evidence, [[2.0, 0.0]])
    np.testing.assert_allclose(profile, [[(1.4 + 0.7) / 3.0, 0.0]])


def test_fitted_profiles_follow_the_formula_on_the_training_assignment(logs, minilm):
    r = SymbolicRouter(cv=1, skills_per_query=1, alpha=2.0).fit(logs)
    W = r.query_skills(logs.prompts)[0]
    assert ((W == 0) | (W == 1)).all() and (W.sum(axis=1) == 1).all()  # one skill each
    for s in range(r.vocab_.size):
        members = np.flatnonzero(W[:, s])
        for j in range(len(EXPERTS)):
            ys = [logs.scores[i, j] for i in members if not np.isnan(logs.scores[i, j])]
            g = np.nanmean(logs.scores[:, j])
            assert r.evidence_[s, j] == pytest.approx(len(ys), abs=1e-6)
            assert r.profile_[s, j] == pytest.approx((sum(ys) + 2.0 * g) / (len(ys) + 2.0),
                                                      abs=1e-6)
    np.testing.assert_allclose(r.competence_, np.nanmean(logs.scores, axis=0), atol=1e-6)


def test_skill_weights_are_a_top_k_softmax():
    sims = np.array([[0.9, 0.5, 0.7, 0.1]])
    w = skill_weights(sims, k=2, temperature=0.1)
    e = np.exp(np.array([0.0, -0.2]) / 0.1)
    np.testing.assert_allclose(w, [[e[0] / e.sum(), 0.0, e[1] / e.sum(), 0.0]])
    np.testing.assert_allclose(skill_weights(sims, k=10, temperature=1.0).sum(), 1.0)


# ---- the vocabulary and a query's skills --------------------------------------------------

def test_vocabulary_names_are_readable_phrases_from_the_prompts(router, logs):
    words = {w for t in logs.prompts for w in re.findall(r"[a-z]+", t.lower())}
    names = router.vocab_.names
    assert 1 < len(names) <= logs.n_prompts
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z]+( [a-z]+){0,2}", name), name
        assert set(name.split()) <= words, name
    assert router.vocab_.emb.shape == router.vocab_.key.shape == (len(names), 384)
    np.testing.assert_allclose(np.linalg.norm(router.vocab_.key, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("topic", list(TOPICS))
def test_a_query_gets_the_skills_of_its_topic(router, topic):
    others = set().union(*(topic_words(t) for t in TOPICS if t != topic))
    for query in HELD_OUT[topic]:
        out = router.explain(query)
        top = out["skills"][0]
        assert top["source"] == "zero-shot"
        own = set(top["name"].split()) <= topic_words(topic)
        assert own and not set(top["name"].split()) <= others, (query, out["skills"][:3])


@pytest.mark.parametrize("topic", list(TOPICS))
def test_routing_picks_the_expert_logged_good_at_the_skill(router, topic):
    q = router.predict_quality(HELD_OUT[topic])
    assert q.shape == (2, 4) and ((q >= 0) & (q <= 1)).all()
    best = [router.experts_[j] for j in q.argmax(axis=1)]
    assert best == [SPECIALIST[topic]] * 2, q
    ranked = router.recruit(HELD_OUT[topic][0], k=2)
    assert [e for e, _ in ranked][0] == SPECIALIST[topic]
    assert len(ranked) == 2 and ranked[0][1] >= ranked[1][1]
    assert ranked[0][1] == pytest.approx(q[0].max())


def test_recruit_k_bounds(router):
    assert router.recruit(ALL_HELD_OUT[0], 0) == []
    everyone = router.recruit(ALL_HELD_OUT[0], 10)
    assert sorted(e for e, _ in everyone) == EXPERTS
    scores = [s for _, s in everyone]
    assert scores == sorted(scores, reverse=True)


# ---- the LLM path ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("algebra, geometry, probability", ["algebra", "geometry", "probability"]),
    ("Skills: Algebra, Calculus", ["algebra", "calculus"]),
    ("Sure! Here are the skills:\n1. Python programming\n2) recursion\n- data structures",
     ["python programming", "recursion", "data structures"]),
    ('* "Baking"\n* \'Bread making\'\n• knife skills.',
     ["baking", "bread making", "knife skills"]),
    ('["sql", "databases", "SQL"]', ["sql", "databases"]),
    ("a, b, c, d, e, f, g", ["a", "b", "c", "d", "e"]),
    ("c++, C#, node.js", ["c++", "c#", "node.js"]),
    ("cooking;;  ,\n\n, ", ["cooking"]),
    ("I cannot determine the skills needed for this question because it is unclear.", []),
    ("{'skills': None}", []),
    ("", []),
    ("12345, 3.14", []),
    ("this is a very long skill name that goes on and on, ok", ["ok"]),
])
def test_parse_skill_list_examples(text, expected):
    assert parse_skill_list(text) == expected


@pytest.mark.parametrize("value", [None, 42, ["algebra"], b"algebra"])
def test_parse_skill_list_of_a_non_string_is_empty(value):
    assert parse_skill_list(value) == []


@settings(max_examples=300, deadline=None)
@given(st.text() | st.lists(st.sampled_from(
    ["Skills:", "algebra", ", ", "\n", "- ", "1. ", '"', "Geometry", "x" * 50, "::", "•"]))
       .map("".join))
def test_parse_skill_list_properties(text):
    out = parse_skill_list(text)
    assert isinstance(out, list) and len(out) <= 5
    assert len(set(out)) == len(out)
    for item in out:
        assert item and item == item.strip() and item == item.lower() and len(item) <= 40


def test_skill_prompt_asks_for_comma_separated_keywords():
    messages = skill_prompt("How do I bake bread?")
    assert [m["role"] for m in messages] == ["system", "user"]
    assert all(isinstance(m["content"], str) for m in messages)
    assert "How do I bake bread?" in messages[1]["content"]
    assert "comma-separated" in messages[0]["content"] and "2 to 5" in messages[0]["content"]


def test_skill_words_map_onto_the_vocabulary_and_none_falls_back(router):
    query = HELD_OUT["maths"][0]
    zero = router.predict_quality([query])
    words = [["baking", "recipe", "oven"], None, []]
    q = router.predict_quality([query] * 3, skill_words=words)
    chef, maths = EXPERTS.index("chef"), EXPERTS.index("mathematician")
    assert q[0].argmax() == chef and zero[0].argmax() == maths
    np.testing.assert_allclose(q[1:], np.repeat(zero, 2, axis=0))  # None and [] -> zero-shot
    W, sources, mapped = router.query_skills([query] * 3, words)
    assert sources == ["llm", "zero-shot", "zero-shot"]
    assert set(mapped[0]) == {"baking", "recipe", "oven"}
    assert all(set(name.split()) <= topic_words("cooking") for name in mapped[0].values())
    np.testing.assert_allclose(W.sum(axis=1), 1.0)
    assert router.recruit(query, 1, skill_words=["python", "debugging"])[0][0] == "coder"
    with pytest.raises(ValueError, match="skill_words has 1 entries for 2 queries"):
        router.predict_quality([query, query], skill_words=[["x"]])


def test_explain_names_skills_profiles_and_hyper_parameters(router):
    query = HELD_OUT["cooking"][0]
    out = router.explain(query)
    assert out["router"] == "symbolic" and list(out["experts"]) == EXPERTS
    skills = out["skills"]
    assert 1 <= len(skills) <= router.params_["skills_per_query"]
    assert [s["weight"] for s in skills] == sorted((s["weight"] for s in skills), reverse=True)
    assert sum(s["weight"] for s in skills) == pytest.approx(1.0, abs=1e-3)
    assert {s["source"] for s in skills} == {"zero-shot"}
    for j, e in enumerate(EXPERTS):
        rows = out["profiles"][e]
        assert [r["skill"] for r in rows] == [s["name"] for s in skills]
        for r, s in zip(rows, skills):
            assert r["score"] == router.profile_[s["skill"], j]
            assert r["evidence"] == router.evidence_[s["skill"], j]
        # the quality is the weight-normalised sum of the profile scores over the skills
        assert sum(s["weight"] * r["score"] for s, r in zip(skills, rows)) == pytest.approx(
            out["experts"][e]["quality"], abs=2e-3)
    assert out["hyper_parameters"] == router.params_ and out["chosen_by"] == "defaults"
    assert set(out["hyper_parameters"]) == {"n_skills", "alpha", "skills_per_query",
                                            "temperature"}
    json.dumps(out)


def test_explain_with_skill_words_says_llm(router):
    query = HELD_OUT["maths"][0]
    out = router.explain(query, skill_words=["python", "sql"])
    assert {s["source"] for s in out["skills"]} == {"llm"}
    assert set(out["skill_words"]) == {"python", "sql"}
    q = router.predict_quality([query], skill_words=[["python", "sql"]])[0]
    assert [out["experts"][e]["quality"] for e in EXPERTS] == [round(float(x), 4) for x in q]
    assert max(out["experts"], key=lambda e: out["experts"][e]["quality"]) == "coder"
    assert router.explain(query, skill_words=None) == router.explain(query)


# ---- hyper-parameters -------------------------------------------------------------------

def test_cross_validation_picks_from_the_grid(logs, minilm):
    r = SymbolicRouter(cv=3).fit(logs)
    sizes = {row["params"]["n_skills"] for row in r.cv_results_}
    assert sizes and max(sizes) <= logs.n_prompts  # clamped: 36 prompts, not 1024 skills
    grid = {(row["params"]["n_skills"], row["params"]["alpha"], row["params"]["skills_per_query"],
             row["params"]["temperature"]) for row in r.cv_results_}
    assert len(grid) == len(r.cv_results_) == len(sizes) * len(GRID["alpha"]) * len(
        GRID["skills_per_query"]) * len(GRID["temperature"])
    assert all(np.isfinite(row["aiq"]) and 0 <= row["brier"] <= 1 for row in r.cv_results_)
    best = max(r.cv_results_, key=lambda row: (row["aiq"], -row["brier"]))
    assert r.params_ == best["params"] and r.vocab_.size == r.params_["n_skills"]
    assert r.explain(ALL_HELD_OUT[0])["chosen_by"] == "cross-validation"
    assert r.predict_quality(HELD_OUT["code"]).argmax(axis=1).tolist() == [1, 1]


@pytest.mark.parametrize("params, match", [
    ({"n_skills": 0}, "n_skills=0"), ({"alpha": -1.0}, "alpha=-1.0"),
    ({"skills_per_query": 0}, "skills_per_query=0"), ({"temperature": 0.0}, "temperature=0.0"),
])
def test_bad_hyper_parameters_raise(logs, params, match):
    with pytest.raises(ValueError, match=match):
        SymbolicRouter(cv=1, **params).fit(logs)


@pytest.mark.parametrize("prompts", [
    ["What is 2+2?"],
    ["Bake a cake.", "Fix my Python bug."],
    ["1 + 1", "2 * 3", "7 - 4"],                    # no words at all: one "general" skill
    ["Bake a cake.", "Roast a chicken.", "Sort a list.", "Parse JSON.", "Add 2 and 3."],
])
def test_tiny_logs_do_not_crash(prompts, minilm):
    n = len(prompts)
    scores = np.linspace(0, 1, 2 * n).reshape(n, 2)
    scores[0, 1] = np.nan
    logs = BenchmarkLogs(prompt_ids=[str(i) for i in range(n)], prompts=prompts, tasks=[""] * n,
                         experts=["a", "b"], scores=scores, costs=np.full((n, 2), 0.001))
    r = SymbolicRouter(n_skills=1000, cv=5).fit(logs)
    assert 1 <= r.vocab_.size <= n
    q = r.predict_quality(["anything at all", "What is 3+3?"])
    assert q.shape == (2, 2) and np.isfinite(q).all() and ((q >= 0) & (q <= 1)).all()
    assert r.predict_quality(["x"], skill_words=[["cooking"]]).shape == (1, 2)
    assert r.explain("x")["skills"]


# ---- artifacts ---------------------------------------------------------------------------

def test_unfitted_router_raises_not_fitted(tmp_path):
    r = SymbolicRouter()
    for call in (lambda: r.predict_quality(["x"]), lambda: r.predict_quality(["x"], [["a"]]),
                 lambda: r.recruit("x", 2), lambda: r.explain("x"),
                 lambda: r.explain("x", skill_words=["a"]), lambda: r.query_skills(["x"]),
                 lambda: r.predict_cost(["x"]), lambda: r.save(tmp_path / "r")):
        with pytest.raises(NotFittedError, match="not fitted"):
            call()
    assert not (tmp_path / "r").exists()


def test_registry_names_the_symbolic_router():
    assert ROUTERS["symbolic"] is SymbolicRouter
    assert SymbolicRouter.accepts_skill_words is True  # the gateway asks an LLM for skills


def test_save_load_round_trip_is_identical_and_never_unpickles(router, tmp_path, monkeypatch):
    d = router.save(tmp_path / "sym")
    assert sorted(p.name for p in d.iterdir()) == sorted([ROUTER_FILE, ARRAYS_FILE,
                                                          PROFILES_FILE])

    def refuse(*a, **k):
        raise AssertionError("load_router unpickled something")
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(np, "load", refuse)
    loaded = load_router(d)
    assert type(loaded) is SymbolicRouter and loaded.get_params() == router.get_params()
    queries = ALL_HELD_OUT + ["an unrelated query about nothing in particular"]
    np.testing.assert_array_equal(loaded.predict_quality(queries), router.predict_quality(queries))
    words = [["baking"], None] * 3 + [["sql", "python"]]
    np.testing.assert_array_equal(loaded.predict_quality(queries, words),
                                  router.predict_quality(queries, words))
    assert loaded.explain(queries[0]) == router.explain(queries[0])
    assert loaded.vocab_.names == router.vocab_.names


def test_profiles_json_is_readable(router, tmp_path):
    doc = json.loads((router.save(tmp_path / "sym") / PROFILES_FILE).read_text())
    assert doc["experts"] == EXPERTS
    assert doc["global_competence"] == pytest.approx(
        dict(zip(EXPERTS, np.nanmean(make_logs().scores, axis=0))), abs=1e-6)
    assert [s["name"] for s in doc["skills"]] == router.vocab_.names
    skill = doc["skills"][0]
    assert set(skill) >= {"id", "name", "phrases", "scores", "evidence"}
    assert skill["name"] in skill["phrases"]
    assert skill["scores"] == dict(zip(EXPERTS, router.profile_[0].tolist()))


def test_missing_profiles_json_uses_the_router_json_state(router, tmp_path):
    d = router.save(tmp_path / "sym")
    (d / PROFILES_FILE).unlink()
    loaded = load_router(d)
    np.testing.assert_array_equal(loaded.predict_quality(ALL_HELD_OUT),
                                  router.predict_quality(ALL_HELD_OUT))


def _edit_profiles(d: Path, edit) -> None:
    doc = json.loads((d / PROFILES_FILE).read_text())
    edit(doc)
    (d / PROFILES_FILE).write_text(json.dumps(doc))


def test_editing_a_score_changes_the_predictions(router, tmp_path):
    d = router.save(tmp_path / "sym")
    query = HELD_OUT["cooking"][0]
    before = router.predict_quality([query])[0]
    assert before.argmax() == EXPERTS.index("chef")

    def demote_the_chef(doc):
        for skill in doc["skills"]:
            skill["scores"]["chef"] = 0.0
            skill["scores"]["generalist"] = 0.75
    _edit_profiles(d, demote_the_chef)
    after = load_router(d).predict_quality([query])[0]
    assert after[EXPERTS.index("chef")] == 0.0
    assert after[EXPERTS.index("generalist")] == pytest.approx(0.75)
    assert after.argmax() == EXPERTS.index("generalist")
    np.testing.assert_array_equal(after[[1, 3]], before[[1, 3]])  # the others as they were


def test_renaming_a_skill_redefines_which_words_reach_it(router, tmp_path):
    d = router.save(tmp_path / "sym")
    target = router.vocab_.names.index(router.explain(HELD_OUT["code"][0])["skills"][0]["name"])
    word = "astronomy telescope"
    assert router.query_skills(["q"], [[word]])[0][0].argmax() != target

    def rename(doc):
        doc["skills"][target]["name"] = word
    _edit_profiles(d, rename)
    loaded = load_router(d)
    assert loaded.vocab_.names[target] == word
    assert loaded.query_skills(["q"], [[word]])[0][0].argmax() == target
    coder = EXPERTS.index("coder")
    assert loaded.predict_quality(["q"], [[word]])[0].argmax() == coder
    assert router.predict_quality(["q"], [[word]])[0].argmax() != coder
    np.testing.assert_array_equal(loaded.predict_quality(ALL_HELD_OUT),  # zero-shot: unchanged
                                  router.predict_quality(ALL_HELD_OUT))


def test_skill_words_only_reach_skills_with_evidence(router, tmp_path):
    d = router.save(tmp_path / "sym")
    target = router.query_skills(["q"], [["baking"]])[0][0].argmax()
    assert router.evidence_[target].max() >= 1.0

    def forget(doc):  # as if no logged prompt had shown this skill
        doc["skills"][target]["evidence"] = {e: 0.0 for e in EXPERTS}
    _edit_profiles(d, forget)
    loaded = load_router(d)
    moved = loaded.query_skills(["q"], [["baking"]])[0][0].argmax()
    assert moved != target and loaded.evidence_[moved].max() >= 1.0
    np.testing.assert_array_equal(loaded.predict_quality(ALL_HELD_OUT),  # zero-shot: unchanged
                                  router.predict_quality(ALL_HELD_OUT))


def _set_score(value):
    def edit(doc):
        doc["skills"][1]["scores"]["coder"] = value
    return edit


@pytest.mark.parametrize("edit, match", [
    ("not json {", "is not valid JSON"),
    (lambda doc: doc["skills"][0]["scores"].update(stranger=0.5), "unknown expert.*stranger"),
    (lambda doc: doc["experts"].append("stranger"), "unknown expert.*stranger"),
    (lambda doc: doc["skills"][0]["scores"].pop("chef"), r"missing \['chef'\]"),
    (lambda doc: doc["skills"].pop(2), r"missing skill\(s\) \[2\]"),
    (_set_score("high"), r"skill 1 scores\['coder'\] is not a number: 'high'"),
    (_set_score(1.5), r"skill 1 scores\['coder'\] = 1.5 is out of range 0..1"),
    (_set_score(-0.1), "out of range"),
    (_set_score(True), "is not a number"),
    (_set_score(None), "is not a number"),
    (lambda doc: doc["skills"][0]["evidence"].update(chef=-1), "evidence.*out of range"),
    (lambda doc: doc["skills"][0].update(name="  "), "skill 0 needs a non-empty name"),
    (lambda doc: doc["global_competence"].update(chef="x"), "global_competence"),
    (lambda doc: doc.update(skills={"0": {}}), "skills must be a list"),
    (lambda doc: doc["skills"][0].update(id=[0]), r"missing skill\(s\) \[0\]"),
    ("[1, 2]", "is not a JSON object"),
])
def test_malformed_profiles_json_is_an_artifact_error(router, tmp_path, edit, match):
    d = router.save(tmp_path / "sym")
    if isinstance(edit, str):
        (d / PROFILES_FILE).write_text(edit)
    else:
        _edit_profiles(d, edit)
    with pytest.raises(ArtifactError, match=f"profiles.json.*{match}"):
        load_router(d)
