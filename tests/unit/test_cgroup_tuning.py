"""favordynmods detection over fake mountinfo, and the real remount as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.runtime.cgroups import tuning

HYBRID = ("35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
          "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw{extra}\n")


def fake(tmp_path: Path, text: str) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(text)
    return tmp_path


def test_detects_the_option_on_the_cgroup2_mount(tmp_path: Path) -> None:
    assert tuning.dynmods_favored(fake(tmp_path / "a", HYBRID.format(extra=""))) is False
    on = fake(tmp_path / "b", HYBRID.format(extra=",nsdelegate,favordynmods"))
    assert tuning.dynmods_favored(on) is True
    assert "already has" in tuning.favor_dynmods(on)


def test_no_cgroup2_mount_is_unknown(tmp_path: Path) -> None:
    root = fake(tmp_path, HYBRID.splitlines()[0] + "\n")
    assert tuning.dynmods_favored(root) is None
    assert "no cgroup2 mount" in tuning.favor_dynmods(root)


@pytest.mark.skipif(os.geteuid() != 0, reason="remounting cgroup2 needs root")
def test_remount_sets_it_once() -> None:
    if tuning.dynmods_favored() is None:
        pytest.skip("this host has no cgroup2 mount")
    tuning.favor_dynmods()
    assert tuning.dynmods_favored() is True
    assert "already has" in tuning.favor_dynmods()  # idempotent
