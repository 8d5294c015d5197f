"""Runs model-written Python in a locked-down subprocess and reports whether it passed.

``run_python(program)`` writes ``program`` to ``main.py`` in a fresh temporary
directory (the *work dir*, removed afterwards) and runs it with ``sys.executable -I -S``
(no site-packages, no ``PYTHON*`` variables, no user site) under a near-empty
environment, in a new session so that a timeout kills the whole process group.
``passed`` means exit status 0 within ``timeout_s``.

What is guarded, and how:

- **Time**: wall-clock ``timeout_s`` (then SIGKILL to the process group) and
  ``RLIMIT_CPU``. A program that sleeps or loops forever costs ``timeout_s``, no more.
- **Memory**: ``RLIMIT_AS`` of ``memory_mb``; a memory bomb dies with MemoryError.
- **Output**: stdout/stderr go to files capped by ``RLIMIT_FSIZE`` (past it a flood's
  writes fail with EFBIG); only the last ``TAIL_BYTES`` of each come back.
- **Files**: an audit hook (``sys.addaudithook``, installed before the program runs)
  refuses ``open``/``os.open`` with any write flag, and ``os.remove``, ``os.rename``
  (``os.replace``), ``os.rmdir``, ``os.mkdir``, ``os.truncate``, ``os.chmod``,
  ``os.chown``, ``os.utime``, ``os.symlink``, ``os.link`` and ``shutil.rmtree`` on a
  path outside the work dir (symlinks and ``dir_fd`` resolved; but ``os.open`` with
  ``dir_fd`` is resolved against the cwd: its audit event omits the fd). Reading is
  allowed: imports need it.
- **Processes**: the hook refuses ``subprocess.Popen``, ``os.system``, ``os.exec*``,
  ``os.fork``, ``os.forkpty``, ``os.posix_spawn``, ``os.spawn``, ``os.kill``; the
  un-audited ``_posixsubprocess.fork_exec`` is replaced; ``RLIMIT_NPROC`` is 0 (which
  also stops threads for a non-root user; Linux does not enforce it for root).
- **Network**: ``socket.connect``, ``bind``, ``sendto`` and ``sendmsg`` are refused.
- **Escapes from the hook**: ``ctypes`` cannot load libraries (``ctypes.dlopen``).

What is *not* guarded: an audit hook is not a security boundary. It stops accidents in
model-written code (a stray ``os.remove``, ``rmtree``, ``subprocess.run``), not a
determined attacker, who can find un-audited paths (``gc``/frame tricks, C extension
modules, re-importing a patched module). Reading any file the gateway's user can read
is allowed; CPU and memory of other processes are shared; the child runs as the same
user (root, in our containers). Run truly hostile code in a container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

TAIL_BYTES = 2048
FSIZE_BYTES = 8 << 20  # largest file (and stdout) the program may write
NOFILE = 64

# Runs in the child as `python -I -S -c _BOOTSTRAP <workdir> <limits...>`: sets the
# resource limits, installs the audit hook, then executes main.py. Kept free of names
# a program could reach: everything lives in _guard's closure.
_BOOTSTRAP = r'''
import os, resource, sys
def _guard(root, cpu_s, mem, fsize, nofile):
    import os, resource  # locals: the hook's closure keeps them after the globals are deleted
    for lim, v in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem), (resource.RLIMIT_FSIZE, fsize),
                   (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, nofile), (resource.RLIMIT_NPROC, 0)):
        resource.setrlimit(lim, (v, v))
    write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> (index of a path it writes, index of that path's dir_fd argument or None)
    paths = {"os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
             "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
             "os.truncate": ((0, None),), "os.symlink": ((1, 2),), "os.link": ((1, 3),),
             "shutil.rmtree": ((0, 1),)}
    banned = {"subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
              "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
              "ctypes.dlopen"}
    realpath, join, fspath, readlink = os.path.realpath, os.path.join, os.fspath, os.readlink

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            return True  # an already-open descriptor: its opening was checked
        path = os.fsdecode(fspath(path))
        if dir_fd not in (None, -1) and not os.path.isabs(path):
            path = join(readlink(f"/proc/self/fd/{dir_fd}"), path)
        p = realpath(path)
        return p == root or p.startswith(root + os.sep) or p == "/dev/null"

    def hook(event, args):
        if event in banned:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            if args[2] & write and not inside(args[0]):
                raise PermissionError(f"sandbox: writing {args[0]!r} outside the sandbox directory is not allowed")
        elif event in paths:
            for i, fd_at in paths[event]:
                if not inside(args[i], None if fd_at is None else args[fd_at]):
                    raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory")

    import _posixsubprocess
    def fork_exec(*a, **k):
        raise PermissionError("sandbox: starting processes is not allowed")
    _posixsubprocess.fork_exec = fork_exec
    sys.addaudithook(hook)

_guard(sys.argv[1], *map(int, sys.argv[2:6]))
del _guard, os, resource
sys.argv = ["main.py"]
with open("main.py", encoding="utf-8") as _f:
    _code = compile(_f.read(), "main.py", "exec")
del _f
exec(_code, {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__})
'''


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    returncode: int | None  # negative: killed by that signal (SIGKILL after a timeout)
    timed_out: bool
    stdout: str  # the last TAIL_BYTES of each stream
    stderr: str
    seconds: float


def _tail(path: str) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, os.fstat(fh.fileno()).st_size - TAIL_BYTES))
        return fh.read().decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def run_python(program: str, *, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run ``program`` in the sandbox described in the module docstring."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    with tempfile.TemporaryDirectory(prefix="switchyard-sandbox-") as tmp:
        tmp = os.path.realpath(tmp)
        work = os.path.join(tmp, "work")
        os.mkdir(work)
        with open(os.path.join(work, "main.py"), "w", encoding="utf-8") as fh:
            fh.write(program)
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work}
        limits = [int(timeout_s) + 1, memory_mb << 20, FSIZE_BYTES, NOFILE]
        argv = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, work, *map(str, limits)]
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(proc.pid)  # also reaps anything the program left running
            proc.wait()
        seconds = time.monotonic() - start
        rc = proc.returncode
        return SandboxResult(passed=rc == 0 and not timed_out, returncode=rc, timed_out=timed_out,
                             stdout=_tail(out_path), stderr=_tail(err_path), seconds=seconds)
