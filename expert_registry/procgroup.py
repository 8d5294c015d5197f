"""Process groups on POSIX: who is in one, whether a process lives, signalling the group.

A worker runs in a session of its own, so its process-group id is its pid and every
process it forks (vLLM's engine core, model worker, resource tracker) shares it. Linux
answers from ``/proc``; elsewhere (macOS) the answers are coarser but safe.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_PROC = Path("/proc")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, pgrp) from /proc/PID/stat, or None when the process is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may hold spaces and ")"
    return fields[0], int(fields[2])


def process_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    if _PROC.is_dir():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``."""
    if not _PROC.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat and stat[0] not in ("Z", "X") and stat[1] == pgid:
                members.append(int(entry.name))
    return members


def signal_group(pgid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to every process in the group; a group already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def runs_command(pid: int, cmd: list[str]) -> bool:
    """Whether ``pid`` still runs ``cmd``: guards against signalling a pid the OS reused."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, PermissionError):
        return True  # cannot tell (no /proc): trust the pidfile
    if not raw:
        return True  # an exiting process has no command line any more; it is still ours
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[: len(cmd)]] == list(cmd)
