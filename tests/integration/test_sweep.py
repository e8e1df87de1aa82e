"""The isolation sweep end to end (--quick), and the profile knobs it turns: seccomp
"unconfined" loads no filter, network "host" keeps the host's network namespace.

No speed is checked: only that every variant has its figures, and what each knob does."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import xml.dom.minidom
from pathlib import Path

import pytest

from loadtest.sweep import LAYERS, VARIANTS
from loadtest.sweep_report import section_html, table
from sandbox.runtime.profiles import HOST_NETWORK, UNCONFINED
from tests.conftest import Session

REPO = Path(__file__).resolve().parents[2]


def test_quick_sweep_measures_every_variant() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.sweep", "--quick", "--json-only"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(result["variants"]) == [v.key for v in VARIANTS]
    for program, meta in result["programs"].items():
        tight = meta["tight_bare"]
        assert set(tight) == {"fork_exec", "posix_spawn"}
        fastest = min(t["latency_ms"]["p50"] for t in tight.values())
        for key, variant in result["variants"].items():
            f = variant[program]
            assert f["runs"] == meta["rounds"] >= 2, (key, program)
            assert 0 < f["median_ms"] <= f["p99_ms"], (key, program, f)
            assert math.isfinite(f["ratio_vs_bare"]) and f["ratio_vs_bare"] > 0
            assert f["ratio_vs_fastest_bare"] == pytest.approx(f["median_ms"] / fastest)
            assert f["cpu_median_ms"] is not None and f["cpu_median_ms"] >= 0
        full, bare = result["variants"]["full"][program], result["variants"]["bare"][program]
        assert (full["delta_vs_full_ms"], bare["ratio_vs_bare"]) == (0, 1)
        costs = result["layer_cost_ms"][program]
        assert set(costs) == {la.name for la in LAYERS}
        assert all(math.isfinite(c["wall"]) and math.isfinite(c["cpu"]) for c in costs.values())
        # The runtime started without a cgroup driver reports what rusage saw.
        assert result["variants"]["no_cgroups"][program]["cpu_measured_by"] == "rusage"
        if result["cgroup_driver"] != "none":
            assert result["variants"]["full"][program]["cpu_measured_by"].startswith("cgroup")

    text = table(result)
    for v in VARIANTS:
        assert f"{v.key}: {v.label}" in text
    html = section_html(result)
    doc = xml.dom.minidom.parseString(html)  # well-formed, to sit inside the report page
    assert doc.documentElement.getAttribute("id") == "isolation-sweep"
    # Per program, the overhead of each layer; then every variant against bare.
    assert len(doc.getElementsByTagName("svg")) == len(result["programs"]) + 1
    assert len(doc.getElementsByTagName("table")) == len(result["programs"]) + 1
    assert "overhead per isolation layer" in html


def _profile(session: Session, name: str, **changes: str) -> str:
    judge = session.runtime.policies.profile("judge")
    session.runtime.policies.register(dataclasses.replace(judge, name=name, **changes))
    return name


@pytest.fixture
def unconfined(session: Session, busybox_root: Path):
    c = session.container(busybox_root, profile=_profile(session, "test-unconfined",
                                                         seccomp=UNCONFINED))
    yield c
    session.run(c.destroy())


@pytest.fixture
def host_network(session: Session, busybox_root: Path):
    c = session.container(busybox_root, profile=_profile(session, "test-host-network",
                                                         network=HOST_NETWORK))
    yield c
    session.run(c.destroy())


def test_seccomp_unconfined_loads_no_filter(session: Session, judge_container,
                                            unconfined) -> None:
    """The kernel's own account: no filter mode, no filter attached. (What a filter would
    refuse cannot show it here: a run in a chroot may not make a user namespace either.)"""
    fields = ["grep", "-E", "^Seccomp(_filters)?:", "/proc/self/status"]
    r = session.exec(unconfined, fields)
    assert r.stdout.split() == [b"Seccomp:", b"0", b"Seccomp_filters:", b"0"]
    r = session.exec(judge_container, fields)
    assert r.stdout.split() == [b"Seccomp:", b"2", b"Seccomp_filters:", b"1"]  # one filter


def _interfaces(proc_net_dev: str) -> list[str]:
    return sorted(line.split(":")[0].strip() for line in proc_net_dev.splitlines()[2:])


def test_network_host_keeps_the_hosts_namespace(session: Session, judge_container,
                                                host_network) -> None:
    ours = os.readlink("/proc/self/ns/net")
    r = session.exec(host_network, ["readlink", "/proc/self/ns/net"])
    assert r.stdout.decode().strip() == ours
    r = session.exec(host_network, ["cat", "/proc/net/dev"])
    assert _interfaces(r.stdout.decode()) == _interfaces(Path("/proc/net/dev").read_text())

    r = session.exec(judge_container, ["readlink", "/proc/self/ns/net"])
    assert r.stdout.decode().strip() != ours
    r = session.exec(judge_container, ["cat", "/proc/net/dev"])
    assert _interfaces(r.stdout.decode()) == ["lo"]
