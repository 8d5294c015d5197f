"""Featurizers: the embedding cache (memory LRU + SQLite), the real offline MiniLM model
and the lean encoder that must give its vectors, batching by length, the prompt tail a
featurizer reads, and TF-IDF saved as JSON + one array."""

from __future__ import annotations

import itertools
import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from router_models import featurize
from router_models.featurize import (
    EMBED_DIM,
    MAX_CHARS,
    EmbeddingCache,
    MiniLMEncoder,
    MiniLMFeaturizer,
    TfidfFeaturizer,
    encoder_dtype,
    length_groups,
    make_featurizer,
    minilm_encoder,
    minilm_model,
    query_text,
    torch_threads,
)


@pytest.fixture(scope="session")
def minilm():
    return minilm_model()  # the real offline model, loaded once


@pytest.fixture()
def float32(monkeypatch):
    """The shared encoder in float32 for this test, whatever the CPU would pick."""
    monkeypatch.setenv(featurize.DTYPE_ENV, "float32")


class CountingMiniLM(MiniLMFeaturizer):
    """The real featurizer, counting what reaches the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoded: list[list[str]] = []

    def _encode(self, texts):
        self.encoded.append(list(texts))
        return super()._encode(texts)


# ---- the cache ----------------------------------------------------------------------------

def test_sqlite_cache_persists_across_instances(tmp_path):
    path = tmp_path / "deep" / "dir" / "emb.sqlite"
    vecs = {f"k{i}": np.random.default_rng(i).normal(size=EMBED_DIM).astype(np.float32)
            for i in range(3)}
    EmbeddingCache(path).put_many(vecs)
    fresh = EmbeddingCache(path)
    found = fresh.get_many(["k0", "k1", "k2", "nope"])
    assert set(found) == {"k0", "k1", "k2"}
    for k, v in vecs.items():
        assert found[k].dtype == np.float32
        np.testing.assert_array_equal(found[k], v)


def test_memory_cache_is_an_lru(tmp_path):
    cache = EmbeddingCache(capacity=2)
    a, b, c = (np.full(4, x, np.float32) for x in (1, 2, 3))
    cache.put_many({"a": a, "b": b})
    assert set(cache.get_many(["a"])) == {"a"}          # a is now the most recent
    cache.put_many({"c": c})                            # evicts b
    assert set(cache.get_many(["a", "b", "c"])) == {"a", "c"}


def test_sqlite_keeps_what_memory_evicts(tmp_path):
    cache = EmbeddingCache(tmp_path / "e.sqlite", capacity=1)
    cache.put_many({"a": np.ones(4, np.float32)})
    cache.put_many({"b": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(cache.get_many(["a"])["a"], np.ones(4, np.float32))


# ---- MiniLM ------------------------------------------------------------------------------------

TEXTS = ["What is 12 plus 30?", "Compute 7 times 8.", "Write a haiku about the sea."]


def test_minilm_embeddings_are_unit_norm_384d_and_deterministic(minilm):
    a = MiniLMFeaturizer(cache=EmbeddingCache()).transform(TEXTS)
    b = MiniLMFeaturizer(cache=EmbeddingCache()).transform(TEXTS[::-1])[::-1]
    assert a.shape == (3, EMBED_DIM) == (3, 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)   # fresh caches: encoded twice, same vectors
    sims = a @ a.T
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]   # arithmetic is closer to arithmetic
    assert MiniLMFeaturizer(cache=EmbeddingCache()).transform([]).shape == (0, EMBED_DIM)


def test_minilm_cache_avoids_re_encoding(minilm):
    feat = CountingMiniLM(cache=EmbeddingCache())
    first = feat.transform([TEXTS[0], TEXTS[1], TEXTS[0]])
    assert feat.encoded == [[TEXTS[0], TEXTS[1]]]              # duplicates encoded once
    np.testing.assert_array_equal(first[0], first[2])
    again = feat.transform([TEXTS[1], TEXTS[0]])
    assert len(feat.encoded) == 1                              # all from the cache
    np.testing.assert_array_equal(again, first[[1, 0]])
    feat.transform([TEXTS[2], TEXTS[0]])
    assert feat.encoded[1:] == [[TEXTS[2]]]                    # only the new text


def test_minilm_reads_the_same_queries_twice_with_one_encoding(minilm):
    """A router scores quality, then cost, of the same queries: one encoding, even when
    no cache keeps anything (capacity 0, as the routing benchmark measures)."""
    feat = CountingMiniLM(cache=EmbeddingCache(capacity=0))
    first = feat.transform(TEXTS[:2])
    first[:] = 0.0                                             # the caller's copy, not the kept one
    second = feat.transform(list(TEXTS[:2]))
    assert feat.encoded == [TEXTS[:2]]
    assert np.abs(second).sum() > 0
    feat.transform(TEXTS[1:3])                                 # other queries: encoded
    assert feat.encoded[1:] == [TEXTS[1:3]]
    feat.transform(TEXTS[:2])                                  # only the last call is kept
    assert len(feat.encoded) == 3


def test_tfidf_reads_the_same_queries_twice_with_one_transform_and_forgets_on_refit(monkeypatch):
    feat = TfidfFeaturizer().fit(TEXTS)
    calls = []
    real = feat.vectorizer_.transform
    monkeypatch.setattr(feat.vectorizer_, "transform", lambda t: calls.append(list(t)) or real(t))
    first = feat.transform(TEXTS[:2])
    first.data[:] = 0.0                                        # the caller's copy
    assert feat.transform(TEXTS[:2]).nnz and len(calls) == 1
    feat.fit(TEXTS[1:])                                        # a new vocabulary: nothing kept
    assert feat.transform(TEXTS[:2]).shape[1] == len(feat.feature_names())


def test_minilm_sqlite_cache_serves_a_restarted_process(minilm, tmp_path):
    path = tmp_path / "emb.sqlite"
    before = CountingMiniLM(cache=EmbeddingCache(path))
    vecs = before.transform(TEXTS)
    after = CountingMiniLM(cache=EmbeddingCache(path))
    np.testing.assert_array_equal(after.transform(TEXTS), vecs)
    assert len(before.encoded) == 1 and after.encoded == []


def test_default_cache_is_shared_and_can_be_backed_by_a_file(minilm, tmp_path, monkeypatch):
    monkeypatch.setattr(featurize, "_DEFAULT_CACHE", None)
    assert featurize.default_cache() is featurize.default_cache()
    backed = featurize.use_cache_file(tmp_path / "shared.sqlite")
    assert featurize.default_cache() is backed
    feat = CountingMiniLM()                                     # no cache of its own
    feat.transform(TEXTS[:1])
    assert set(EmbeddingCache(tmp_path / "shared.sqlite").get_many(
        [feat.cache_key(TEXTS[0])])) == {feat.cache_key(TEXTS[0])}


# ---- the lean encoder: the same vectors as SentenceTransformer.encode ------------------------------

VARIED = [
    "What is 12 plus 30?",
    "",                                                    # [CLS] [SEP] only
    "   ",                                                 # whitespace only
    "  Leading and trailing spaces.  ",
    "naïve café, Ünïcödé — 東京で寿司を食べたい 🚀🚀 Ωμέγα",    # accents, CJK, emoji, Greek
    "Literal special tokens: [CLS] [SEP] [MASK] [PAD] [UNK]",
    "tabs\tand\nnewlines\r\n and \x00 control \x07 chars",
    "def f(x):\n    return {k: v for k, v in x.items() if v}  # code",
    "Explain the Krebs cycle. " * 40,                      # 1,000 characters, over 256 word pieces
    "supercalifragilisticexpialidocious " * 3,
    "a",
]


def test_lean_encoder_equals_sentence_transformers(minilm, float32):
    """The lean path (fast tokenizer + hand-written forward + mean pooling + L2) gives the
    vectors of ``model.encode(texts, normalize_embeddings=True)`` on the cut text to 1e-5
    per element, batched (padded groups) and one text at a time (no padding)."""
    cut = [query_text(t) for t in VARIED]
    enc = minilm_encoder()
    assert enc.lean and enc.dtype == "float32"
    lengths = MiniLMFeaturizer(max_pieces=256, keep="head").token_lengths(VARIED)
    assert lengths[1] == 2 and max(lengths) == 256          # the empty text; one cut at 256
    assert sum(n == 256 for n in lengths) == 1 and len(set(lengths)) > 5
    ref = minilm.encode(cut, normalize_embeddings=True)     # cuts the first 256 pieces
    batched = MiniLMFeaturizer(cache=EmbeddingCache(), max_pieces=256, keep="head").transform(VARIED)
    single = np.concatenate([enc.encode([t]) for t in cut])
    for got in (batched, single):
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.abs(got - ref).max() < 1e-5
    assert len(length_groups(lengths)) > 1                   # the batch really was split and padded


def test_featurizer_reads_the_last_word_pieces_of_a_long_query(minilm, float32):
    """By default a query is cut to its last QUERY_PIECES word pieces between [CLS] and
    [SEP] (the question of a few-shot prompt comes last); the legacy head cut keeps the
    first 256. Each cut has its own cache keys, so a shared cache never mixes them."""
    long_text = " ".join(f"Step {i}: add {i} apples to the basket." for i in range(40))[-990:]
    assert query_text(long_text) == long_text
    full = minilm.tokenizer(long_text, truncation=False)["input_ids"]     # the model's own tokenizer
    assert len(full) > 256
    tail, head = MiniLMFeaturizer(), MiniLMFeaturizer(max_pieces=256, keep="head")
    assert (tail.max_pieces, tail.keep) == (featurize.QUERY_PIECES, "tail") == (128, "tail")
    enc = minilm_encoder()
    ids_tail = enc.token_ids([long_text], 128, "tail")[0]
    assert ids_tail == full[:1] + full[-127:] and len(ids_tail) == 128
    assert enc.token_ids([long_text], 256, "head")[0] == full[:255] + full[-1:]
    assert tail.token_lengths([long_text, "What is 2 plus 2?"]) == [128, len(minilm.tokenizer("What is 2 plus 2?")["input_ids"])]

    cache = EmbeddingCache()
    v_tail = MiniLMFeaturizer(cache=cache).transform([long_text, "What is 2 plus 2?"])
    v_head = MiniLMFeaturizer(cache=cache, max_pieces=256, keep="head").transform([long_text, "What is 2 plus 2?"])
    np.testing.assert_allclose(v_tail[0], enc.forward([ids_tail])[0], atol=1e-6)
    np.testing.assert_allclose(v_head[0], minilm.encode([long_text], normalize_embeddings=True)[0], atol=1e-5)
    assert float(v_tail[0] @ v_head[0]) < 0.999                 # the two cuts read different text
    np.testing.assert_allclose(v_tail[1], v_head[1], atol=1e-6)  # a short query is read whole by both
    assert head.cache_key(long_text) == featurize.text_key(long_text)   # caches written before stay valid
    assert tail.cache_key(long_text) != head.cache_key(long_text)
    assert MiniLMFeaturizer(max_pieces=64).cache_key(long_text) != tail.cache_key(long_text)


def test_featurizer_state_names_its_cut_and_old_states_read_the_head():
    state, arrays = MiniLMFeaturizer(max_pieces=96).state()
    assert state == {"name": "minilm", "max_pieces": 96, "keep": "tail"} and arrays == {}
    back = MiniLMFeaturizer.from_state(state, arrays)
    assert (back.max_pieces, back.keep) == (96, "tail")
    for old in ({"name": "minilm"}, None):                       # saved before the cut existed
        f = MiniLMFeaturizer.from_state(old, {})
        assert (f.max_pieces, f.keep) == (256, "head")
    with pytest.raises(ValueError, match="keep"):
        MiniLMFeaturizer(keep="middle")
    with pytest.raises(ValueError, match="max_pieces"):
        MiniLMFeaturizer(max_pieces=300)
    with pytest.raises(ValueError, match="max_pieces"):
        MiniLMFeaturizer(max_pieces=1)
    with pytest.raises(ValueError, match="max_pieces=64.5: expected a whole number"):
        MiniLMFeaturizer(max_pieces=64.5)


def test_lean_encoder_equals_sentence_transformers_on_mixed_batches(minilm, float32):
    """Random mixes of short and long texts: groups are padded differently every time."""
    rng = np.random.default_rng(0)
    words = "the of routing model cheap expert quality prompt 42 Zürich".split()
    texts = [" ".join(rng.choice(words, size=n)) for n in rng.integers(1, 80, size=14)] + [
        " ".join(rng.choice(words, size=300)), " ".join(rng.choice(words, size=150))]
    ref = minilm.encode(texts, normalize_embeddings=True)
    got = minilm_encoder().encode(texts, max_items=4, max_tokens=512)
    assert np.abs(got - ref).max() < 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_encoder_is_batch_order_independent(minilm, dtype, monkeypatch):
    monkeypatch.setenv(featurize.DTYPE_ENV, dtype)
    enc = minilm_encoder()
    texts = VARIED + [VARIED[0], "What is 12 plus 31?"]     # a duplicate, a near-duplicate
    base = enc.encode(texts)
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(len(texts))
        np.testing.assert_allclose(enc.encode([texts[i] for i in perm]), base[perm], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(base[0], base[len(VARIED)])   # duplicates: the same vector
    assert np.abs(base[0] - base[-1]).max() > 1e-3            # not the same row twice


def test_bfloat16_encoder_stays_close_to_float32(minilm):
    """The bfloat16 path (chosen on AMX CPUs; it runs, slower, on any CPU) keeps every vector
    within cosine 0.9995 of the float32 one (0.9999 on average; the empty text is the
    farthest), so float32 embeddings in a cache or a trained router stay valid; and it
    really computes in bfloat16 (not the same numbers)."""
    texts = VARIED + ["What is 12 plus 31?", "Translate 'good morning' into German."]
    f32 = MiniLMEncoder(minilm, dtype="float32").encode(texts)
    enc = MiniLMEncoder(minilm, dtype="bfloat16")
    assert enc.word.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in enc.layers[0][:4])
    bf16 = enc.encode(texts)
    assert bf16.dtype == np.float32 and np.allclose(np.linalg.norm(bf16, axis=1), 1, atol=1e-5)
    cos = (f32 * bf16).sum(1)
    assert cos.min() > 0.9995 and cos.mean() > 0.9999
    assert np.abs(f32 - bf16).max() > 1e-5


def test_bfloat16_encoder_prepacks_its_weights_and_gives_the_plain_path_s_vectors(minilm, monkeypatch):
    """Small bfloat16 calls run on weights prepacked in oneDNN's layout, large ones (and
    float32) on the plain weights; the vectors are those of the plain path."""
    enc = MiniLMEncoder(minilm, dtype="bfloat16")
    assert enc.packed is not None and len(enc.packed) == len(enc.layers)
    assert MiniLMEncoder(minilm, dtype="float32").packed is None
    calls = []
    real = featurize._packed_linear
    monkeypatch.setattr(featurize, "_packed_linear", lambda *a: calls.append(1) or real(*a))
    short = ["What is 12 plus 31?", "Translate 'good morning' into German.", ""]
    long = [" ".join(["photosynthesis"] * 60)]   # more rows than PACKED_MAX_ROWS in one call
    packed = enc.encode(short + long)
    assert len(calls) == 4 * len(enc.layers)   # one call for the short texts; not the long one
    plain = MiniLMEncoder(minilm, dtype="bfloat16")
    plain.packed = None
    expected = plain.encode(short + long)
    np.testing.assert_allclose(packed, expected, atol=2e-3)
    assert (packed * expected).sum(1).min() > 0.99999


def test_encoder_dtype_from_the_environment_or_the_cpu(monkeypatch):
    monkeypatch.setenv(featurize.DTYPE_ENV, "BFloat16 ")
    assert encoder_dtype() == "bfloat16"
    monkeypatch.setenv(featurize.DTYPE_ENV, "fp8")
    with pytest.raises(ValueError, match="SWITCHYARD_MINILM_DTYPE='fp8'"):
        encoder_dtype()
    monkeypatch.delenv(featurize.DTYPE_ENV)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert encoder_dtype() == "bfloat16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert encoder_dtype() == "float32"
    with pytest.raises(ValueError, match="dtype 'int8'"):
        MiniLMEncoder(minilm_model(), dtype="int8")


def test_shared_encoder_follows_the_dtype_setting(minilm, monkeypatch):
    monkeypatch.setenv(featurize.DTYPE_ENV, "float32")
    a = minilm_encoder()
    assert a.dtype == "float32" and minilm_encoder() is a          # built once per dtype
    assert a.word.data_ptr() == minilm[0].auto_model.embeddings.word_embeddings.weight.data_ptr()
    monkeypatch.setenv(featurize.DTYPE_ENV, "bfloat16")
    assert minilm_encoder().dtype == "bfloat16"


def test_fallback_encoder_uses_sentence_transformers(minilm):
    enc = MiniLMEncoder(minilm)
    enc.lean = False                                           # as for a model of another shape
    cut = [query_text(t) for t in VARIED[:4]]
    np.testing.assert_allclose(enc.encode(cut), minilm.encode(cut, normalize_embeddings=True),
                               rtol=0, atol=1e-6)


# ---- batching by length ----------------------------------------------------------------------------

def test_length_groups_keeps_short_items_away_from_long_ones():
    assert length_groups([12, 200, 10, 11]) == [[2, 3, 0], [1]]
    assert length_groups([30] * 5, max_items=2) == [[0, 1], [2, 3], [4]]
    assert length_groups([100] * 5, max_tokens=250) == [[0, 1], [2, 3], [4]]
    assert length_groups([300, 20], max_tokens=100) == [[1], [0]]   # too long alone: alone
    assert length_groups([]) == []
    # near lengths share a pass: padding 3 tokens is cheaper than a second forward pass
    assert length_groups([27, 30]) == [[0, 1]]


def work(groups, lengths, forward_cost=featurize.FORWARD_COST_TOKENS):
    return sum(forward_cost + len(g) * max(lengths[i] for i in g) for g in groups)


def set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in set_partitions(rest):
        yield [[first]] + part
        for i in range(len(part)):
            yield part[:i] + [[first] + part[i]] + part[i + 1:]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 256), min_size=0, max_size=6), st.integers(1, 6),
       st.integers(1, 1024))
def test_length_groups_is_a_partition_within_budget_and_optimal(lengths, max_items, max_tokens):
    groups = length_groups(lengths, max_items=max_items, max_tokens=max_tokens)
    assert sorted(itertools.chain.from_iterable(groups)) == list(range(len(lengths)))
    for g in groups:
        assert 1 <= len(g) <= max_items
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= max_tokens
    tops = [max(lengths[i] for i in g) for g in groups]
    assert tops == sorted(tops)                                   # shortest batch first
    feasible = [p for p in set_partitions(list(range(len(lengths))))
                if all(len(g) <= max_items and (len(g) == 1 or len(g) * max(lengths[i] for i in g)
                                                <= max_tokens) for g in p)]
    assert work(groups, lengths) == pytest.approx(min(work(p, lengths) for p in feasible))


def test_torch_threads_is_per_call_and_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    seen = []

    def other():
        with torch_threads(1):
            seen.append(torch.get_num_threads())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [1] and torch.get_num_threads() == before   # this thread untouched


# ---- the prompt tail ----------------------------------------------------------------------------

def test_query_text_keeps_the_tail_of_long_prompts():
    assert query_text("short") == "short"
    exact = "x" * MAX_CHARS
    assert query_text(exact) is exact
    long = "A" * 500 + "B" * (MAX_CHARS - 1) + "?"
    cut = query_text(long)
    assert len(cut) == MAX_CHARS and cut == "B" * (MAX_CHARS - 1) + "?"
    assert query_text("abcdef", max_chars=3) == "def"


def test_long_prompts_with_the_same_tail_share_an_embedding(minilm):
    tail = "Now answer: what is 3 plus 4? " * 40
    feat = CountingMiniLM(cache=EmbeddingCache())
    x = feat.transform(["first preamble " * 100 + tail, "another preamble " * 100 + tail])
    np.testing.assert_array_equal(x[0], x[1])
    assert feat.encoded == [[query_text(tail)]]


# ---- TF-IDF ------------------------------------------------------------------------------------------

CORPUS = ["what is two plus two", "what is three plus four", "write a poem about the sea",
          "write a poem about the moon", "compute seven times eight", "compute nine times six",
          "a poem about rain and the sea"]


def test_tfidf_round_trip_gives_identical_sparse_rows(tmp_path):
    fitted = TfidfFeaturizer(min_df=1).fit(CORPUS)
    state, arrays = fitted.state()
    save_file(arrays, str(tmp_path / "a.safetensors"))
    state = json.loads(json.dumps(state))
    loaded = TfidfFeaturizer.from_state(state, load_file(str(tmp_path / "a.safetensors")))
    queries = CORPUS + ["what is a poem about seven", "entirely unknown words", ""]
    a, b = fitted.transform(queries), loaded.transform(queries)
    assert a.shape == b.shape and a.dtype == b.dtype
    a, b = a.tocsr(), b.tocsr()
    a.sort_indices()
    b.sort_indices()
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(loaded.feature_names(), fitted.feature_names())


def test_tfidf_reads_the_tail_and_uses_bigrams():
    feat = TfidfFeaturizer(min_df=1).fit(CORPUS)
    assert "poem about" in set(feat.feature_names())
    long = "zebra " * 400 + "what is two plus two"
    np.testing.assert_array_equal(feat.transform([long]).toarray(),
                                  feat.transform([query_text(long)]).toarray())


def test_tfidf_min_df_drops_rare_terms_unless_the_corpus_is_tiny():
    feat = TfidfFeaturizer(min_df=2).fit(CORPUS)
    names = set(feat.feature_names())
    assert "poem" in names and "zebra" not in names and "moon" not in names   # moon: once
    tiny = TfidfFeaturizer(min_df=2).fit(CORPUS[:3])      # fewer than 2 * min_df texts
    assert "sea" in set(tiny.feature_names())


def test_tfidf_unfitted_and_unknown_featurizer():
    with pytest.raises(RuntimeError, match="not fitted"):
        TfidfFeaturizer().transform(["x"])
    with pytest.raises(ValueError, match="unknown featurizer 'bert'"):
        make_featurizer("bert")
    assert isinstance(make_featurizer("tfidf"), TfidfFeaturizer)
    cache = EmbeddingCache()
    assert make_featurizer("minilm", cache=cache).cache is cache


def test_cache_bookkeeping_is_linear_in_the_number_of_new_texts():
    """20,000 unseen texts: the bookkeeping around the model call must take well under a
    second (a set rebuilt per text once made it quadratic: ~10 s here). The model itself is
    not under test, so its call returns fixed vectors."""
    import time

    class NoModel(MiniLMFeaturizer):
        def _encode(self, texts):
            return np.ones((len(texts), EMBED_DIM), np.float32)

    texts = [f"prompt number {i}" for i in range(20_000)]
    start = time.perf_counter()
    x = NoModel(cache=EmbeddingCache()).transform(texts)
    assert x.shape == (20_000, EMBED_DIM)
    assert time.perf_counter() - start < 2.0


def test_loading_minilm_draws_no_progress_bar_and_leaves_bars_on():
    import subprocess
    import sys

    code = ("from transformers.utils import logging as hf; from router_models.featurize import minilm_model; "
            "minilm_model(); print(hf.is_progress_bar_enabled())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert proc.stdout.strip() == "True" and "Loading weights" not in proc.stderr
