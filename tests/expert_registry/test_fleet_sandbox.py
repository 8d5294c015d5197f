"""The code sandbox: verdicts, time/memory/output limits, and the file/process/network guard."""

from __future__ import annotations

import os
import time

import pytest

from expert_registry.fleet.sandbox import TAIL_BYTES, run_python


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_passing_program_passes_and_returns_stdout():
    r = run_python("assert sum([1, 2, 3]) == 6\nprint('hello')\n")
    assert r.passed and r.returncode == 0 and not r.timed_out
    assert r.stdout.strip() == "hello"


def test_failing_assert_fails_with_traceback():
    r = run_python("assert 1 + 1 == 3, 'wrong sum'\n")
    assert not r.passed and r.returncode == 1 and not r.timed_out
    assert "AssertionError: wrong sum" in r.stderr


def test_syntax_error_fails():
    r = run_python("def f(:\n")
    assert not r.passed and "SyntaxError" in r.stderr


@pytest.mark.parametrize("body", ["while True:\n    pass", "import time\ntime.sleep(100)"])
def test_runaway_program_times_out_and_leaves_no_process(body):
    program = f"import os, sys\nprint(os.getpid(), flush=True)\n{body}\n"
    start = time.monotonic()
    r = run_python(program, timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + 2.0
    assert r.timed_out and not r.passed and r.returncode is not None and r.returncode < 0
    assert _gone(int(r.stdout.split()[0]))


@pytest.mark.parametrize("code", [
    "import os\nos.system('echo spawned')",
    "import subprocess\nsubprocess.run(['echo', 'spawned'])",
    "import os\nos.popen('echo spawned').read()",
    "import os\npid = os.fork()\nif pid == 0:\n    os._exit(0)",
    "import os\nos.posix_spawn('/bin/echo', ['echo', 'spawned'], {})",
    "import os\nos.execv('/bin/echo', ['echo', 'spawned'])",
    "import multiprocessing as mp\nmp.set_start_method('forkserver')\n"
    "p = mp.Process(target=print)\np.start()\np.join()",
])
def test_starting_a_process_is_refused(code):
    r = run_python(code + "\nprint('still here')\n")
    assert not r.passed
    assert "PermissionError: sandbox" in r.stderr
    assert "spawned" not in r.stdout and "still here" not in r.stdout


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))",
    "import socket\ns = socket.socket()\ns.bind(('127.0.0.1', 0))",
    "import ctypes",
])
def test_network_and_ctypes_are_refused(code):
    r = run_python(code)
    assert not r.passed and "PermissionError: sandbox" in r.stderr


@pytest.mark.parametrize("how", [
    "open({p!r}, 'w').write('x')",
    "open({p!r}, 'a').write('x')",
    "import os\nos.close(os.open({p!r}, os.O_WRONLY | os.O_CREAT))",
    "import pathlib\npathlib.Path({p!r}).write_text('x')",
    "import os\nos.symlink({p!r}, 'link')\nopen('link', 'w').write('x')",
    "import os\nos.chdir('..')\nopen({p!r}, 'w').write('x')",
])
def test_writing_outside_the_work_dir_is_refused(tmp_path, how):
    target = tmp_path / "outside.txt"
    r = run_python(how.format(p=str(target)))
    assert not r.passed and "PermissionError: sandbox" in r.stderr
    assert not target.exists()


@pytest.mark.parametrize("how", [
    "import os\nos.remove({p!r})",
    "import os\nos.rename({p!r}, 'stolen.txt')",
    "import os\nos.replace('main.py', {p!r})",
    "import os\nos.truncate({p!r}, 0)",
    "import shutil\nshutil.rmtree({d!r})",
    "import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.unlink('keep.txt', dir_fd=fd)",
])
def test_deleting_or_moving_outside_the_work_dir_is_refused(tmp_path, how):
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    r = run_python(how.format(p=str(keep), d=str(tmp_path)))
    assert not r.passed and "PermissionError: sandbox" in r.stderr
    assert keep.read_text() == "precious"


def test_files_inside_the_work_dir_can_be_written_and_removed():
    r = run_python(
        "import os, shutil, tempfile\n"
        "os.mkdir('d')\n"
        "with open('d/a.txt', 'w') as f:\n    f.write('data')\n"
        "os.rename('d/a.txt', 'd/b.txt')\n"
        "assert open('d/b.txt').read() == 'data'\n"
        "fd, name = tempfile.mkstemp()\nos.close(fd)\nos.remove(name)\n"
        "shutil.rmtree('d')\n"
        "print(os.getcwd())\n"
    )
    assert r.passed, r.stderr
    assert not os.path.exists(r.stdout.strip())  # the work dir is removed afterwards


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("SWITCHYARD_SANDBOX_CANARY", "secret")
    r = run_python("import os, sys\nprint(sorted(os.environ))\nprint(sys.flags.isolated, sys.flags.no_site)\n")
    assert r.passed, r.stderr
    assert "SWITCHYARD_SANDBOX_CANARY" not in r.stdout
    assert r.stdout.splitlines()[-1] == "1 1"


@pytest.mark.parametrize("bomb", ["x = bytearray(4 << 30)", "x = []\nwhile True:\n    x.append(' ' * (1 << 20))"])
def test_memory_bomb_fails_without_harming_the_caller(bomb):
    r = run_python(bomb, timeout_s=10.0, memory_mb=256)
    assert not r.passed and not r.timed_out
    assert run_python("print('ok')").passed  # and the next run is unaffected


def test_stdout_flood_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout_s=5.0)
    assert not r.passed
    assert 0 < len(r.stdout.encode()) <= TAIL_BYTES


def test_large_but_bounded_output_passes_and_keeps_the_tail():
    r = run_python("for i in range(20000):\n    print(i)\n")
    assert r.passed
    assert len(r.stdout.encode()) <= TAIL_BYTES and r.stdout.rstrip().endswith("19999")


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError):
        run_python("pass", memory_mb=0)
