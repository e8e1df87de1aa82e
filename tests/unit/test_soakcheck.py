"""The soak's leak rules (loadtest/soakcheck.py): each kind of leftover or growth between
the look after warm-up and the one at the end is reported, and a service that is as it
was is not."""

from __future__ import annotations

from dataclasses import replace

import pytest

from loadtest.soakcheck import Level, leaks
from sandbox.runtime.cgroups.base import KEPT_FILES_MAX

# 4 run cgroups, each with a cgroup.procs in 6 hierarchies and its kept counter files.
FULL = 4 * (6 + KEPT_FILES_MAX)
QUIET = Level(rss=100 << 20, fds=80, cgroup_fds=FULL, run_cgroups=4, hierarchies=6,
              threads=8, live_containers=2, pool_idle=2,
              records=frozenset({"a", "b", "c"}), ahead=("c",), inits=2, strays=(),
              mounts_per_container=23, cgroups_per_container=2, stray_cgroups=(),
              others_empty=0,
              store={"images/blobs/sha256": 3, "files/blobs/sha256": 2}, temp=(),
              sessions=0, images=frozenset({"sha256:i"}), files=frozenset({"sha256:f"}))


def test_a_service_as_it_was_leaks_nothing() -> None:
    # Within 5 %, fewer descriptors, another service's empty cgroup, the record of the
    # cgroups made ahead of the next container, or none waiting: none of it a leak.
    end = replace(QUIET, rss=QUIET.rss * 104 // 100, fds=70, others_empty=3)
    assert leaks(QUIET, end) == []
    assert leaks(QUIET, replace(QUIET, records=frozenset({"a", "b"}), ahead=())) == []


@pytest.mark.parametrize(("change", "said"), [
    ({"rss": (100 << 20) * 106 // 100}, "RSS grew"),
    ({"fds": 85}, "open descriptors"),
    ({"cgroup_fds": FULL + 1}, "descriptors of run cgroups"),
    ({"inits": 3}, "container inits"),
    ({"records": frozenset({"a", "c"})}, "container records"),
    ({"records": frozenset({"a", "b", "c", "d"})}, "container records"),
    ({"records": frozenset({"a", "b", "c", "d"}), "ahead": ("c", "d")}, "sets of cgroups"),
    ({"strays": ("123 sleep (sleeping)",)}, "processes left"),
    ({"mounts_per_container": 24}, "mounts in a container"),
    ({"cgroups_per_container": 3}, "run cgroups below"),
    ({"stray_cgroups": ("c-0123",)}, "cgroups no container owns"),
    ({"store": {"images/blobs/sha256": 4, "files/blobs/sha256": 2}}, "store on disk"),
    ({"temp": ("/state/images/blobs/tmp/x",)}, "temporary files"),
    ({"sessions": 1}, "sessions left"),
    ({"files": frozenset({"sha256:f", "sha256:g"})}, "store entries"),
])
def test_each_leftover_is_a_leak(change: dict[str, object], said: str) -> None:
    found = leaks(QUIET, replace(QUIET, **change))  # type: ignore[arg-type]
    assert len(found) == 1 and said in found[0], found
