"""The service config's [policies.<profile>] tables (parsed, checked against the profiles
they change, and handed to the engine), and the file cache's settings."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from sandbox.engine import PolicyLimits
from sandbox.engine.filecache import FileCacheConfig
from sandbox.runtime.profiles import Limits, load_profile
from service.config import ConfigError, from_dict

STATE = '[server]\nstate_dir = "/srv/sandboxd"\n'


def _load(toml: str) -> Any:
    # STATE after: a top-level key (policies = 3) must come before any table
    return from_dict(tomllib.loads(toml + STATE), env={})


def test_defaults_and_maxima_reach_the_engine_config() -> None:
    c = _load("[policies.judge.defaults]\nwall_ms = 1000\ncpu_ms = 500\n"
              "[policies.judge.maxima]\nwall_ms = 2000\n"
              "[policies.default.maxima]\nmemory_bytes = 1073741824\n")
    limits = c.engine_config().policy_limits
    assert limits["judge"] == PolicyLimits(defaults=Limits(wall_ms=1000, cpu_ms=500),
                                           maxima=Limits(wall_ms=2000))
    assert limits["default"] == PolicyLimits(maxima=Limits(memory_bytes=1 << 30))
    assert _load("").engine_config().policy_limits == {}


def test_applied_over_the_profile_key_by_key() -> None:
    judge = load_profile("judge")
    merged = PolicyLimits(defaults=Limits(wall_ms=1000),
                          maxima=Limits(wall_ms=2000)).applied_to(judge)
    assert (merged.defaults.wall_ms, merged.maxima.wall_ms) == (1000, 2000)
    assert merged.defaults.cpu_ms == judge.defaults.cpu_ms
    assert merged.maxima.memory_bytes == judge.maxima.memory_bytes
    assert merged.rootfs == judge.rootfs and merged.seccomp == judge.seccomp


@pytest.mark.parametrize(("toml", "words"), [
    ("[policies.nosuch.maxima]\nwall_ms = 1\n", ["policies.nosuch", "known profiles"]),
    ("[policies.judge.maxima]\ngpus = 1\n", ["policies.judge.maxima.gpus", "unknown limit"]),
    ("[policies.judge.defaults]\nwall_ms = -5\n", ["policies.judge.defaults.wall_ms",
                                                   "positive"]),
    ("[policies.judge.defaults]\nwall_ms = 3000\n[policies.judge.maxima]\nwall_ms = 2000\n",
     ["policies.judge.defaults.wall_ms", "3000", "2000"]),
    # the profile file's default (5000) would be left above a maximum lowered alone
    ("[policies.judge.maxima]\nwall_ms = 2000\n", ["policies.judge.defaults.wall_ms", "5000"]),
    ("[policies.judge.limits]\nwall_ms = 1\n", ["policies.judge.limits", "defaults, maxima"]),
    ("[policies]\njudge = 3\n", ["policies.judge", "table"]),
    ("[policies.judge]\nmaxima = 3\n", ["policies.judge.maxima", "table"]),
    ("policies = 3\n", ["policies", "table"]),
])
def test_bad_policy_tables_name_the_setting(toml: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        _load(toml)
    for w in words:
        assert w in str(err.value), str(err.value)


# the file cache: [files], the tenants' file quotas ([limits] defaults, a token's own)

TOKEN = 'token = "0123456789abcdef-file-quotas"\nname = "judge"\n'


def test_file_cache_settings_reach_the_engine_config_and_the_tenants() -> None:
    c = _load("")
    assert c.engine_config().files == FileCacheConfig() == FileCacheConfig(86400.0, 256 << 20)
    assert (c.tenant(None).max_file_bytes, c.tenant(None).max_files) == (1 << 30, 10_000)
    c = _load("[files]\nttl_s = 600\nmax_file_bytes = 1048576\n"
              "[limits]\nfile_bytes_per_tenant = 4096\nfiles_per_tenant = 3\n"
              f"[[tokens]]\n{TOKEN}max_files = 50\n"
              '[[tokens]]\ntoken = "0123456789abcdef-defaults"\nname = "other"\n')
    assert c.engine_config().files == FileCacheConfig(ttl_s=600.0, max_file_bytes=1 << 20)
    judge, other = (c.tenant(t) for t in c.tokens)
    assert (judge.max_file_bytes, judge.max_files) == (4096, 50)  # its own count, default bytes
    assert (other.max_file_bytes, other.max_files) == (4096, 3)
    assert (c.tenant(None).max_file_bytes, c.tenant(None).max_files) == (4096, 3)
    c = _load(f"[[tokens]]\n{TOKEN}max_file_bytes = 0\nmax_files = 0\n")  # no files at all
    assert (c.tenant(c.tokens[0]).max_file_bytes, c.tenant(c.tokens[0]).max_files) == (0, 0)


@pytest.mark.parametrize(("toml", "words"), [
    ("[files]\nttl_s = 0\n", ["files.ttl_s", "positive number of seconds"]),
    ("[files]\nttl_s = nan\n", ["files.ttl_s", "positive"]),
    ('[files]\nttl_s = "1d"\n', ["files.ttl_s", "seconds"]),
    ("[files]\nmax_file_bytes = 0\n", ["files.max_file_bytes", "at least 1"]),
    ("[files]\nmax_file_bytes = 1.5\n", ["files.max_file_bytes", "integer"]),
    ("[files]\nmax_bytes = 5\n", ["files.max_bytes", "known: max_file_bytes, ttl_s"]),
    ("files = 3\n", ["files", "table"]),
    ("[limits]\nfiles_per_tenant = 0\n", ["limits.files_per_tenant", "at least 1"]),
    ("[limits]\nfile_bytes_per_tenant = -1\n", ["limits.file_bytes_per_tenant"]),
    (f"[[tokens]]\n{TOKEN}max_files = -1\n", ["tokens[0].max_files", "at least 0"]),
    (f'[[tokens]]\n{TOKEN}max_file_bytes = "1G"\n', ["tokens[0].max_file_bytes", "integer"]),
])
def test_bad_file_cache_settings_name_the_setting(toml: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        _load(toml)
    for w in words:
        assert w in str(err.value), str(err.value)
