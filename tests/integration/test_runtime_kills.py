"""A kill meant for one run reaches that run only, however late it comes: after the run has
ended, its cgroup has been recycled and the next run has started in it (with cgroups), or
the next run has started beside it in init's table (without)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.runtime.cgroups import Detection
from sandbox.runtime.container import Container
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session

ENV = {"PATH": "/bin"}


@pytest.fixture(params=["cgroups", "no-cgroups"])
def kill_session(request: pytest.FixtureRequest, session: Session) -> Iterator[Session]:
    if request.param == "cgroups":
        if session.runtime.cgroups.driver is None:
            pytest.skip("no cgroups for sandboxd here")
        yield session
        return
    s = Session.__new__(Session)
    s.loop = asyncio.new_event_loop()
    s.runtime = s.run(Runtime.start(cgroups=Detection(None, ())))
    s.containers = []
    yield s
    s.close()


async def _late_kill(c: Container, monkeypatch: pytest.MonkeyPatch) -> RunResult:
    """Run 1 ends; run 2 starts (in run 1's recycled cgroup, where there is one); then the
    kill that was run 1's arrives. Returns run 2's result."""
    taken: list[Any] = []   # each run's cgroup as handed to its exec
    take = type(c)._take_run_cgroup

    def recording(self: Container, run_id: int, limits: Any) -> Any:
        got = take(self, run_id, limits)
        taken.append(got[0])
        return got

    monkeypatch.setattr(type(c), "_take_run_cgroup", recording)
    first = await c.exec(ExecRequest(argv=["true"], env=ENV))
    assert first.status == Status.OK
    await c._settle()  # its cgroup is recycled and a spare again
    started = asyncio.Event()

    def on_output(stream: str, chunk: bytes) -> None:
        if b"started" in chunk:
            started.set()

    second = asyncio.ensure_future(c.exec(
        ExecRequest(argv=["sh", "-c", "echo started; sleep 0.5; echo alive"], env=ENV),
        on_output=on_output))
    await started.wait()
    if taken:
        # Without one the cgroups would differ, and the late kill could not reach run 2.
        assert len(taken) == 2 and getattr(taken[1], "cgroup", taken[1]) is \
            getattr(taken[0], "cgroup", taken[0]), "run 2 did not get run 1's cgroup"
    c._kill_run(taken[0] if taken else None, 1)   # run 1's kill, come late
    await c._settle()
    return await second


def test_a_late_kill_for_a_run_spares_the_next_run(kill_session: Session, busybox_root: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    c = kill_session.container(busybox_root, profile="judge")
    second = kill_session.run(_late_kill(c, monkeypatch))
    assert (second.status, second.exit_code, second.signal) == (Status.OK, 0, None), second
    assert second.stdout == b"started\nalive\n"


def test_a_kill_that_comes_before_the_run_has_started_still_reaches_it(
        kill_session: Session, busybox_root: Path) -> None:
    # A 1 ms wall limit often fires before init has started the run's first process, when
    # its cgroup is still empty: the kill must reach the run all the same.
    c = kill_session.container(busybox_root, profile="judge")
    for _ in range(20):
        r = kill_session.exec(c, ["sleep", "5"], wall_ms=1)
        assert (r.status, r.exit_code, r.signal) == (Status.WALL_LIMIT, None, 9), r
