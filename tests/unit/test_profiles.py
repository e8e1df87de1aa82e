"""Run profiles from files: the operator's knobs (seccomp "unconfined", network "host") are
accepted, anything else is refused with a message naming what is allowed; CPU maxima (a
cpuset within the profile's and the host's CPUs, a quota within the maximum)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import PolicyError
from sandbox.kept import Kept
from sandbox.runtime import profiles
from sandbox.runtime.profiles import HOST_NETWORK, UNCONFINED, Limits, Profile, load_profile


def _load(tmp_path: Path, **data: Any) -> Profile:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return load_profile("p", path)


def test_capabilities_are_names_of_dockers_default_set(tmp_path: Path) -> None:
    p = _load(tmp_path, capabilities=["chown", "CAP_SETUID", "KILL"])
    assert p.capabilities == ("CHOWN", "SETUID", "KILL")
    assert p.capability_mask == 1 << 0 | 1 << 7 | 1 << 5
    assert _load(tmp_path).capability_mask == 0
    assert load_profile("default").capabilities == load_profile("judge").capabilities == ()


def test_unconfined_and_host_network_are_accepted(tmp_path: Path) -> None:
    p = _load(tmp_path, seccomp="unconfined", network="host")
    assert (p.seccomp, p.network) == (UNCONFINED, HOST_NETWORK)
    p = _load(tmp_path)
    assert (p.seccomp, p.network) == ("default", "none")


@pytest.mark.parametrize(("data", "message"), [
    ({"network": "bridge"}, r"network: expected 'none' .* or 'host' .*, got 'bridge'"),
    ({"network": None}, r"network: expected 'none' .*, got null"),
    ({"seccomp": 42}, r"seccomp: expected the name of a policy in policies/seccomp or "
                      r"'unconfined', got 42"),
    ({"seccomp": "nope"}, r"unknown seccomp profile 'nope'; built-in profiles: default, or "
                          r"'unconfined'"),
    ({"seccomp": "../default"}, r"invalid seccomp profile name"),
    ({"network": "host", "rootfs": {"sys": "ro"}},
     r"rootfs.sys 'ro' needs a network namespace .*use network 'none' or rootfs.sys 'none'"),
    ({"capabilities": "CHOWN"}, r"capabilities: expected a list of names"),
    ({"capabilities": ["SYS_ADMIN"]}, r"capability 'SYS_ADMIN' is not one a profile may keep"),
    ({"capabilities": ["CAP_SYS_PTRACE"]}, r"'SYS_PTRACE' is not one a profile may keep"),
])
def test_bad_values_are_refused_clearly(tmp_path: Path, data: dict[str, Any],
                                        message: str) -> None:
    with pytest.raises(PolicyError, match=message) as e:
        _load(tmp_path, **data)
    assert str(e.value).startswith("profile 'p': ")


# ------------------------------------------------------------------------- CPU maxima

def _host() -> str:
    return profiles.format_cpuset(profiles.host_cpus())


@pytest.mark.parametrize("asked", [Limits(cpuset="0-4095"), Limits(cpuset="4095"),
                                   Limits(cpu_quota_cores=100_000.0)])
def test_shipped_profiles_refuse_cpus_beyond_the_host(asked: Limits) -> None:
    for name in ("default", "judge"):
        field = "cpuset" if asked.cpuset else "cpu_quota_cores"
        with pytest.raises(PolicyError, match=rf"^limits\.{field}: .*; ask for "):
            load_profile(name).resolve(asked)


def test_shipped_profiles_have_cpu_maxima_of_this_host() -> None:
    for name in ("default", "judge"):
        p = load_profile(name)
        assert p.maxima.cpuset == _host()
        assert p.maxima.cpu_quota_cores == float(len(profiles.host_cpus()))


@pytest.mark.parametrize(("text", "canonical"), [
    ("0", "0"), ("1,0", "0-1"), ("0-3,6,7,8", "0-3,6-8"), ("2-2", "2"), ("5,1-3", "1-3,5"),
])
def test_cpu_lists_are_read_as_the_kernel_reads_them(text: str, canonical: str) -> None:
    assert profiles.format_cpuset(profiles.parse_cpuset(text, "x")) == canonical
    assert Limits.from_dict({"cpuset": text}).cpuset == canonical


@pytest.mark.parametrize("bad", ["", "a", ",0", "0,", "0-", "-1", "3-1", "0--1", "1 ", "65536",
                                 "0-99999", 0, None, ["0"]])
def test_bad_cpu_lists_are_refused(bad: Any) -> None:
    if bad is None:
        assert Limits.from_dict({"cpuset": bad}).cpuset is None  # unset
        return
    with pytest.raises(PolicyError, match=r"^limits\.cpuset: expected a list of CPUs"):
        Limits.from_dict({"cpuset": bad})


def test_a_cpuset_must_be_within_the_maximum_and_the_host() -> None:
    here = sorted(profiles.host_cpus())
    maxima = Limits(cpuset=str(here[0]))
    Limits(cpuset=str(here[0])).check_within(maxima)
    Limits(cpuset=_host()).check_within(Limits())  # no maximum: the host's CPUs
    missing = max(here) + 1
    with pytest.raises(PolicyError, match=rf"^limits\.cpuset: {missing} names CPUs this host "
                                          rf"does not have \({missing}\); ask for a subset "
                                          rf"of {here[0]}$"):
        Limits(cpuset=str(missing)).check_within(maxima)
    if len(here) > 1:
        with pytest.raises(PolicyError, match=rf"^limits\.cpuset: {_host()} names CPUs outside "
                                              rf"this profile's maximum {here[0]}; ask for a "
                                              rf"subset of {here[0]}$"):
            Limits(cpuset=_host()).check_within(maxima)


@pytest.mark.parametrize("bad", [0, 0.001, -1, 5000, True, "1"])
def test_cpu_quota_is_a_sane_number_of_cores(bad: Any) -> None:
    with pytest.raises(PolicyError, match=r"^limits\.cpu_quota_cores: expected a number of "
                                          r"cores from 0\.01 to 4096"):
        Limits.from_dict({"cpu_quota_cores": bad})


def test_a_cpu_quota_must_be_within_the_maximum() -> None:
    judge = load_profile("judge")
    top = judge.maxima.cpu_quota_cores
    assert judge.resolve(Limits(cpu_quota_cores=top)).cpu_quota_cores == top
    with pytest.raises(PolicyError, match=rf"^limits\.cpu_quota_cores: {top * 2} is above "
                                          rf"this profile's maximum of {top}; ask for at "
                                          rf"most {top}$"):
        judge.resolve(Limits(cpu_quota_cores=top * 2))


def test_a_profile_file_may_narrow_the_cpu_maxima(tmp_path: Path) -> None:
    first = min(profiles.host_cpus())
    p = _load(tmp_path, limits={"maxima": {"cpuset": str(first), "cpu_quota_cores": 0.5}})
    assert (p.maxima.cpuset, p.maxima.cpu_quota_cores) == (str(first), 0.5)
    with pytest.raises(PolicyError, match=r"p\.limits\.defaults\.cpu_quota_cores: 1\.0 is "
                                          r"above"):
        _load(tmp_path, limits={"defaults": {"cpu_quota_cores": 1},
                                "maxima": {"cpu_quota_cores": 0.5}})


def test_a_policy_resolves_each_ask_once_and_keeps_no_refusal(monkeypatch: Any) -> None:
    from sandbox.runtime import policy as policy_module
    judge = policy_module.PolicyRegistry(own_process_only=False).get("judge")
    resolves = 0
    resolve = policy_module.Policy._resolve

    def counted(self: Any, asked: Limits | None) -> Any:
        nonlocal resolves
        resolves += 1
        return resolve(self, asked)

    monkeypatch.setattr(policy_module.Policy, "_resolve", counted)
    first = judge.limits(Limits(cpu_ms=1000, wall_ms=2000))
    again = judge.limits(Limits(cpu_ms=1000, wall_ms=2000))   # equal, not the same object
    assert again is first and resolves == 1
    assert (first.cpu_ms, first.wall_ms) == (1000, 2000)
    assert judge.limits(None) is judge.limits(None) and resolves == 2
    assert judge.limits(Limits(cpu_ms=1001)).cpu_ms == 1001 and resolves == 3
    too_much = Limits(memory_bytes=1 << 60)
    for _ in range(2):
        with pytest.raises(PolicyError, match="memory_bytes"):
            judge.limits(too_much)
    assert resolves == 5
    monkeypatch.setattr(judge._resolved, "size", len(judge._resolved))
    judge.limits(Limits(cpu_ms=1002))     # the oldest ask (cpu_ms 1000) is forgotten
    assert judge.limits(Limits(cpu_ms=1000, wall_ms=2000)) is not first and resolves == 7


def test_a_limits_table_is_read_once_and_its_value_types_count(monkeypatch: Any) -> None:
    first = Limits.from_dict({"cpu_ms": 700, "wall_ms": 900})
    assert Limits.from_dict({"cpu_ms": 700, "wall_ms": 900}, "cases[3].limits") is first
    assert Limits.from_dict({"cpu_ms": 1}).cpu_ms == 1
    # Equal to 1 and hashed alike, but not the same ask: still refused, every time.
    for _ in range(2):
        with pytest.raises(PolicyError, match="cpu_ms: expected a positive integer"):
            Limits.from_dict({"cpu_ms": True})
    with pytest.raises(PolicyError, match="cpu_ms: expected a positive integer, got an array"):
        Limits.from_dict({"cpu_ms": [1]})   # no key can be made of it: read, and refused
    with pytest.raises(PolicyError, match="expected an object"):
        Limits.from_dict([("cpu_ms", 1)])
    monkeypatch.setattr(profiles, "_tables", Kept(1))
    kept = Limits.from_dict({"cpu_ms": 700, "wall_ms": 900})
    assert Limits.from_dict({"cpu_ms": 700, "wall_ms": 900}) is kept
    Limits.from_dict({"cpu_ms": 701})     # the older table is forgotten
    again = Limits.from_dict({"cpu_ms": 700, "wall_ms": 900})
    assert again == first and again is not kept
