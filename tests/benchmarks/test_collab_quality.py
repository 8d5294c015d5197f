"""The collaboration-quality benchmark's own arithmetic, on hand-made answers.

The run itself needs the built fleet and trained heads (``python
benchmarks/collab_quality.py --data-dir DIR``); these tests pin how it scores routing and
the perfect domain router off the single experts' answers, how it compares each
collaboration system with routing prompt by prompt, and the goal rows it prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import collab_quality as cq  # noqa: E402

MEMBERS = ["smollm2-135m", "smollm2-math", "smollm2-code", "smollm2-json"]


def test_paired_counts_wins_and_losses_and_brackets_the_mean_difference():
    a = [1, 1, 1, 0, 1, 0.5, 1, 1]
    b = [0, 1, 1, 1, 0, 0.5, 0, 1]
    c = cq.paired(a, b)
    assert (c["wins"], c["losses"], c["ties"]) == (3, 1, 4)
    assert c["mean"] == pytest.approx(2 / 8)
    lo, hi = c["ci95"]
    assert lo <= c["mean"] <= hi and lo < hi
    assert c["sign_p"] == pytest.approx(0.625)          # 3 of 4 differing prompts, two-sided
    assert cq.paired(a, b) == c                          # seeded: the same interval every run
    same = cq.paired(a, a)
    assert same["ci95"] == [0.0, 0.0] and same["sign_p"] == 1.0 and same["ties"] == len(a)


def test_paired_rejects_lists_that_do_not_pair():
    with pytest.raises(ValueError):
        cq.paired([1, 0], [1])
    with pytest.raises(ValueError):
        cq.paired([], [])


def _answers(rows: dict[str, dict[str, float]]):
    """rows: task_id -> system -> score; task ids start with their domain."""
    todo, done = [], {}
    for tid, scores in rows.items():
        todo.append(SimpleNamespace(task_id=tid, domain=tid.split("-")[0]))
        for system, score in scores.items():
            own = cq.OWN[todo[-1].domain]
            done[(tid, system)] = {"score": score, "seconds": 1.0, "tokens": 10,
                                   "experts": {own: 9, "smollm2-135m": 1}}
    return todo, done


def test_summary_scores_routing_off_the_picked_experts_and_compares_each_mode_with_it():
    zero = dict.fromkeys(MEMBERS, 0.0)
    rows = {
        "arithmetic-1": {**zero, "smollm2-math": 1.0, "latent": 1.0, "logit": 1.0, "logit-contrastive-0.5": 0.0},
        "code-1": {**zero, "smollm2-code": 1.0, "latent": 1.0, "logit": 0.0, "logit-contrastive-0.5": 1.0},
        "extraction-1": {**zero, "smollm2-json": 1.0, "smollm2-135m": 1.0, "latent": 1.0, "logit": 1.0,
                         "logit-contrastive-0.5": 1.0},
        "extraction-2": {**zero, "smollm2-json": 1.0, "latent": 0.0, "logit": 1.0, "logit-contrastive-0.5": 1.0},
    }
    todo, done = _answers(rows)
    ran = MEMBERS + ["logit", "latent", "logit-contrastive-0.5"]
    picks = ["smollm2-math", "smollm2-math", "smollm2-135m", "smollm2-json"]   # the code prompt misrouted
    s = cq.summarise(todo, done, MEMBERS, ran, picks)
    t = s["systems"]
    assert t["router:fleet"]["overall"] == pytest.approx(3 / 4)
    assert t["domain expert"]["overall"] == 1.0 and t["oracle"]["overall"] == 1.0
    assert s["router_picks_domain_expert"] == pytest.approx(2 / 4)    # the generalist answered one well
    assert s["best_single"] == "smollm2-json"            # 2 of 4, ahead of the generalist's 1
    assert set(s["paired"]) == {"logit", "latent", "logit-contrastive-0.5"}
    vs = s["paired"]["latent"]["router:fleet"]
    assert (vs["wins"], vs["losses"], vs["ties"]) == (1, 1, 2)
    lj = s["paired"]["logit"]["smollm2-json"]
    assert (lj["wins"], lj["losses"]) == (1, 0)
    assert s["expert_token_shares"]["logit-contrastive-0.5"]["code"] == {"smollm2-code": 0.9, "smollm2-135m": 0.1}

    report = {"machine": {"cpu": "cpu", "cores": 2}, "date": "2026-12-03", "commit": "abc", "command": "c",
              "prompts": len(todo), "router_origin": "shipped", **s}
    text = cq.render(report, "rows.jsonl", "plot.png")
    assert "| logit-contrastive-0.5 beats the best single expert | 0.750 vs 0.500 (+0.250) | yes |" in text
    assert "| at least one mode beats routing (router:fleet 0.750) | best: logit +0.000 | no |" in text
    assert "| latent | router:fleet | 1 / 1 / 2 |" in text
