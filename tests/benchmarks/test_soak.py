"""The soak benchmark: its checks on hand-made answers and runs, its socket census on real
sockets, and a short soak of a real gateway (real upstream, embedded Redis, loopback)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:  # where the script finds gateway_overhead and _common, as when run
    sys.path.insert(0, str(ROOT / "benchmarks"))

import soak  # noqa: E402


def _answer(status: int, body: bytes, done: bool = True) -> soak.Answer:
    return soak.Answer(status=status, body=bytearray(body), done=done)


ERROR = json.dumps({"error": {"message": "no", "type": "invalid_request_error", "param": None,
                              "code": None}}).encode()


def test_answers_are_judged_by_status_content_and_error_shape():
    assert soak.judge(_answer(200, b'{"choices": [{"message": {"content": "a canned answer"}}]}')) == "200"
    assert soak.judge(_answer(200, b'{"choices": []}')) == "bad-answer"
    assert soak.judge(_answer(200, b"data: {canned}\n\ndata: [DONE]\n\n"), stream=True) == "200"
    assert soak.judge(_answer(200, b"data: {canned}\n\n"), stream=True) == "bad-answer"   # no [DONE]
    assert soak.judge(_answer(400, ERROR)) == "400"
    assert soak.judge(_answer(400, b"Invalid HTTP request received.")) == "bad-error"
    assert soak.judge(_answer(200, b"partial", done=False)) == "cut-off"
    assert soak.judge(None) == "closed"


def test_outcomes_a_behaviour_does_not_allow_are_reported():
    outcomes = {"plain": {"200": 10, "500": 1}, "stream": {"200": 4}, "upstream-down": {"502": 2, "503": 7},
                "leave-mid-stream": {"left": 3, "bad-answer": 1}}
    assert soak.unexpected(outcomes) == {"plain": {"500": 1}, "leave-mid-stream": {"bad-answer": 1}}


ORIGIN = "http://127.0.0.1:9"
IDLE = {ORIGIN: {"in_use": 0, "idle": 8, "limit": 512}}


def _run(final_fds: dict, stuck_open: int = 0, plain: str = "200", health=(3.0, 4.0), pools=IDLE,
         unaccounted: int = 0) -> dict:
    conns = {"clients": 0, "upstream": 1, "stuck": 0, "other": 18}
    samples = [{"t": float(i), "requests": 100 * i, "gateway_rss_mb": 80.0 + i, "gateway_fds": 20,
                "gateway_conns": conns, "redis_rss_mb": 6.0, "stuck_open": 0, "health_ms": h, "pools": pools}
               for i, h in enumerate(health)]
    return {"elapsed_s": 2.0, "concurrency": 8, "outcomes": {"plain": {"200": 200}}, "examples": {},
            "samples": samples, "fds_before": conns, "rss_before_mb": 80.0,
            "final": {"fds": final_fds, "stuck_open": stuck_open, "pools": pools, "unaccounted_upstream": unaccounted,
                      "health_ms": 3.0, "rss_mb": 82.0,
                      "plain": plain, "stream": "200"}}


@pytest.mark.parametrize("run, failed", [
    (_run({"clients": 1, "upstream": 8, "stuck": 0, "other": 18}),
     "no client connection left open once the clients closed theirs"),
    (_run({"clients": 0, "upstream": 9, "stuck": 0, "other": 18}, unaccounted=1),
     "every open upstream connection counted by its pool"),
    (_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 18},
          pools={ORIGIN: {"in_use": 0, "idle": 8}, "http://127.0.0.1:7": {"in_use": 1, "idle": 0}}),
     "every upstream connection given back to its pool (none in use)"),
    (_run({"clients": 0, "upstream": 8, "stuck": 1, "other": 18}), "no connection to the stuck upstream left open"),
    (_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 18}, stuck_open=2),
     "no connection to the stuck upstream left open"),
    (_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 40}), "other descriptors back within 4 of the start"),
    (_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 18}, plain="502"),
     "plain and streamed requests answered after the load"),
    (_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 18}, health=(3.0, None, 4.0)),
     "health answered in every sample"),
])
def test_each_check_fails_on_its_own_symptom(run, failed):
    v = soak.verdict(run)
    assert not v["healthy"]
    assert [k for k, ok in v["checks"].items() if not ok] == [failed]


def test_a_clean_run_passes_and_its_memory_trend_is_read_from_the_second_half():
    v = soak.verdict(_run({"clients": 0, "upstream": 8, "stuck": 0, "other": 20}, health=(1.0,) * 8))
    assert v["healthy"], v["checks"]
    assert v["gateway_rss_slope_mb_per_min_second_half"] == pytest.approx(60.0)   # +1 MB per second


def test_the_keys_usage_must_lie_between_the_answered_requests_and_those_that_reached_the_expert():
    run = _run({"clients": 0, "upstream": 8, "stuck": 0, "other": 18})
    run["outcomes"] = {"plain": {"200": 10}, "pipelined": {"200": 2, "closed": 1}, "leave-mid-stream": {"left": 4},
                       "bad-json": {"400": 5}}
    assert soak.usage_bounds(run) == (2 + 10 + 6, 2 + 10 + 9 + 4)   # the final plain and stream count too

    def checked(requests: int, spend_usd: float, tokens=(100, 50)) -> dict:
        run["final"]["usage"] = {"requests": requests, "input_tokens": tokens[0], "output_tokens": tokens[1],
                                 "spend_usd": spend_usd}
        v = soak.verdict(run)
        return {k: ok for k, ok in v["checks"].items() if "key" in k}

    right = (1000 * 100 + 2000 * 50) / 1e9
    assert all(checked(18, right).values()) and all(checked(25, right).values())
    assert list(checked(17, right).values()) == [False, True]     # an answered request not booked
    assert list(checked(26, right).values()) == [False, True]     # more than can have reached the expert
    assert list(checked(20, right + 1e-9).values()) == [True, False]   # one nano-dollar off


def test_connections_are_counted_by_what_they_connect_to():
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(3)]   # "gateway", "upstream", "stuck"
    ports = dict(zip(("gateway", "upstream", "stuck"), (s.getsockname()[1] for s in servers)))
    opened = []
    try:
        before = soak.connections(os.getpid(), ports)
        for name, n in (("upstream", 2), ("stuck", 1), ("gateway", 3)):
            for _ in range(n):
                opened.append(socket.create_connection(("127.0.0.1", ports[name])))
        accepted = [servers[0].accept()[0] for _ in range(3)]   # the gateway's side of its clients
        opened += accepted
        after = soak.connections(os.getpid(), ports)
        # the three client sockets are on this process's side too, but their *local* port
        # is not the gateway's: only the accepted ends count as clients
        assert after["clients"] == before["clients"] + 3
        assert after["upstream"] == before["upstream"] + 2
        assert after["stuck"] == before["stuck"] + 1
        assert after["other"] == before["other"] + 3   # the three connecting ends to the "gateway"
    finally:
        for s in opened + servers:
            s.close()


def test_a_short_soak_of_a_real_gateway_passes_every_check(tmp_path: Path):
    rc = soak.main(["-d", "6", "-c", "8", "--sample", "1", "--no-readme",   # the default 6 s of quiet
                    "--results", str(tmp_path)])
    report = json.loads(next(tmp_path.glob("soak-*.json")).read_text())
    assert report["verdict"]["checks"] and report["verdict"]["healthy"], report["verdict"]
    assert rc == 0
    ran = report["run"]["outcomes"]
    assert all(sum(ran[name].values()) > 0 for name in soak.BEHAVIOURS), ran   # bad-key included: keyed
    usage = report["run"]["final"]["usage"]
    assert usage["requests"] >= ran["plain"]["200"] + ran["stream"]["200"]
    assert ran["plain"].get("200", 0) > 50
    assert (tmp_path / Path(report["plot"]).name).exists()
