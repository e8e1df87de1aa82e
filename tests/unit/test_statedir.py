"""The state directory is made private (0700), a looser one of ours tightened with a log
line, and one that is someone else's or shared refused untouched."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from sandbox import statedir
from sandbox.errors import SandboxError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_state_dir_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        statedir.prepare(tmp_path / "a" / "state")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "state") == 0o700


def test_a_looser_one_of_ours_is_tightened_and_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o2755)
    with caplog.at_level(logging.WARNING, "sandboxd.state"):
        statedir.prepare(state)
    assert mode(state) == 0o2700
    assert f"state_dir {state} was mode 2755, open to other local users; made it 2700" \
        in caplog.text
    caplog.clear()
    statedir.prepare(state)  # already private: nothing to say
    assert caplog.text == ""


def test_a_shared_directory_is_refused_untouched(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(SandboxError, match=r"is shared \(mode 1777, like /tmp\).*"
                       r"give a directory of its own"):
        statedir.prepare(shared)
    assert mode(shared) == 0o1777
    (tmp_path / "file").write_text("")
    with pytest.raises(SandboxError, match="is not a directory"):
        statedir.prepare(tmp_path / "file")


def test_another_users_directory_is_refused_untouched(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    if os.geteuid() == 0:
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/usr/share")  # root's, and no ordinary user can change it
    before = mode(theirs)
    with pytest.raises(SandboxError, match=rf"belongs to uid {theirs.stat().st_uid}, not to "
                       rf"this user \({os.geteuid()}\)"):
        statedir.prepare(theirs)
    assert mode(theirs) == before
