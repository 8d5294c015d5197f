"""Scoring queries for live traffic: micro-batching and a per-query cache.

Concurrent requests each ``await scorer.score(text)``. The first waiter in an idle
period starts a batch; requests that arrive while a batch is being scored queue for the
next one, so under load every model call carries many queries (one MiniLM forward for
a batch of 16 costs much less than 16 single ones) and at low load a query waits for
nothing. Scoring runs in a worker thread: the event loop never blocks on torch.

Results are cached per text (LRU): a repeated prompt costs a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from router_models.base import Router


@dataclass(frozen=True)
class Scores:
    quality: np.ndarray   # [m], in router.experts_ order
    cost: np.ndarray      # [m] USD per call
    cached: bool
    seconds: float        # time from the call to the answer


class BatchedScorer:
    """``await score(text)`` -> :class:`Scores`, batching concurrent calls."""

    def __init__(self, router: Router, max_batch: int = 32, cache_size: int = 10_000):
        self.router = router
        self.max_batch = max_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._queue: list[tuple[str, str, asyncio.Future]] = []
        self._running = False
        self.batches = 0
        self.scored = 0

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
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.append((key, text, fut))
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        q, c = await fut
        return Scores(q, c, False, time.perf_counter() - t0)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                texts = [t for _, t, _ in batch]
                try:
                    q, c = await asyncio.to_thread(self._predict, texts)
                except Exception as exc:  # noqa: BLE001 - handed to every waiter
                    for _, _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                self.batches += 1
                self.scored += len(batch)
                for i, (key, _, fut) in enumerate(batch):
                    self._remember(key, q[i], c[i])
                    if not fut.done():
                        fut.set_result((q[i], c[i]))
        finally:
            self._running = False

    def _predict(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.router.predict_quality(texts), self.router.predict_cost(texts)

    def _remember(self, key: str, q: np.ndarray, c: np.ndarray) -> None:
        self._cache[key] = (q, c)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
