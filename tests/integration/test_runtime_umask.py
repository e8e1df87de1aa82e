"""The service's umask (a hardened unit's UMask=0077, an operator's shell) does not reach
what the runtime makes for runs: init's root, mount points and the runtime's files keep the
modes the runtime names, so a run as an ordinary id of the container can enter its root."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.runtime.results import Status
from tests.conftest import Session


def test_a_service_under_umask_0077_still_runs(busybox_root: Path) -> None:
    before = os.umask(0o077)
    try:
        s = Session()   # its spawner inherits the umask
    finally:
        os.umask(before)
    try:
        c = s.container(busybox_root, profile="default")
        r = s.exec(c, ["sh", "-c", "cat /etc/hosts >/dev/null && ls / >/dev/null && echo ok"],
                   uid=1000)
        assert (r.status, r.stdout) == (Status.OK, b"ok\n"), r
    finally:
        s.close()
