"""Skills for the symbolic router: the learned skill vocabulary, skill words from an LLM,
and the per-expert skill profiles with their editable file.

A *skill* is a cluster of short keyphrases taken from the training prompts, with a
readable name (the member phrase nearest the cluster's centroid) and two unit vectors in
MiniLM space:

- ``emb [S, 384]``: the centroid of its phrases' embeddings; skill *words* (from an LLM,
  or a user) are matched against it.
- ``key [S, 384]``: the mean embedding of the training prompts whose top keyphrases fall
  in the skill, weighted by their TF-IDF; whole *queries* are matched against it (a
  prompt looks like prompts, not like a two-word phrase: keys route better than
  centroids on RouterBench and LLMRouter).

Building it: :func:`extract_keyphrases` (TF-IDF over 1-3-grams, English stop words and
numbers left out) picks each prompt's top ``per_prompt`` phrases; phrases picked for at
least two prompts are embedded with MiniLM and :func:`cluster_phrases` groups them with
seeded, pick-weighted KMeans. No list is written by hand per benchmark.

A query's skills (:func:`skill_weights`): the top ``k`` skills by cosine, weighted by a
softmax of the similarities with a temperature ``T``:
``w_s = exp(sim_s / T) / sum_{s' in top k} exp(sim_s' / T)``.

The LLM path is pure text handling here (routers never talk HTTP): :func:`skill_prompt`
builds the chat messages that ask an expert for 2-5 skill keywords and
:func:`parse_skill_list` reads its reply.

Profiles: :func:`skill_profiles` (the formula is in ``router_models.symbolic``);
:func:`profiles_document` / :func:`read_profiles` write and check ``profiles.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router_models.featurize import query_text

log = logging.getLogger(__name__)

PROFILES_FORMAT = "switchyard-skill-profiles/1"
MAX_SKILL_WORDS = 5
MAX_SKILL_CHARS = 40
_TOKENS = r"(?u)\b[^\W\d_]{2,}\b"  # words of 2+ letters: numbers are not skills
_ITEM_CHARS = set(" -+#/&.'")       # besides letters and digits: c++, c#, node.js, i/o
_EDGE = " \t\"'`*_•·–—-[](){}<>.;!?"  # bullets, quotes, brackets, punctuation at an edge
# the stems tokenising "didn't", "it's", "we'll" leaves behind; not English stop words to sklearn
_CONTRACTIONS = ("didn", "doesn", "don", "isn", "wasn", "aren", "weren", "won", "wouldn",
                 "couldn", "shouldn", "hasn", "haven", "hadn", "ll", "ve", "re")
_NOT_SKILLS = frozenset({"none", "null", "n/a", "na", "unknown", "nothing", "skill", "skills"})
_NUMBERING = re.compile(r"^(?:\(?\d{1,2}[.):]|[a-z][.)])\s+")


@dataclass
class SkillVocabulary:
    """``names[s]``; ``phrases[s]``: its most picked member phrases; ``emb``/``key``:
    [S, 384] unit rows (see the module docstring). ``mass`` [n_prompts, S], the training
    prompts' TF-IDF mass per skill, exists only while fitting (it is not saved)."""

    names: list[str]
    phrases: list[list[str]]
    emb: np.ndarray
    key: np.ndarray
    mass: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.names)


