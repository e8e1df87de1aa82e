"""[jobs] in the service's configuration: defaults, the callback allowlist, bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, JobsConfig, load


def _load(tmp_path: Path, text: str) -> JobsConfig:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    return load(cfg, env={"SANDBOXD_STATE_DIR": str(tmp_path)}).jobs


def test_defaults_allow_no_callback_host(tmp_path: Path) -> None:
    jobs = _load(tmp_path, "")
    assert jobs == JobsConfig() and jobs.callback_hosts == ()


def test_hosts_and_numbers_are_read(tmp_path: Path) -> None:
    jobs = _load(tmp_path, '[jobs]\ncallback_hosts = ["Hooks.Example.com.", "10.0.0.5:8080", '
                           '"[::1]:9000"]\ncallback_attempts = 3\nttl_s = 60\nworkers = 2\n')
    assert jobs.callback_hosts == ("hooks.example.com", "10.0.0.5:8080", "[::1]:9000")
    assert (jobs.callback_attempts, jobs.ttl_s, jobs.workers) == (3, 60.0, 2)


@pytest.mark.parametrize(("text", "where"), [
    ('callback_hosts = "hooks.example.com"', "jobs.callback_hosts"),
    ('callback_hosts = ["h:port"]', "jobs.callback_hosts"),
    ("callback_attempts = 0", "jobs.callback_attempts"),
    ("ttl_s = -1", "jobs.ttl_s"),
    ("workers = true", "jobs.workers"),
    ("callbacks = []", "jobs.callbacks: unknown setting"),
])
def test_bad_values_are_named(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        _load(tmp_path, f"[jobs]\n{text}\n")
