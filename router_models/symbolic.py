"""The symbolic router (after Symbolic-MoE): route by the skills a query needs and each
expert's logged competence on those skills.

1. Skills (``router_models.skills``): a vocabulary of ``S`` named keyphrase clusters is
   learned from the training prompts. A query's skills come either zero-shot (its top
   ``k`` skills by MiniLM cosine, softmax weights with temperature ``T``; ``k`` at most
   ``S / 4``) or from skill words an LLM listed (``skill_words``; each word counts
   ``1 / n_words`` for its nearest skill among those with evidence >= 1 for some expert).
2. Profiles: with ``w[i, s]`` the training prompts' skill weights (zero-shot path) and
   ``y[i, j]`` the logged scores (NaN skipped), per skill ``s`` and expert ``j``::

       profile[s, j]  = (sum_i w[i, s] * y[i, j] + alpha * g[j]) / (evidence[s, j] + alpha)
       evidence[s, j] = sum_i w[i, s] * [y[i, j] logged]
       g[j]           = mean logged score of expert j   (its global competence)

   so a rarely seen skill stays near the expert's global competence.
3. Recruiting: ``q[j] = sum_s w_q[s] * profile[s, j]`` (``w_q`` sums to 1, so ``q`` is in
   0..1 for the cost-aware policy); :meth:`SymbolicRouter.recruit` gives the top-k.

``n_skills``, ``alpha`` and ``temperature`` (``skills_per_query`` too, if ``GRID`` lists
more than one) are chosen by k-fold cross-validation by prompt (out-of-fold AIQ, like the
classifier router; ``cv=0`` or ``1`` keeps the constructor's values). Prompts and phrases
are embedded once; the grid only re-clusters, re-keys and re-counts.

``save(dir)`` also writes ``profiles.json``, which a person may read and edit::

    {"format": "switchyard-skill-profiles/1",
     "experts": ["expert-a", ...],
     "global_competence": {"expert-a": 0.61, ...},
     "hyper_parameters": {"n_skills": 1024, "alpha": 1.0, ...},
     "skills": [{"id": 0, "name": "write function",
                 "phrases": ["write function", "python function", ...],
                 "scores": {"expert-a": 0.71, ...},      # profile[s, j], what routing uses
                 "evidence": {"expert-a": 12.3, ...}},   # weighted count of logged prompts
                ...]}

On ``load_router`` its values win over ``router.json``: an edited score changes the
predictions; a renamed skill is re-embedded from its new name, so skill words are matched
against the new name (the zero-shot path keeps the skill's key, learned from prompts);
an edited evidence decides which skills skill words may reach. ``global_competence`` and
``phrases`` are for reading: nothing is re-shrunk. A malformed or inconsistent file
(bad JSON, unknown or missing expert, missing skill, a score that is not a number in
0..1) raises ``ValueError`` naming the file (``ArtifactError`` from ``load_router``); a
missing file leaves the ``router.json`` state.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from router_models.base import Router
from router_models.classifier import _fold_ids, cv_rank
from router_models.featurize import QUERY_PIECES, QueryCut
from router_models.logs import BenchmarkLogs
from router_models.metrics import evaluate_router, reference_points
from router_models.skills import (
    SkillVocabulary,
    cluster_phrases,
    extract_keyphrases,
    fallback_vocabulary,
    parse_skill_list,
    profiles_document,
    read_profiles,
    skill_keys,
    skill_profiles,
    skill_prompt,
    skill_weights,
)

__all__ = ["SymbolicRouter", "skill_profiles", "skill_prompt", "parse_skill_list", "GRID",
           "PROFILES_FILE"]

log = logging.getLogger(__name__)

PROFILES_FILE = "profiles.json"
# Few points on purpose: choosing among many by a noisy out-of-fold AIQ overfits the folds.
GRID: dict[str, tuple] = {"n_skills": (256, 1024), "alpha": (0.3, 1.0, 3.0),
                          "skills_per_query": (16,), "temperature": (0.1, 0.3)}
DIGITS = 6  # profiles are rounded so profiles.json is readable and reads back exactly


def _per_query(k: int, n_skills: int) -> int:
    """Skills per query, at most a quarter of the vocabulary: on small logs a top-16 of 36
    skills would spread every query over unrelated topics."""
    return max(1, min(int(k), math.ceil(n_skills / 4)))


class SymbolicRouter(QueryCut, Router):
    name = "symbolic"
    accepts_skill_words: ClassVar[bool] = True  # predict_quality/explain/recruit(skill_words=)

    def __init__(self, n_skills: int = 1024, alpha: float = 1.0, skills_per_query: int = 16,
                 temperature: float = 0.2, cv: int = 5, seed: int = 0,
                 phrases_per_prompt: int = 5, max_phrases: int = 3000,
                 query_pieces: int = QUERY_PIECES, query_keep: str = "tail"):
        self.n_skills = n_skills
        self.alpha = alpha
        self.skills_per_query = skills_per_query
        self.temperature = temperature
        self.cv = cv
        self.seed = seed
        self.phrases_per_prompt = phrases_per_prompt
        self.max_phrases = max_phrases
        self.query_pieces = query_pieces
        self.query_keep = query_keep

    # ---- fitting ---------------------------------------------------------------------
    def _check_params(self) -> None:
        checks = {"n_skills": self.n_skills >= 1, "alpha": self.alpha >= 0,
                  "skills_per_query": self.skills_per_query >= 1,
                  "temperature": self.temperature > 0, "max_phrases": self.max_phrases >= 1,
                  "phrases_per_prompt": self.phrases_per_prompt >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"bad hyper-parameter {bad[0]}={getattr(self, bad[0])!r}: "
                             "n_skills, skills_per_query, max_phrases, phrases_per_prompt "
                             "must be >= 1, alpha >= 0, temperature > 0")

    def _fit(self, logs: BenchmarkLogs) -> None:
        self._check_params()
        self.featurizer_ = self._minilm(progress=logs.n_prompts > 1000)
        X = self.featurizer_.transform(logs.prompts)
        Y = np.asarray(logs.scores, dtype=float)
        phrases, picks, membership = extract_keyphrases(
            logs.prompts, self.phrases_per_prompt, self.max_phrases)
        P = self.featurizer_.transform(phrases) if phrases else None
        cap = max(1, min(len(phrases), logs.n_prompts))  # never more skills than phrases

        def vocabulary(n_skills: int) -> SkillVocabulary:
            if P is None:
                return fallback_vocabulary(X)
            return cluster_phrases(phrases, picks, P, membership, X, n_skills, self.seed)

        chosen = {"n_skills": self.n_skills, "alpha": self.alpha,
                  "skills_per_query": self.skills_per_query, "temperature": self.temperature}
        self.cv_results_: list[dict] = []
        vocabs: dict[int, SkillVocabulary] = {}
        if self.cv >= 2 and logs.n_prompts >= 2 * self.cv and cap > 1:
            c_hat = self._training_costs(logs, X)
            sizes = sorted({min(s, cap) for s in GRID["n_skills"]})
            self.cv_results_ = self._cross_validate(X, Y, logs.costs, c_hat, sizes,
                                                    vocabulary, vocabs)
            best = max(self.cv_results_, key=cv_rank)
            chosen = dict(best["params"])
        vocab = vocabs.get(chosen["n_skills"]) or vocabulary(min(chosen["n_skills"], cap))
        chosen["n_skills"] = vocab.size
        chosen["skills_per_query"] = _per_query(chosen["skills_per_query"], vocab.size)
        self.params_ = chosen
        self.vocab_ = SkillVocabulary(vocab.names, vocab.phrases, vocab.emb, vocab.key)
        W = skill_weights(X @ vocab.key.T, chosen["skills_per_query"], chosen["temperature"])
        profile, evidence, g = skill_profiles(W, Y, chosen["alpha"])
        self.profile_ = np.round(profile, DIGITS)
        self.evidence_ = np.round(evidence, DIGITS)
        self.competence_ = np.round(g, DIGITS)
        log.info("symbolic: %d skills from %d phrases, params %s", vocab.size, len(phrases),
                 chosen)

    def _cross_validate(self, X, Y, costs, c_hat, sizes, vocabulary, vocabs) -> list[dict]:
        """Out-of-fold AIQ and Brier score of every grid point (one row each); fills
        ``vocabs`` (by size) with the vocabularies it built. Phrase clusters come from every
        prompt's text (no scores); skill keys and profiles are fitted per fold, so a
        held-out prompt is never part of the key it is matched against."""
        from tqdm import tqdm

        n = Y.shape[0]
        folds = _fold_ids(n, self.cv, self.seed)
        full = ~np.isnan(Y).any(axis=1) & ~np.isnan(costs).any(axis=1)
        ref = reference_points(Y[full], costs[full]) if full.any() else None
        rows = []
        for size in tqdm(sizes, desc="symbolic cv", unit="vocabulary", disable=n <= 1000):
            vocab = vocabulary(size)
            size = vocab.size
            if size in vocabs:  # a smaller log gave the same vocabulary twice
                continue
            vocabs[size] = vocab
            ks = sorted({_per_query(k, size) for k in GRID["skills_per_query"]})
            grid = list(itertools.product(ks, GRID["temperature"], GRID["alpha"]))
            oof = {p: np.zeros_like(Y) for p in grid}
            for f in range(self.cv):
                tr, te = folds != f, folds == f
                sims = X @ skill_keys(vocab.mass[tr], X[tr], vocab.emb).T
                for k, t in itertools.product(ks, GRID["temperature"]):
                    W = skill_weights(sims, k, t)
                    for a in GRID["alpha"]:
                        oof[k, t, a][te] = W[te] @ skill_profiles(W[tr], Y[tr], a)[0]
            for (k, t, a), q in oof.items():
                q = np.clip(q, 0.0, 1.0)
                aiq = (evaluate_router("cv", Y[full], costs[full], q[full], c_hat[full],
                                       ref=ref).aiq if ref is not None else math.nan)
                brier = float(np.mean((q - Y)[~np.isnan(Y)] ** 2))
                rows.append({"params": {"n_skills": size, "alpha": a, "skills_per_query": k,
                                        "temperature": t}, "aiq": float(aiq), "brier": brier})
        return rows

    # ---- skills of a query --------------------------------------------------------------
    def query_skills(self, queries: list[str], skill_words: list | None = None
                      ) -> tuple[np.ndarray, list[str], list[dict[str, str]]]:
        """``(W [n, S], sources, word_skills)``: each query's skill weights (rows sum to 1),
        ``"zero-shot"`` or ``"llm"`` per query, and for the LLM path each word's skill."""
        self._check_fitted()
        queries = list(queries)
        if skill_words is not None and len(skill_words) != len(queries):
            raise ValueError(f"skill_words has {len(skill_words)} entries for "
                             f"{len(queries)} queries")
        n = len(queries)
        words = [[w for w in dict.fromkeys(" ".join(str(x).split()).lower() for x in ws) if w]
                 if ws else [] for ws in (skill_words or [None] * n)]
        W = np.zeros((n, self.vocab_.size))
        zero = [i for i in range(n) if not words[i]]  # no usable words: zero-shot skills
        if zero:
            X = self.featurizer_.transform([queries[i] for i in zero])
            W[zero] = skill_weights(X @ self.vocab_.key.T, self.params_["skills_per_query"],
                                    self.params_["temperature"])
        sources, word_skills = ["zero-shot"] * n, [{} for _ in range(n)]
        vocab = sorted({w for ws in words for w in ws})
        if vocab:  # each word counts for its nearest skill with evidence (phrase centroids)
            sims = self.featurizer_.transform(vocab) @ self.vocab_.emb.T
            sims[:, ~self._evidenced()] = -np.inf
            nearest = dict(zip(vocab, np.argmax(sims, axis=1).tolist()))
            for i in (i for i in range(n) if words[i]):
                skills = [nearest[w] for w in words[i]]
                W[i] = np.bincount(skills, minlength=self.vocab_.size) / len(skills)
                sources[i] = "llm"
                word_skills[i] = {w: self.vocab_.names[s] for w, s in zip(words[i], skills)}
        return W, sources, word_skills

    def _evidenced(self) -> np.ndarray:
        """[S] skills that skill words may map to: those with the evidence of at least one
        logged prompt for some expert (else any evidence; else all). A skill no training
        prompt showed only repeats the global competence."""
        total = self.evidence_.max(axis=1) if self.evidence_.size else np.zeros(0)
        for floor in (1.0, 1e-9):
            if (total >= floor).any():
                return total >= floor
        return np.ones(self.vocab_.size, dtype=bool)

    def _predict(self, queries: list[str]) -> np.ndarray:
        return self.query_skills(queries)[0] @ self.profile_

    def predict_quality(self, queries: list[str], skill_words: list | None = None
                        ) -> np.ndarray:
        """[n, m] predicted quality; ``skill_words[i]`` (a list of words, or None for the
        zero-shot skills) gives query ``i``'s skills from outside, e.g. from an LLM."""
        if skill_words is None:
            return super().predict_quality(queries)
        self._check_fitted()
        if not queries:
            return np.zeros((0, len(self.experts_)))
        return np.clip(self.query_skills(queries, skill_words)[0] @ self.profile_, 0.0, 1.0)

    def recruit(self, query: str, k: int, skill_words: list[str] | None = None
                ) -> list[tuple[str, float]]:
        """The ``k`` experts with the highest predicted quality on ``query``, best first
        (ties in ``experts_`` order): ``[(expert, quality), ...]``."""
        q = self.predict_quality([query], None if skill_words is None else [skill_words])[0]
        order = np.argsort(-q, kind="stable")[:max(0, int(k))]
        return [(self.experts_[j], float(q[j])) for j in order]

    # ---- explain ------------------------------------------------------------------------
    def explain(self, query: str, skill_words: list[str] | None = None) -> dict[str, Any]:
        """The base explain plus the query's skills (name, weight, source ``"zero-shot"``
        or ``"llm"``), each expert's profile score and evidence on them, the global
        competence and the hyper-parameters; ``skill_words`` as in ``predict_quality``."""
        out = super().explain(query)
        if skill_words is None:
            return out
        q = self.predict_quality([query], [skill_words])[0]
        for j, e in enumerate(self.experts_):
            out["experts"][e]["quality"] = round(float(q[j]), 4)
        out.update(self._explain_skills(query, skill_words))
        return out

    def _explain(self, query: str) -> dict[str, Any]:
        return self._explain_skills(query, None)

    def _explain_skills(self, query: str, skill_words: list[str] | None) -> dict[str, Any]:
        W, sources, word_skills = self.query_skills(
            [query], None if skill_words is None else [skill_words])
        found = [s for s in np.argsort(-W[0], kind="stable") if W[0, s] > 0]
        out: dict[str, Any] = {
            "skills": [{"skill": int(s), "name": self.vocab_.names[s],
                        "weight": round(float(W[0, s]), 4), "source": sources[0]}
                       for s in found],
            "profiles": {e: [{"skill": self.vocab_.names[s],
                              "score": float(self.profile_[s, j]),
                              "evidence": float(self.evidence_[s, j])} for s in found]
                         for j, e in enumerate(self.experts_)},
            "global_competence": dict(zip(self.experts_, map(float, self.competence_))),
            "hyper_parameters": dict(self.params_),
            "chosen_by": "cross-validation" if self.cv_results_ else "defaults",
        }
        aiqs = [r["aiq"] for r in self.cv_results_ if math.isfinite(r["aiq"])]
        if aiqs:
            out["cv_aiq"] = max(aiqs)
        if word_skills[0]:
            out["skill_words"] = word_skills[0]
        return out

    # ---- persistence --------------------------------------------------------------------
    def _state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return ({"names": self.vocab_.names, "phrases": self.vocab_.phrases,
                 "params": self.params_, "cv_results": self.cv_results_,
                 "featurizer": self.featurizer_.state()[0]},
                {"skill_emb": self.vocab_.emb, "skill_key": self.vocab_.key,
                 "profile": self.profile_, "evidence": self.evidence_,
                 "competence": self.competence_})

    def _restore(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        self.featurizer_ = self._minilm_from_state(state.get("featurizer"))
        self.vocab_ = SkillVocabulary(list(state["names"]), [list(p) for p in state["phrases"]],
                                      arrays["skill_emb"], arrays["skill_key"])
        self.params_ = dict(state["params"])
        self.cv_results_ = list(state["cv_results"])
        self.profile_ = arrays["profile"].astype(float)
        self.evidence_ = arrays["evidence"].astype(float)
        self.competence_ = arrays["competence"].astype(float)
        S, m = self.vocab_.size, len(self.experts_)
        if self.profile_.shape != (S, m) or self.vocab_.emb.shape[0] != S:
            raise ValueError(f"profile has shape {self.profile_.shape}, expected {(S, m)}")

    def _write_files(self, directory: Path) -> None:
        doc = profiles_document(self.experts_, self.vocab_, self.profile_, self.evidence_,
                                self.competence_, self.params_)
        (directory / PROFILES_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False))

    def _read_files(self, directory: Path) -> None:
        path = directory / PROFILES_FILE
        if not path.is_file():
            return
        names, profile, evidence, competence = read_profiles(
            path, self.experts_, self.vocab_.size)
        renamed = [s for s, (old, new) in enumerate(zip(self.vocab_.names, names)) if old != new]
        if renamed:  # the user redefined these skills: words now match the new names
            emb = np.array(self.vocab_.emb, dtype=np.float32, copy=True)
            emb[renamed] = self.featurizer_.transform([names[s] for s in renamed])
            self.vocab_ = SkillVocabulary(names, self.vocab_.phrases, emb, self.vocab_.key)
        self.profile_, self.evidence_, self.competence_ = profile, evidence, competence

