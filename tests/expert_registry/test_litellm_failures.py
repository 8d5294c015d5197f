"""How the litellm backend's failures are classified, with the real litellm library and
real sockets: a refused connection is the expert being unreachable (failover, counted
toward cooldown); a socket this process cannot open at all (out of file descriptors) is
``UpstreamNotTried`` (the gateway's own trouble: a 503, not counted against the expert).

Run in a child process, because running out of descriptors there is done by lowering
its own open-files limit and filling it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.router_gateway.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent("""
    import asyncio, errno, os, resource, sys
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    from expert_registry.spec import ExpertSpec
    from expert_registry.upstream import LiteLLMUpstream

    up = LiteLLMUpstream(10.0)
    spec = ExpertSpec(name="remote", backend="litellm", base_url=f"http://127.0.0.1:{sys.argv[1]}/v1",
                      served_model="openai/remote")
    body = {"model": "remote", "messages": [{"role": "user", "content": "hi"}]}

    async def outcome(stream):
        try:
            if stream:
                await up.open_stream(spec, "chat/completions", dict(body, stream=True))
            else:
                await up.answer(spec, "chat/completions", dict(body))
        except Exception as exc:
            return type(exc).__name__ + " " + str(exc)
        return "answered"

    async def main():
        print("refused", await outcome(False))       # also imports what litellm loads lazily
        print("refused-stream", await outcome(True))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        held = []
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
        print("exhausted", await outcome(False))
        print("exhausted-stream", await outcome(True))
        for fd in held:
            os.close(fd)

    asyncio.run(main())
""")


def test_litellm_refused_is_unreachable_and_out_of_descriptors_is_not_tried():
    port = free_port()   # nothing listens there
    done = subprocess.run([sys.executable, "-c", CHILD, str(port)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    for case in ("refused", "refused-stream"):
        assert lines[case].startswith("UpstreamUnreachable expert 'remote'"), (case, lines)
    for case in ("exhausted", "exhausted-stream"):
        assert lines[case].startswith("UpstreamNotTried expert 'remote'"), (case, lines)
        assert "Too many open files" in lines[case], lines[case]
