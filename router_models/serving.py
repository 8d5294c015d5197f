"""Scoring queries for live traffic: micro-batching and a per-query cache.

Concurrent requests each ``await scorer.score(text)``. The first waiter in an idle
period starts a batch; requests that arrive while a batch is being scored queue for the
next one, so under load every model call carries many queries and at low load a query
waits for nothing. Scoring runs in a worker thread: the event loop never blocks on torch.

A transformer batch runs every query at its longest query's length, so when the router
reads MiniLM (its ``featurizer_`` has ``token_lengths``) a batch is split by length
(:func:`router_models.featurize.length_groups`) and its groups are scored shortest first,
each group's waiters answered as soon as their group is done: a short query neither pays
for a long one's padding nor waits for it. Scoring runs on ``threads`` torch threads
(default 1: on a small shared host, OpenMP threads that wait on each other at every op
make a forward pass many times slower as soon as another process holds a core); with
``workers`` = 2, two batches are scored at once, one per core.

Results are cached per text (LRU): a repeated prompt costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from router_models.base import Router
from router_models.featurize import length_groups, torch_threads

_Waiter = tuple[str, str, asyncio.Future]   # cache key, text, the caller's future
WARM_QUERY = "What is the capital of France? Answer in one word."


@dataclass(frozen=True)
class Scores:
    quality: np.ndarray   # [m], in router.experts_ order
    cost: np.ndarray      # [m] USD per call
    cached: bool
    seconds: float        # time from the call to the answer


class BatchedScorer:
    """``await score(text)`` -> :class:`Scores`, batching concurrent calls.

    ``max_batch`` queries are taken from the queue at a time; for a MiniLM router they are
    cut into model calls of at most ``max_tokens`` padded word pieces (``by_length=False``:
    one call per batch). ``threads``: torch intra-op threads while scoring (None leaves
    torch's setting). ``workers``: batches scored at the same time. ``batches`` counts
    model calls, ``scored`` the queries in them.
    """

    def __init__(self, router: Router, max_batch: int = 32, cache_size: int = 10_000,
                 threads: int | None = 1, max_tokens: int = 2048, workers: int = 1,
                 by_length: bool = True):
        if max_batch < 1 or workers < 1 or (threads is not None and threads < 1):
            raise ValueError("max_batch, workers and threads must be at least 1")
        self.router = router
        self.max_batch = max_batch
        self.cache_size = cache_size
        self.threads = threads
        self.max_tokens = max_tokens
        self.workers = workers
        self.by_length = by_length
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._queue: list[_Waiter] = []
        self._draining = 0
        self.batches = 0
        self.scored = 0

    def warm(self) -> float:
        """Score :data:`WARM_QUERY` once, outside this scorer's cache and counters, so that
        the first client does not pay for loading the encoder, its first forward pass, or
        state a router builds on its first prediction (about 3 s for a MiniLM router). The
        query ends in a fresh random tag, so that a persistent embedding cache cannot answer
        it without the encoder. Blocking: call it from a thread. Returns the milliseconds it
        took."""
        t0 = time.perf_counter()
        with torch_threads(self.threads):
            self._predict([f"{WARM_QUERY} ({uuid.uuid4().hex[:12]})"])
        return (time.perf_counter() - t0) * 1e3

    @staticmethod
    def _key(text: str) -> str:
        # The whole text, not its featurized tail: the cost model reads the full length.
        return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()

    async def score(self, text: str) -> Scores:
        t0 = time.perf_counter()
        key = self._key(text)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return Scores(hit[0], hit[1], True, time.perf_counter() - t0)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()
        self._queue.append((key, text, fut))
        if self._draining < self.workers:
            self._draining += 1
            loop.create_task(self._drain())
        q, c = await fut
        return Scores(q, c, False, time.perf_counter() - t0)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                try:
                    await asyncio.to_thread(self._score_batch, batch, loop)
                except Exception as exc:  # noqa: BLE001 - grouping failed: handed to every waiter
                    self._settle(batch, None, exc)
        finally:
            self._draining -= 1

    def _score_batch(self, batch: list[_Waiter], loop: asyncio.AbstractEventLoop) -> None:
        """In the worker thread: score ``batch`` group by group, handing each group's answers
        to the event loop as soon as they are ready."""
        texts = [t for _, t, _ in batch]
        with torch_threads(self.threads):
            for group in self._groups(texts):
                part = [batch[i] for i in group]
                try:
                    result = self._predict([texts[i] for i in group])
                except Exception as exc:  # noqa: BLE001 - handed to the group's waiters
                    loop.call_soon_threadsafe(self._settle, part, None, exc)
                else:
                    loop.call_soon_threadsafe(self._settle, part, result, None)

    def _groups(self, texts: list[str]) -> list[list[int]]:
        """Indices of ``texts`` per model call: one call unless the router pads by length."""
        lengths = getattr(getattr(self.router, "featurizer_", None), "token_lengths", None)
        if lengths is None or len(texts) == 1 or not self.by_length:
            return [list(range(len(texts)))]
        return length_groups(lengths(texts), max_items=self.max_batch, max_tokens=self.max_tokens)

    def _predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.router.predict_quality(texts), self.router.predict_cost(texts)

    def _settle(self, part: list[_Waiter], result: tuple[np.ndarray, np.ndarray] | None,
                exc: BaseException | None) -> None:
        """On the event loop: answer (and cache) or fail the waiters of one model call."""
        if exc is not None:
            for _, _, fut in part:
                if not fut.done():
                    fut.set_exception(exc)
            return
        q, c = result
        self.batches += 1
        self.scored += len(part)
        for i, (key, _, fut) in enumerate(part):
            self._remember(key, q[i], c[i])
            if not fut.done():
                fut.set_result((q[i], c[i]))

    def _remember(self, key: str, q: np.ndarray, c: np.ndarray) -> None:
        self._cache[key] = (q, c)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
