"""BatchedScorer on a real (TF-IDF classifier) router: concurrent calls share model calls,
answers equal direct predictions, repeats hit the cache, errors reach every waiter; for a
router that pads by length, batches split by length and short queries are answered first;
scoring runs on the asked torch threads, and ``workers`` batches at once."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from router_models import ClassifierRouter
from router_models.featurize import MAX_CHARS
from router_models.logs import BenchmarkLogs
from router_models.serving import BatchedScorer

TOPICS = ["What is {} plus {}?", "Write a short poem about {}.", "Translate '{}' into French."]
WORDS = ["the moon", "a cat", "rain", "snow", "cheese", "a river", "bread", "stars"]


def prompts(n: int, offset: int = 0) -> list[str]:
    out = []
    for i in range(offset, offset + n):
        t = TOPICS[i % 3]
        out.append(t.format(i, i + 7) if i % 3 == 0 else t.format(f"{WORDS[i % 8]} {i}"))
    return out


@pytest.fixture(scope="module")
def router() -> ClassifierRouter:
    texts = prompts(30)
    scores = np.array([[float(i % 3 == j) for j in range(3)] for i in range(30)])
    costs = np.array([[1e-3 + 1e-5 * len(t), 2e-4, 5e-4 + 2e-6 * len(t)] for t in texts])
    logs = BenchmarkLogs(prompt_ids=[f"q{i}" for i in range(30)], prompts=texts,
                         tasks=[""] * 30, experts=["a", "b", "c"], scores=scores, costs=costs)
    return ClassifierRouter(featurizer="tfidf", model="logreg", cv=1).fit(logs)


def test_concurrent_calls_are_batched_and_equal_direct_predictions(router):
    texts = prompts(20, offset=100)
    scorer = BatchedScorer(router)

    async def main():
        return await asyncio.gather(*(scorer.score(t) for t in texts))

    results = asyncio.run(main())
    assert scorer.batches < 20
    assert scorer.batches == 1 and scorer.scored == 20   # all queued before the first batch
    q, c = router.predict_quality(texts), router.predict_cost(texts)
    for i, r in enumerate(results):
        assert not r.cached and r.seconds >= 0
        np.testing.assert_allclose(r.quality, q[i], rtol=1e-12, atol=0)
        np.testing.assert_allclose(r.cost, c[i], rtol=1e-12, atol=0)
        assert r.quality.shape == (3,)


def test_max_batch_splits_the_queue(router):
    scorer = BatchedScorer(router, max_batch=8)

    async def main():
        return await asyncio.gather(*(scorer.score(t) for t in prompts(20, offset=200)))

    asyncio.run(main())
    assert (scorer.batches, scorer.scored) == (3, 20)      # 8 + 8 + 4


def test_repeat_is_cached_and_identical(router):
    scorer = BatchedScorer(router)

    async def main():
        first = await scorer.score("What is 2 plus 2?")
        second = await scorer.score("What is 2 plus 2?")
        return first, second

    first, second = asyncio.run(main())
    assert (first.cached, second.cached) == (False, True)
    np.testing.assert_array_equal(second.quality, first.quality)
    np.testing.assert_array_equal(second.cost, first.cost)
    assert scorer.batches == 1   # the repeat never reached the model


def test_cache_survives_event_loops_and_evicts_least_recently_used(router):
    scorer = BatchedScorer(router, cache_size=2)
    a, b, c = prompts(3, offset=300)
    assert asyncio.run(scorer.score(a)).cached is False
    assert asyncio.run(scorer.score(b)).cached is False
    assert asyncio.run(scorer.score(a)).cached is True     # a is now the most recent
    assert asyncio.run(scorer.score(c)).cached is False    # evicts b
    assert asyncio.run(scorer.score(a)).cached is True
    assert asyncio.run(scorer.score(b)).cached is False


def test_prompts_sharing_a_tail_do_not_share_a_cost(router):
    """The featurizers read only the last MAX_CHARS characters, but the cost model reads
    the whole length: a cached answer for one must not be served for the other."""
    tail = "Write a short poem about the moon. " * (MAX_CHARS // 20)
    short, long = tail, "Some long preamble. " * 50 + tail
    scorer = BatchedScorer(router)

    async def main():
        return await scorer.score(short), await scorer.score(long)

    s, lo = asyncio.run(main())
    assert not lo.cached
    np.testing.assert_allclose(lo.cost, router.predict_cost([long])[0], rtol=1e-12)
    assert (lo.cost > s.cost).any()
    np.testing.assert_allclose(lo.quality, s.quality, rtol=1e-12)   # same tail, same quality


def test_an_error_reaches_every_waiter_and_the_scorer_recovers(router, monkeypatch):
    scorer = BatchedScorer(router)
    calls = []
    real = router.predict_quality

    def broken(queries):
        calls.append(len(queries))
        raise RuntimeError("model fell over")

    texts = prompts(5, offset=400)

    async def failing():
        return await asyncio.gather(*(scorer.score(t) for t in texts), return_exceptions=True)

    monkeypatch.setattr(router, "predict_quality", broken)
    errors = asyncio.run(failing())
    assert calls == [5]                               # one batch, shared by all five
    assert all(isinstance(e, RuntimeError) and str(e) == "model fell over" for e in errors)
    assert scorer.batches == 0 and scorer.scored == 0

    monkeypatch.setattr(router, "predict_quality", real)

    async def healthy():
        return await asyncio.gather(*(scorer.score(t) for t in texts))

    results = asyncio.run(healthy())
    assert all(not r.cached for r in results)         # failures were not cached
    np.testing.assert_allclose(np.stack([r.quality for r in results]),
                               router.predict_quality(texts), rtol=1e-12)
    assert scorer.batches == 1


def test_a_failed_batch_does_not_fail_the_next_batch(router, monkeypatch):
    scorer = BatchedScorer(router, max_batch=2)
    real = router.predict_quality
    state = {"n": 0}

    def first_call_fails(queries):
        state["n"] += 1
        if state["n"] == 1:
            raise ValueError("transient")
        return real(queries)

    monkeypatch.setattr(router, "predict_quality", first_call_fails)
    texts = prompts(4, offset=500)

    async def main():
        return await asyncio.gather(*(scorer.score(t) for t in texts), return_exceptions=True)

    out = asyncio.run(main())
    assert [type(r).__name__ for r in out] == ["ValueError", "ValueError", "Scores", "Scores"]
    assert scorer.batches == 1 and scorer.scored == 2


# ---- routers that pad by length (MiniLM) ----------------------------------------------------------

class PaddingRouter:
    """The TF-IDF router presented as one that reads a transformer: its featurizer reports a
    token length per text (here ``length(text)``, its words), and every model call is recorded."""

    def __init__(self, inner: ClassifierRouter, fail_longer_than: int | None = None,
                 length=lambda text: len(text.split())):
        self.inner, self.fail_longer_than, self.length = inner, fail_longer_than, length
        self.featurizer_ = SimpleNamespace(token_lengths=lambda texts: [length(t) for t in texts])
        self.calls: list[list[str]] = []
        self.threads: list[int] = []

    def predict_quality(self, texts):
        self.calls.append(list(texts))
        self.threads.append(torch.get_num_threads())
        if self.fail_longer_than is not None and max(map(self.length, texts)) > self.fail_longer_than:
            raise RuntimeError("too long")
        return self.inner.predict_quality(texts)

    def predict_cost(self, texts):
        return self.inner.predict_cost(texts)


LONG = ["Write a short poem about the sea and the moon, please. " * 12 + f"({i})" for i in range(2)]


def score_all(scorer, texts):
    async def main():
        return await asyncio.gather(*(scorer.score(t) for t in texts), return_exceptions=True)

    return asyncio.run(main())


def test_a_batch_is_split_by_length_and_short_queries_are_answered_first(router):
    padded = PaddingRouter(router)
    short = prompts(10, offset=600)
    texts = [LONG[0]] + short[:5] + [LONG[1]] + short[5:]      # long ones queued among short ones
    scorer = BatchedScorer(padded)
    answered: list[str] = []

    async def ask(text):
        result = await scorer.score(text)
        answered.append(text)
        return result

    async def main():
        return await asyncio.gather(*(ask(t) for t in texts))

    results = asyncio.run(main())
    assert [sorted(c) for c in padded.calls] == [sorted(short), sorted(LONG)]
    assert (scorer.batches, scorer.scored) == (2, 12)
    assert sorted(answered[:10]) == sorted(short)              # before the long group's answers
    q, c = router.predict_quality(texts), router.predict_cost(texts)
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.quality, q[i], rtol=1e-12, atol=0)
        np.testing.assert_allclose(r.cost, c[i], rtol=1e-12, atol=0)


def test_by_length_off_and_token_budget(router):
    padded = PaddingRouter(router)
    scorer = BatchedScorer(padded, by_length=False)
    score_all(scorer, [LONG[0]] + prompts(5, offset=700))
    assert len(padded.calls) == 1 and len(padded.calls[0]) == 6     # one call, as before
    budget = PaddingRouter(router, length=len)
    texts = [f"{'x' * 90} {i:03d}" for i in range(12)]                 # 94 "tokens" each
    scorer = BatchedScorer(budget, max_tokens=300)
    score_all(scorer, texts)
    assert [len(c) for c in budget.calls] == [3, 3, 3, 3]             # 3 * 94 <= 300 < 4 * 94


def test_a_failing_group_fails_only_its_own_waiters(router):
    padded = PaddingRouter(router, fail_longer_than=100)
    texts = prompts(4, offset=800) + [LONG[0]]
    results = score_all(BatchedScorer(padded), texts)
    assert [type(r).__name__ for r in results] == ["Scores"] * 4 + ["RuntimeError"]


def test_scoring_runs_on_the_asked_torch_threads(router):
    before = torch.get_num_threads()
    one, default = PaddingRouter(router), PaddingRouter(router)
    score_all(BatchedScorer(one, threads=1), prompts(3, offset=900))
    score_all(BatchedScorer(default, threads=None), prompts(3, offset=910))
    assert one.threads == [1]
    assert default.threads == [before] and torch.get_num_threads() == before
    with pytest.raises(ValueError):
        BatchedScorer(router, threads=0)


def test_two_workers_score_two_batches_at_once(router):
    both_in = threading.Barrier(2, timeout=20)

    class Meeting(PaddingRouter):
        def predict_quality(self, texts):
            both_in.wait()             # breaks (and raises) unless two calls overlap
            return super().predict_quality(texts)

    meeting = Meeting(router)
    results = score_all(BatchedScorer(meeting, max_batch=1, workers=2), prompts(2, offset=950))
    assert [type(r).__name__ for r in results] == ["Scores", "Scores"]
    assert len(meeting.calls) == 2


def test_warm_up_scores_one_query_outside_the_cache_and_the_counters(router):
    from router_models.serving import WARM_QUERY

    recorded = PaddingRouter(router)
    scorer = BatchedScorer(recorded, threads=1)
    assert scorer.warm() > 0 and scorer.warm() > 0
    (first,), (second,) = recorded.calls
    assert first.startswith(WARM_QUERY) and second.startswith(WARM_QUERY) and first != second   # never cached
    assert recorded.threads == [1, 1] and scorer.batches == scorer.scored == 0 and len(scorer._cache) == 0
    asked = asyncio.run(scorer.score(first))   # a client asking it is still scored, then cached
    assert not asked.cached and recorded.calls[-1] == [first] and scorer.scored == 1
