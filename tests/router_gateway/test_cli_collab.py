"""``switchyard collab train`` on the quick fleet, then the trained groups served by real
collaboration workers and called with the real OpenAI SDK (streamed and not)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from expert_registry.launcher import WorkerLauncher
from expert_registry.store import ExpertStore, open_redis
from tests.router_gateway.test_cli import sy


@pytest.fixture(scope="module")
def trained(fleet_model_dirs, tmp_path_factory) -> Iterator[tuple[Path, dict]]:
    data_dir = tmp_path_factory.mktemp("collab-cli")
    # the quick fleet already built for the session, not rebuilt here
    (data_dir / "models").symlink_to(Path(fleet_model_dirs["smollm2-135m"]).parent, target_is_directory=True)
    reports = {}
    for mode in ("logit", "latent"):
        out = sy(data_dir, "collab", "train", mode, "--quick", "--json", timeout=900)
        reports[mode] = json.loads(out.stdout)
    yield data_dir, reports


def test_training_writes_group_files_and_reports(trained):
    data_dir, reports = trained
    for mode, r in reports.items():
        assert r["group"] == f"fleet-quick-{mode}"
        group = json.loads(Path(r["group_file"]).read_text())
        assert group["mode"] == mode and list(group["experts"])[0] == "smollm2-135m" and len(group["experts"]) == 4
        assert Path(group["head"], "config.json").exists()
        assert r["report"]["examples"] == 24
    boundaries = reports["latent"]["report"]["boundaries"]
    assert reports["logit"]["report"]["epoch_losses"] and len(boundaries) == 2 and boundaries[-1] == 30
    listed = sy(data_dir, "collab", "list", "--quick").stdout
    assert "collab:fleet-quick-logit" in listed and "collab:fleet-quick-latent" in listed


def test_bad_mode_is_a_clear_error(trained):
    data_dir, _ = trained
    proc = sy(data_dir, "collab", "train", "swap", "--quick", check=False)
    assert proc.returncode != 0 and "mode must be one of logit, latent" in proc.stderr + proc.stdout


def test_trained_groups_serve_chat_over_the_openai_api(trained):
    data_dir, _ = trained
    store = ExpertStore(open_redis(None, data_dir))
    launcher = WorkerLauncher(store, data_dir)
    names = ["fleet-quick-logit", "fleet-quick-latent"]
    try:
        specs = {n: store.get(n) for n in names}
        assert all(s.backend == "collab" and s.launch.engine == "collab" for s in specs.values())
        launcher.up(names, timeout_s=300, progress=False)
        for name in names:
            client = openai.OpenAI(base_url=store.get(name).base_url, api_key="x", max_retries=0, timeout=120)
            kw = dict(model=name, messages=[{"role": "user", "content": "What is 12 + 30?"}], temperature=0,
                      max_tokens=12)
            whole = client.chat.completions.create(**kw)
            mode = name.rsplit("-", 1)[1]
            assert whole.model_extra["switchyard"]["mode"] == mode
            assert sum(whole.model_extra["switchyard"]["experts"].values()) == whole.usage.completion_tokens
            if mode == "latent":  # one primary speaks every token
                assert len(whole.model_extra["switchyard"]["experts"]) == 1
            chunks = list(client.chat.completions.create(stream=True, **kw))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                whole.choices[0].message.content
    finally:
        launcher.down()
        store.client.shutdown(nosave=True)