def _normalise(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def extract_keyphrases(prompts: list[str], per_prompt: int = 5, max_phrases: int = 3000):
    """Candidate skill phrases: each prompt's top ``per_prompt`` TF-IDF 1-3-grams.

    Returns ``(phrases, picks, membership)``: phrases picked for at least ``min_picks``
    prompts (2, or 1 for fewer than 20 prompts), most picked first (at most
    ``max_phrases``); ``picks[p]`` how many prompts picked phrase ``p``; ``membership``
    a sparse [n_prompts, n_phrases] matrix of the picked phrases' TF-IDF weights.
    Prompts with no usable words give no phrases (empty lists, shape [n, 0]).
    """
    from scipy import sparse
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, TfidfVectorizer

    docs = [query_text(p) for p in prompts]
    big = len(docs) >= 20
    tfidf, stop_words = None, sorted(ENGLISH_STOP_WORDS.union(_CONTRACTIONS))
    for min_df in (2, 1) if big else (1,):
        vec = TfidfVectorizer(ngram_range=(1, 3), stop_words=stop_words, token_pattern=_TOKENS,
                              min_df=min_df, sublinear_tf=True, dtype=np.float64)
        try:
            tfidf, vocab = vec.fit_transform(docs).tocsr(), vec.get_feature_names_out()
            break
        except ValueError:  # no word survives (tiny or numeric logs): try looser
            continue
    if tfidf is None:
        return [], np.zeros(0), sparse.csr_matrix((len(docs), 0))
    picks: Counter = Counter()
    top_of = []
    for i in range(tfidf.shape[0]):
        lo, hi = tfidf.indptr[i], tfidf.indptr[i + 1]
        order = np.argsort(-tfidf.data[lo:hi], kind="stable")[:per_prompt]
        top_of.append((tfidf.indices[lo:hi][order], tfidf.data[lo:hi][order]))
        picks.update(tfidf.indices[lo:hi][order].tolist())
    min_picks = 2 if big else 1
    kept = sorted((t for t, c in picks.items() if c >= min_picks),
                  key=lambda t: (-picks[t], vocab[t]))[:max_phrases]
    col = {t: c for c, t in enumerate(kept)}
    rows, cols, vals = [], [], []
    for i, (terms, weights) in enumerate(top_of):
        for t, w in zip(terms.tolist(), weights.tolist()):
            if t in col:
                rows.append(i), cols.append(col[t]), vals.append(w)
    membership = sparse.csr_matrix((vals, (rows, cols)), shape=(len(docs), len(kept)))
    return [str(vocab[t]) for t in kept], np.array([picks[t] for t in kept], float), membership


def _kmeans_pp(X: np.ndarray, weight: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ seeding (one candidate per step) of weighted unit rows: [<=k, d] centres.
    Ours because scikit-learn's (several candidates per step) took ~30 s for 1,000 skills;
    fewer than ``k`` come back when the rows have fewer distinct points."""
    rng = np.random.default_rng(seed)
    X = np.asarray(X, dtype=np.float64)
    first = rng.choice(len(X), p=weight / weight.sum())
    chosen, d2 = [first], np.maximum(2.0 - 2.0 * (X @ X[first]), 0.0)
    for _ in range(1, k):
        p = weight * d2
        if p.sum() <= 1e-12:
            break
        nxt = rng.choice(len(X), p=p / p.sum())
        chosen.append(nxt)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (X @ X[nxt]), 0.0))
    return X[chosen]


def cluster_phrases(phrases: list[str], picks: np.ndarray, phrase_emb: np.ndarray,
                    membership, prompt_emb: np.ndarray, n_skills: int,
                    seed: int = 0) -> SkillVocabulary:
    """KMeans (seeded, weighted by picks) of the phrase embeddings into at most
    ``n_skills`` skills; empty clusters are dropped. See the module docstring for
    ``names``, ``emb`` and ``key``."""
    from sklearn.cluster import KMeans

    n_clusters = max(1, min(n_skills, len(phrases)))
    if n_clusters == len(phrases):
        labels, centres = np.arange(len(phrases)), phrase_emb.astype(float)
    else:
        init = _kmeans_pp(phrase_emb, picks, n_clusters, seed)
        km = KMeans(n_clusters=len(init), init=init, n_init=1, random_state=seed)
        labels = km.fit_predict(phrase_emb, sample_weight=picks)
        centres = km.cluster_centers_
    used = np.unique(labels)
    labels = np.searchsorted(used, labels)
    emb = _normalise(centres[used])
    onehot = np.zeros((len(phrases), used.size))
    onehot[np.arange(len(phrases)), labels] = 1.0
    mass = np.asarray((membership @ onehot))        # [n_prompts, S] TF-IDF mass per skill
    names, members = [], []
    for s in range(used.size):
        idx = np.flatnonzero(labels == s)
        names.append(phrases[idx[np.argmax(phrase_emb[idx] @ emb[s])]])
        members.append([phrases[i] for i in idx[np.argsort(-picks[idx], kind="stable")][:8]])
    emb = emb.astype(np.float32)
    return SkillVocabulary(names, members, emb, skill_keys(mass, prompt_emb, emb), mass)


def skill_keys(mass: np.ndarray, prompt_emb: np.ndarray, emb: np.ndarray) -> np.ndarray:
    """[S, 384] unit keys: the ``mass``-weighted mean of the prompts' embeddings per skill;
    a skill no prompt shows keeps its phrase centroid ``emb``."""
    key = mass.T @ prompt_emb
    key = np.where(mass.sum(axis=0)[:, None] > 0, key, emb)
    return _normalise(key).astype(np.float32)


def fallback_vocabulary(prompt_emb: np.ndarray) -> SkillVocabulary:
    """One skill, "general", for logs with no usable words: every query has it."""
    mass = np.ones((len(prompt_emb), 1))
    centre = _normalise(prompt_emb.mean(axis=0, keepdims=True) + 1e-6).astype(np.float32)
    return SkillVocabulary(["general"], [["general"]], centre, centre.copy(), mass)


def skill_weights(sims: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """[n, S] weights from [n, S] similarities: softmax over each row's top ``k`` with
    temperature ``temperature``, zero elsewhere; rows sum to 1."""
    sims = np.asarray(sims, dtype=np.float64)
    k = max(1, min(int(k), sims.shape[1]))
    if k < sims.shape[1]:
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    else:
        idx = np.broadcast_to(np.arange(k), sims.shape)
    top = np.take_along_axis(sims, idx, axis=1)
    w = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
    out = np.zeros_like(sims)
    np.put_along_axis(out, idx, w / w.sum(axis=1, keepdims=True), axis=1)
    return out


# ---- the LLM path: asking an expert for skill words, reading its answer -----------------

def skill_prompt(query: str) -> list[dict]:
    """OpenAI chat messages asking a model for the 2-5 skills ``query`` needs."""
    return [
        {"role": "system",
         "content": "You label which skills a question needs. Reply with 2 to 5 short skill "
                    "keywords (one to three words each), comma-separated, lowercase, and "
                    "nothing else."},
        {"role": "user",
         "content": f"Question:\n{query_text(str(query))}\n\nSkills needed:"},
    ]


def _clean_item(item: str) -> str:
    item = " ".join(item.split()).strip(_EDGE)
    item = _NUMBERING.sub("", item.lower()).strip(_EDGE)
    item = item.strip(_EDGE).strip()
    if item in _NOT_SKILLS or len(item) > MAX_SKILL_CHARS or len(item.split()) > 4:
        return ""
    if not any(c.isalpha() for c in item):
        return ""
    if not all(c.isalnum() or c in _ITEM_CHARS for c in item):
        return ""  # a sentence, code or markup, not a keyword
    return item


def parse_skill_list(text: object) -> list[str]:
    """Skill keywords from a model's reply: split on commas, semicolons and lines; a
    ``Skills:``-style label, bullets, numbering, quotes and brackets dropped; lowercased,
    de-duplicated, at most 5. Items over 40 characters or 4 words, or with characters a
    keyword does not have, are dropped. Anything unusable gives ``[]``; never raises."""
    if not isinstance(text, str):
        return []
    out: list[str] = []
    for line in text.splitlines():
        if ":" in line:
            line = line.split(":", 1)[1]  # "Skills: a, b" or "1: a" -> after the label
        for raw in re.split(r"[,;|]", line):
            item = _clean_item(raw)
            if item and item not in out:
                out.append(item)
            if len(out) == MAX_SKILL_WORDS:
                return out
    return out


# ---- profiles ----------------------------------------------------------------------------

def skill_profiles(W: np.ndarray, Y: np.ndarray, alpha: float
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(profile [S, m], evidence [S, m], g [m])`` from prompt skill weights ``W [n, S]``
    and scores ``Y [n, m]`` (NaN = not logged); the formula is in ``router_models.symbolic``.
    An expert with no logged score has ``g = 0``."""
    have = ~np.isnan(Y)
    Y0 = np.where(have, Y, 0.0)
    g = Y0.sum(axis=0) / np.maximum(have.sum(axis=0), 1)
    evidence = W.T @ have.astype(float)
    den = evidence + alpha
    with np.errstate(invalid="ignore", divide="ignore"):
        profile = np.where(den > 0, (W.T @ Y0 + alpha * g) / den, g[None, :])
    return profile, evidence, g


def profiles_document(experts: list[str], vocab: SkillVocabulary, profile: np.ndarray,
                      evidence: np.ndarray, competence: np.ndarray, params: dict) -> dict:
    """The ``profiles.json`` document (its layout is in ``router_models.symbolic``)."""
    def per_expert(row: np.ndarray) -> dict[str, float]:
        return {e: float(v) for e, v in zip(experts, row)}

    return {
        "format": PROFILES_FORMAT,
        "about": "Per skill, each expert's score (0..1) is what routing uses: edit it to change "
                 "routing. Renaming a skill re-embeds it from its new name (for skill words). "
                 "evidence (weighted count of logged prompts) decides which skills skill words "
                 "may reach (>= 1); phrases and global_competence are for reading.",
        "experts": list(experts),
        "global_competence": per_expert(competence),
        "hyper_parameters": dict(params),
        "skills": [{"id": s, "name": vocab.names[s], "phrases": vocab.phrases[s],
                    "scores": per_expert(profile[s]), "evidence": per_expert(evidence[s])}
                   for s in range(vocab.size)],
    }


def _numbers(path: Path, where: str, value: Any, experts: list[str], upper: float | None
             ) -> np.ndarray:
    """One ``{expert: number}`` mapping as an array in ``experts`` order, checked."""
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {where} must be an object mapping expert to number")
    unknown = sorted(set(value) - set(experts))
    missing = [e for e in experts if e not in value]
    if unknown or missing:
        raise ValueError(f"{path}: {where}: unknown expert(s) {unknown}, missing {missing}")
    out = []
    for e in experts:
        v = value[e]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{path}: {where}[{e!r}] is not a number: {v!r}")
        if v < 0 or (upper is not None and v > upper):
            bound = f"0..{upper:g}" if upper is not None else ">= 0"
            raise ValueError(f"{path}: {where}[{e!r}] = {v!r} is out of range {bound}")
        out.append(float(v))
    return np.array(out, dtype=float)


def read_profiles(path: Path, experts: list[str], n_skills: int
                  ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(names, profile, evidence, competence)`` from an edited ``profiles.json``;
    ``ValueError`` naming ``path`` and the problem if it does not fit this router."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object")
    listed = doc.get("experts")
    if listed != list(experts):
        unknown = sorted(set(map(str, listed)) - set(experts)) if isinstance(listed, list) else []
        raise ValueError(f"{path}: experts {listed!r} are not this router's {list(experts)}"
                         + (f" (unknown expert(s) {unknown})" if unknown else ""))
    competence = _numbers(path, "global_competence", doc.get("global_competence"), experts, 1.0)
    skills = doc.get("skills")
    if not isinstance(skills, list):
        raise ValueError(f"{path}: skills must be a list")
    by_id = {s["id"]: s for s in skills if isinstance(s, dict) and type(s.get("id")) is int}
    if len(by_id) != len(skills) or set(by_id) != set(range(n_skills)):
        missing = sorted(set(range(n_skills)) - set(by_id))
        raise ValueError(f"{path}: skills must be {n_skills} objects with ids 0..{n_skills - 1}"
                         f" (missing skill(s) {missing}, got {len(skills)} entries)")
    names, profile, evidence = [], [], []
    for s in range(n_skills):
        skill = by_id[s]
        name = skill.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: skill {s} needs a non-empty name, got {name!r}")
        names.append(" ".join(name.split()))
        profile.append(_numbers(path, f"skill {s} scores", skill.get("scores"), experts, 1.0))
        evidence.append(_numbers(path, f"skill {s} evidence", skill.get("evidence"), experts,
                                 None))
    return names, np.array(profile), np.array(evidence), competence
