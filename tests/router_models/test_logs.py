"""Benchmark logs: every layout on small hand-made fixtures (tests/router_models/fixtures)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router_models.logs import (
    FORMATS,
    BenchmarkLogs,
    LoadReport,
    LogFormatError,
    count_tokens,
    guess_format,
    kfold_by_prompt,
    load_logs,
    prompt_text,
    split_by_prompt,
    write_logs,
)

FIX = Path(__file__).parent / "fixtures"
NAN = np.nan


def sha(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def assert_same_matrices(a: BenchmarkLogs, b: BenchmarkLogs) -> None:
    assert (a.prompt_ids, a.prompts, a.tasks, a.experts) == (b.prompt_ids, b.prompts, b.tasks, b.experts)
    for name in ("scores", "costs", "input_tokens", "output_tokens", "latency_s"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)


# ---------------------------------------------------------------- helpers


@pytest.mark.parametrize("raw, text", [
    ("['a\\nb', 'c']", "a\nb\nc"),
    ("  ['only one']  ", "only one"),
    ("plain text", "plain text"),
    ("[1, 2]", "[1, 2]"),
    ("['unclosed'", "['unclosed'"),
    ("[__import__('os').system('echo no')]", "[__import__('os').system('echo no')]"),
    ("", ""),
])
def test_prompt_text(raw, text):
    assert prompt_text(raw) == text


def test_count_tokens_wordpiece_without_truncation():
    assert count_tokens(["What is one plus one?", "", None, "Jupiter"]) == [6, 0, 0, 1]
    assert count_tokens(["word " * 300]) == [300]  # tokenizer.json truncates at 128: we do not
    assert count_tokens([]) == []


def test_load_report_merge_and_dict():
    a, b = LoadReport("a.csv", "rows-csv"), LoadReport("b.csv", "rows-csv")
    a.rows_read, b.rows_read = 3, 4
    a.add("missing_score", 2)
    b.add("missing_score", 1)
    b.add("duplicate_prompt_merged", 1)
    b.add("nothing", 0)
    m = a.merge(b)
    assert m.to_dict() == {
        "source": "a.csv + b.csv", "format": "rows-csv", "rows_read": 7, "dropped_rows": 3,
        "counts": {"missing_score": 3, "duplicate_prompt_merged": 1},
        "notes": ["3 (prompt, model) cells had no score and were left out (score and cost NaN)",
                  "1 prompt_ids repeated an earlier prompt's text and were merged into the first id "
                  "(scores averaged per model), so splits by prompt cannot leak"]}


def test_nothing_heavy_at_import():
    code = ("import sys, router_models.logs, router_models.importers; "
            "print(sorted(m for m in ('pandas', 'pyarrow', 'tokenizers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- guessing


@pytest.mark.parametrize("rel, fmt", [
    ("routerbench/tiny_train.csv", "routerbench"),
    ("routerbench", "routerbench"),
    ("llmrouter", "llmrouter"),
    ("llmrouter/scores_train.json", "llmrouter"),
    ("routellm", "routellm"),
    ("routellm/mmlu", "routellm"),
    ("routellm/mmlu/mmlu_anatomy.csv", "routellm"),
    ("rows/rows.jsonl", "rows-jsonl"),
    ("rows/rows.csv", "rows-csv"),
])
def test_guess_format(rel, fmt):
    assert guess_format(FIX / rel) == fmt
    assert fmt in FORMATS


def test_guess_format_parquet(tmp_path):
    write_logs([{"prompt": "p", "model": "m", "score": 1.0}], tmp_path / "x.parquet")
    assert guess_format(tmp_path / "x.parquet") == "rows-parquet"


def test_unknown_layout_raises_with_formats_and_columns():
    with pytest.raises(LogFormatError) as e:
        guess_format(FIX / "unknown.csv")
    assert "foo" in str(e.value) and "routerbench" in str(e.value) and "rows-jsonl" in str(e.value)
    with pytest.raises(ValueError):  # LogFormatError is a ValueError
        load_logs(FIX / "unknown.csv")


def test_wrong_explicit_format_and_missing_path(tmp_path):
    with pytest.raises(LogFormatError, match="needs columns"):
        load_logs(FIX / "routerbench" / "tiny_train.csv", format="rows-csv")
    with pytest.raises(LogFormatError, match="unknown format"):
        load_logs(FIX / "rows" / "rows.csv", format="excel")
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_logs(tmp_path / "nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        guess_format(tmp_path / "nowhere")


# ---------------------------------------------------------------- routerbench


def test_routerbench_matrices_and_report():
    logs = load_logs(FIX / "routerbench" / "tiny_train.csv")
    assert logs.prompt_ids == ["q.1", "q.2", "q.3", "q.4", "q.5"]
    assert logs.prompts == ["Add two and two.\nAnswer:", "Name a red fruit.", "Capital of France?",
                            "Spell cat.", "Plain prompt, not a list"]
    assert logs.tasks == ["arith", "trivia", "trivia", "spelling", "arith"]
    assert logs.experts == ["model-a", "model-b"]
    np.testing.assert_array_equal(logs.scores, [[0.5, 0.5], [1, 0.5], [NAN, 1], [0, 1], [0, NAN]])
    np.testing.assert_allclose(logs.costs, [[0.003, 0.0002], [0.003, 0.0003], [NAN, 0.0003],
                                            [NAN, 0.0001], [0.0005, NAN]], rtol=1e-12)
    np.testing.assert_array_equal(logs.output_tokens, [[1, 1], [1, 1], [NAN, 1], [NAN, 3], [1, NAN]])
    assert logs.input_tokens[3, 1] == 3  # "spell", "cat", "."
    r = logs.report
    assert (r.format, r.rows_read, r.dropped_rows) == ("routerbench", 8, 5)
    assert r.counts == {"missing_score": 4, "unparseable_score": 1, "missing_cost": 1,
                        "prompt_without_scores": 1, "output_tokens_from_response": 10,
                        "duplicate_id_merged": 1, "duplicate_prompt_merged": 1, "multi_task_prompt": 1,
                        "duplicate_row_averaged": 3}
    assert len(r.notes) == len(r.counts) and any("4 (prompt, model) cells" in n for n in r.notes)


def test_routerbench_directory_prefixes_colliding_ids(tmp_path):
    shutil.copy(FIX / "routerbench" / "tiny_train.csv", tmp_path / "a_train.csv")
    (tmp_path / "b_train.csv").write_text(
        ",sample_id,prompt,eval_name,model-a,model-c,model-a|total_cost,model-c|total_cost\n"
        "0,q.1,\"['A different question.']\",other,1,0,0.001,0.002\n"
        "1,q.9,\"['Name a red fruit.']\",trivia,,1,,0.004\n")
    logs = load_logs(tmp_path)
    assert logs.prompt_ids == ["q.1", "q.2", "q.3", "q.4", "q.5", "b_train:q.1"]
    assert logs.experts == ["model-a", "model-b", "model-c"]
    assert logs.scores[1, 2] == 1.0  # q.9 repeats q.2's text: merged into q.2
    assert logs.report.counts["prompt_id_prefixed"] == 1
    assert logs.report.counts["duplicate_prompt_merged"] == 2
    assert logs.report.rows_read == 10


# ---------------------------------------------------------------- llmrouter


def test_llmrouter_matrices_costs_and_report():
    logs = load_logs(FIX / "llmrouter")
    questions = ["What is one plus one?", "Name the largest planet.", "Translate hello to French.",
                 "An orphan question."]
    assert logs.prompts == questions
    assert logs.prompt_ids == [sha(q) for q in questions]
    assert logs.tasks == ["arith", "astro", "lang", ""]
    assert logs.experts == ["m-big", "m-small", "m-unpriced"]
    np.testing.assert_array_equal(logs.scores, [[1, 1, NAN], [1, 0, 0.5], [0.75, 0.25, NAN], [NAN, 0.5, NAN]])
    # tokens: question 6/5/5/4; ground truth "2", "Jupiter", "" (floor 1), none (floor 1)
    np.testing.assert_array_equal(logs.input_tokens, [[6, 6, NAN], [5, 5, 5], [5, 5, NAN], [NAN, 4, NAN]])
    np.testing.assert_array_equal(logs.output_tokens, [[1, 1, NAN], [1, 1, 1], [1, 1, NAN], [NAN, 1, NAN]])
    np.testing.assert_allclose(logs.costs, np.array(
        [[6 * 1 + 2, 6 * 0.2 + 0.4, NAN], [5 + 2, 5 * 0.2 + 0.4, NAN], [5 + 2, 5 * 0.2 + 0.4, NAN],
         [NAN, 4 * 0.2 + 0.4, NAN]]) / 1e6, rtol=1e-12)
    r = logs.report
    assert (r.rows_read, r.dropped_rows) == (5, 2)
    assert r.counts == {"missing_score": 1, "unparseable_score": 1, "score_above_one": 1, "prompt_without_scores": 1,
                        "query_not_found": 1, "multi_task_prompt": 1, "unknown_model_price": 1,
                        "cost_derived_from_tokens": 7}
    assert any("ground_truth answer (a stand-in: the source has no responses), floor 1" in n for n in r.notes)


def test_llmrouter_from_scores_file_with_extra_prices():
    logs = load_logs(FIX / "llmrouter" / "scores_train.json", prices={"m-unpriced": (1.0, 1.0)})
    assert logs.costs[1, 2] == pytest.approx((5 + 1) / 1e6)
    assert "unknown_model_price" not in logs.report.counts


# ---------------------------------------------------------------- routellm


def test_routellm_directory():
    logs = load_logs(FIX / "routellm")
    assert logs.prompt_ids == ["mmlu_anatomy.0", "mmlu_anatomy.1", "mmlu_anatomy.3",
                               "mmlu_astronomy.0", "mmlu_astronomy.2"]
    assert logs.prompts[0] == "Which bone is in the arm?\nA. femur\nB. humerus\nAnswer:"
    assert logs.tasks == ["mmlu_anatomy"] * 3 + ["mmlu_astronomy"] * 2
    assert logs.experts == ["gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"]
    np.testing.assert_array_equal(logs.scores, [[1, 0.5], [1, 0.5], [1, NAN], [0, 1], [1, NAN]])
    assert np.isnan(logs.costs).all() and logs.output_tokens is None
    r = logs.report
    assert (r.rows_read, r.dropped_rows) == (7, 2)
    assert r.counts == {"missing_score": 1, "unparseable_score": 1, "no_cost_in_source": 12,
                        "duplicate_prompt_merged": 2, "multi_task_prompt": 1, "duplicate_row_averaged": 4}
    assert any(n.startswith("no cost in source") for n in r.notes)


def test_routellm_prices_derive_cost():
    logs = load_logs(FIX / "routellm" / "mmlu" / "mmlu_astronomy.csv",
                     prices={"gpt-4-1106-preview": (10.0, 30.0)})
    n_in = count_tokens(["What orbits the Earth?"])[0]
    assert logs.costs[0, 0] == pytest.approx((n_in * 10 + 30) / 1e6)
    assert np.isnan(logs.costs[:, 1]).all()
    assert logs.report.counts["cost_derived_from_tokens"] == 3
    assert logs.report.counts["unknown_model_price"] == 2


# ---------------------------------------------------------------- row schema


def test_rows_jsonl_dirty_rows():
    logs = load_logs(FIX / "rows" / "rows.jsonl")
    assert logs.prompt_ids == ["p1", "p2", sha("Name a colour."), "p7"]
    assert logs.tasks == ["chat", "math", "", "x"]
    assert logs.experts == ["alpha", "beta"]
    np.testing.assert_array_equal(logs.scores, [[0.5, 0.5], [0.25, NAN], [0.5, NAN], [1, NAN]])
    np.testing.assert_allclose(logs.costs, [[0.002, 0.003], [NAN, NAN], [0.0005, NAN], [NAN, NAN]], rtol=1e-12)
    np.testing.assert_array_equal(logs.input_tokens, [[3, NAN], [NAN, NAN], [NAN, NAN], [NAN, NAN]])
    assert logs.latency_s[0, 0] == 0.5
    r = logs.report
    assert (r.rows_read, r.dropped_rows) == (12, 5)
    assert r.counts == {"missing_score": 1, "unparseable_score": 2, "score_above_one": 1, "missing_prompt": 1, "unparseable_line": 1,
                        "missing_cost": 1, "unparseable_cost": 1, "prompt_id_generated": 1,
                        "duplicate_prompt_merged": 1, "duplicate_row_averaged": 2}


def test_rows_csv_with_index_column():
    logs = load_logs(FIX / "rows" / "rows.csv")
    assert logs.prompt_ids == ["c1", "c2"]
    assert logs.prompts == ["Hello, world?", "Line one\nline two"]
    assert logs.tasks == ["greet", "multi"]
    np.testing.assert_array_equal(logs.scores, [[1, 0.5], [0.5, NAN]])
    np.testing.assert_allclose(logs.costs, [[0.01, 0.025], [NAN, NAN]], rtol=1e-12)
    assert logs.report.counts == {"missing_score": 1, "missing_cost": 1, "duplicate_prompt_merged": 1,
                                  "multi_task_prompt": 1, "duplicate_row_averaged": 1}


def test_rows_report_unread_columns_and_scores_that_look_like_percentages(tmp_path):
    # A user's own CSV: costs under "cost" (the schema says cost_usd), scores in 0..100, a
    # pandas index and a response column (neither worth a note).
    f = tmp_path / "mine.csv"
    lines = ["Unnamed: 0,prompt,model,score,cost,response"]
    lines += [f"{i},question {i},{m},{s},0.001,text" for i, (m, s) in
              enumerate([("a", 0), ("b", 100), ("a", 50), ("b", 1), ("a", 250)])]
    f.write_text("\n".join(lines) + "\n")
    r = load_logs(f).report
    assert r.counts["ignored_column"] == 1 and r.counts["unparseable_score"] == 3 and r.counts["score_above_one"] == 2
    notes = "\n".join(r.notes)
    assert "ignored 1 column(s) not in the row schema: cost (the schema's: prompt_id" in notes
    assert "2 of those lie in (1, 100]: if the scores are percentages, divide them by 100" in notes
    assert "response" not in notes and "Unnamed" not in notes and r.dropped_rows == 3


def test_rows_parquet_bool_scores(tmp_path):
    rows = [{"prompt": "Is water wet?", "task": "qa", "model": "alpha", "score": True, "cost_usd": 0.01},
            {"prompt": "Is water wet?", "task": "qa", "model": "beta", "score": False, "cost_usd": None},
            {"prompt": "Is fire cold?", "task": "qa", "model": "alpha", "score": None, "cost_usd": 0.02}]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bools.parquet")
    logs = load_logs(tmp_path / "bools.parquet")
    assert logs.prompt_ids == [sha("Is water wet?")]
    np.testing.assert_array_equal(logs.scores, [[1.0, 0.0]])
    np.testing.assert_array_equal(logs.costs, [[0.01, NAN]])
    assert logs.report.counts == {"missing_score": 1, "missing_cost": 1, "prompt_id_generated": 2}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("source", ["rows/rows.jsonl", "routerbench/tiny_train.csv", "llmrouter"])
def test_write_then_load_round_trip(tmp_path, suffix, source):
    logs = load_logs(FIX / source)
    back = load_logs(write_logs(logs, tmp_path / f"out{suffix}"))
    assert back.report.format == {".jsonl": "rows-jsonl", ".csv": "rows-csv", ".parquet": "rows-parquet"}[suffix]
    assert_same_matrices(logs, back)
    assert back.to_rows() == logs.to_rows()


def test_progress_goes_to_stderr(capsys):
    load_logs(FIX / "routellm", progress=True)
    err = capsys.readouterr().err
    assert "mmlu_anatomy.csv: 7 cells" in err and "5 prompts x 2 experts" in err
    load_logs(FIX / "routellm" / "mmlu" / "mmlu_anatomy.csv", progress=True)
    assert capsys.readouterr().err == ""   # one file: nothing to follow, the caller summarises it


def test_rows_directory_of_per_model_files(tmp_path):
    write_logs([{"prompt_id": "x", "prompt": "Q one", "model": "a", "score": 1.0}], tmp_path / "a.jsonl")
    write_logs([{"prompt_id": "x", "prompt": "Q one", "model": "b", "score": 0.0},
                {"prompt_id": "y", "prompt": "Q two", "model": "b", "score": 1.0}], tmp_path / "b.jsonl")
    logs = load_logs(tmp_path)
    assert logs.prompt_ids == ["x", "y"]
    np.testing.assert_array_equal(logs.scores, [[1, 0], [NAN, 1]])


def test_write_logs_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=".xlsx"):
        write_logs([], tmp_path / "out.xlsx")


# ---------------------------------------------------------------- matrix operations


def make_logs(n: int, m: int = 2, seed: int = 0) -> BenchmarkLogs:
    rng = np.random.default_rng(seed)
    return BenchmarkLogs(
        prompt_ids=[f"id{i}" for i in range(n)], prompts=[f"prompt {i}" for i in range(n)],
        tasks=["t"] * n, experts=[f"e{j}" for j in range(m)],
        scores=rng.random((n, m)), costs=rng.random((n, m)))


def test_complete_drops_incomplete_and_imputes_by_task_median():
    logs = BenchmarkLogs(
        prompt_ids=list("abcde"), prompts=list("ABCDE"), tasks=["t1", "t1", "t1", "t2", "t2"],
        experts=["x", "y", "z"],
        scores=np.array([[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, NAN, 1]], dtype=float),
        costs=np.array([[1, NAN, NAN], [NAN, 2, NAN], [3, 4, NAN], [NAN, NAN, NAN], [20, NAN, NAN]]))
    out = logs.complete()
    assert out.prompt_ids == list("abcd")
    # x: b <- median(t1: 1, 3) = 2; d <- median(t2: 20, from the dropped prompt e)
    # y: a <- median(t1: 2, 4) = 3; d <- no t2 cost -> median over all prompts (2, 4) = 3
    np.testing.assert_array_equal(out.costs[:, :2], [[1, 3], [2, 2], [3, 4], [20, 3]])
    assert np.isnan(out.costs[:, 2]).all()
    assert out.report.counts == {"incomplete_prompt_dropped": 1, "missing_cost_imputed": 4,
                                 "missing_cost_not_imputed": 4}
    assert out.report.dropped_rows == 1
    assert np.isnan(logs.costs[1, 0]) and logs.n_prompts == 5  # the original is untouched


def test_subset_select_and_means():
    logs = load_logs(FIX / "routerbench" / "tiny_train.csv")
    sub = logs.subset([4, 0])
    assert sub.prompt_ids == ["q.5", "q.1"] and sub.scores.shape == (2, 2)
    assert logs.subset(np.array([True, False, False, False, True])).prompt_ids == ["q.1", "q.5"]
    assert sub.output_tokens.shape == (2, 2)
    only_b = logs.select_experts(["model-b"])
    assert only_b.experts == ["model-b"] and only_b.n_prompts == 5
    np.testing.assert_array_equal(only_b.scores[:, 0], logs.scores[:, 1])
    with pytest.raises(KeyError):
        logs.select_experts(["nope"])
    np.testing.assert_allclose(logs.mean_score(), [1.5 / 4, 3 / 4])
    np.testing.assert_allclose(logs.mean_cost(), [0.0065 / 3, 0.0009 / 4])


def test_invalid_logs_are_refused():
    with pytest.raises(ValueError, match="unique"):
        BenchmarkLogs(["a", "a"], ["x", "y"], ["", ""], ["m"], np.zeros((2, 1)), np.zeros((2, 1)))
    with pytest.raises(ValueError, match="shape"):
        BenchmarkLogs(["a"], ["x"], [""], ["m"], np.zeros((1, 2)), np.zeros((1, 1)))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 60), frac=st.floats(0.05, 0.95), seed=st.integers(0, 2**32 - 1))
def test_split_by_prompt_is_a_seeded_partition(n, frac, seed):
    logs = make_logs(n)
    n_test = int(np.ceil(frac * n))
    if n_test >= n:  # nothing left to train on
        with pytest.raises(ValueError):
            split_by_prompt(logs, test_size=frac, seed=seed)
        return
    train, test = split_by_prompt(logs, test_size=frac, seed=seed)
    assert set(train.prompt_ids).isdisjoint(test.prompt_ids)
    assert sorted(train.prompt_ids + test.prompt_ids) == sorted(logs.prompt_ids)
    assert test.n_prompts == n_test
    again = split_by_prompt(logs, test_size=frac, seed=seed)[1]
    assert again.prompt_ids == test.prompt_ids


def test_split_seed_changes_the_split_and_rows_follow_ids():
    logs = make_logs(50)
    a = split_by_prompt(logs, seed=0)[1].prompt_ids
    b = split_by_prompt(logs, seed=1)[1].prompt_ids
    assert a != b and len(a) == len(b) == 10
    train, test = split_by_prompt(logs, test_size=7, seed=3)
    assert test.n_prompts == 7
    i = logs.prompt_ids.index(test.prompt_ids[0])
    np.testing.assert_array_equal(test.scores[0], logs.scores[i])
    with pytest.raises(ValueError):
        split_by_prompt(logs, test_size=1.5)
    with pytest.raises(ValueError):
        split_by_prompt(make_logs(1))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 40), k=st.integers(2, 8), seed=st.integers(0, 1000))
def test_kfold_covers_each_prompt_once(n, k, seed):
    logs = make_logs(n)
    if k > n:
        with pytest.raises(ValueError):
            list(kfold_by_prompt(logs, k=k, seed=seed))
        return
    folds = list(kfold_by_prompt(logs, k=k, seed=seed))
    assert len(folds) == k
    tested = [pid for _, test in folds for pid in test.prompt_ids]
    assert sorted(tested) == sorted(logs.prompt_ids)
    for train, test in folds:
        assert set(train.prompt_ids).isdisjoint(test.prompt_ids)
        assert train.n_prompts + test.n_prompts == n
