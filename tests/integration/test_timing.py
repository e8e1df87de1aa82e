"""Trusted timing: judge runs on reserved CPUs of their own ([timing] cpus), one run per CPU,
the others waiting in order; what a result says of its time; repeat and rerun. Real
containers and cgroups. Orders and CPUs only, no timing thresholds: a run's start and end
are read inside it from /proc/uptime (hundredths of a second)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sandbox.engine import PoolConfig, RunOutcome, RunSpec
from sandbox.engine.cpuslots import TimingConfig
from sandbox.errors import PolicyError
from sandbox.runtime import hostload
from sandbox.runtime.profiles import Limits, format_cpuset, host_cpus
from sandbox.runtime.results import Status
from sandbox.runtime.run import CGROUP_PSI
from sandbox.tenants import Tenant
from tests.conftest import Session
from tests.integration.test_engine import Running, sh
from tests.integration.test_runtime_cgroup_v2 import v2_session  # noqa: F401 (a fixture)

T = Tenant("test")
HOST = host_cpus()
TWO = len(HOST) >= 2
BUSY = "while :; do :; done"

pytestmark = pytest.mark.skipif(not TWO, reason="needs two CPUs: one reserved, one not")


@dataclass
class Timed:
    """An engine with a [timing] config, and the image its runs use."""

    r: Running
    image: str

    def run(self, spec: RunSpec, policy: str = "judge") -> RunOutcome:
        out: RunOutcome = self.r.run(self.r.engine.run(self.image, spec, policy=policy,
                                                       tenant=T))
        return out


@contextmanager
def timed(tmp_path: Path, image: str, cpus: str | None) -> Iterator[Timed]:
    r = Running(tmp_path / "state", pools=PoolConfig(min_idle=0, max_idle=4),
                timing=TimingConfig(cpus=cpus))
    try:
        yield Timed(r, image)
    finally:
        r.close()


@pytest.fixture
def reserved_one(tmp_path: Path, images: Any) -> Iterator[Timed]:
    """CPU 1 reserved for judge runs; the others left to the rest."""
    with timed(tmp_path, images.oci, "1") as t:
        yield t


@pytest.fixture
def reserved_all(tmp_path: Path, images: Any) -> Iterator[Timed]:
    with timed(tmp_path, images.oci, format_cpuset(HOST)) as t:
        yield t


def where() -> str:
    """A script that prints the CPUs it may use and the one it is on (/proc/self/stat's
    field 39 is the CPU the task last ran on)."""
    return ("grep Cpus_allowed_list /proc/self/status | cut -f2; "
            "cut -d' ' -f39 /proc/self/stat")


def test_a_judge_run_runs_on_its_reserved_cpu(reserved_one: Timed) -> None:
    out = reserved_one.run(sh(where()))
    r = out.result
    assert r.status == Status.OK, r
    assert r.stdout.decode().split() == ["1", "1"]
    assert r.cpus == "1" and r.dedicated_cpu
    # cgroup v1 keeps no pressure per cgroup: the host's, when the kernel has PSI.
    assert r.measured_by["host_load"] in (hostload.HOST, None)
    assert r.host_load is None or 0 <= r.host_load <= 1


def test_other_policies_stay_off_the_reserved_cpu(reserved_one: Timed) -> None:
    rest = format_cpuset(HOST - {1})
    out = reserved_one.run(sh(where()), policy="default")
    r = out.result
    assert r.status == Status.OK, r
    allowed, on = r.stdout.decode().split()
    assert allowed == rest and int(on) != 1
    assert r.cpus == rest and not r.dedicated_cpu
    with pytest.raises(PolicyError, match=r"limits\.cpuset"):
        reserved_one.run(sh("true", limits=Limits(cpuset="1")), policy="default")


def test_a_sessions_exec_stays_off_the_reserved_cpu(reserved_one: Timed) -> None:
    """A session's exec takes no slot, whatever its policy: it gets the other CPUs."""
    eng = reserved_one.r
    s = eng.run(eng.engine.create_session(reserved_one.image, policy="judge", tenant=T))
    try:
        r = eng.run(eng.engine.sessions.exec(s.id, sh(where()))).result
        assert r.stdout.decode().split()[0] == format_cpuset(HOST - {1}), r
        assert r.cpus == format_cpuset(HOST - {1}) and not r.dedicated_cpu
    finally:
        eng.run(eng.engine.sessions.delete(s.id))


def test_a_run_cannot_widen_its_cpuset(reserved_one: Timed) -> None:
    """sched_setaffinity (taskset) onto every CPU: the cpuset keeps the run on its own."""
    every = format_cpuset(HOST)
    out = reserved_one.run(sh(f"taskset -c -p {every} $$ >/dev/null; {where()}"))
    r = out.result
    assert r.status == Status.OK, r
    assert r.stdout.decode().split() == ["1", "1"]


def test_concurrent_judge_runs_never_share_a_cpu(reserved_all: Timed) -> None:
    """Six runs at once on two slots: each on one CPU, and the runs on a CPU one after
    another (the uptime each read at its start and end never interleaves)."""
    script = ("read up _ < /proc/uptime; echo $up; " + where()
              + "; sleep 0.3; read up _ < /proc/uptime; echo $up")
    image = reserved_all.image

    async def many() -> list[RunOutcome]:
        return list(await asyncio.gather(*(
            reserved_all.r.engine.run(image, sh(script), policy="judge", tenant=T)
            for _ in range(6))))

    spans: dict[str, list[tuple[float, float]]] = {}
    for out in reserved_all.r.run(many()):
        r = out.result
        assert r.status == Status.OK, r
        start, allowed, on, end = r.stdout.decode().split()
        assert allowed == on == r.cpus and r.dedicated_cpu
        spans.setdefault(on, []).append((float(start), float(end)))
    assert set(spans) <= {str(c) for c in HOST}
    for runs in spans.values():
        runs.sort()
        for (_, end), (start, _) in itertools.pairwise(runs):
            assert end <= start, spans


def test_waiting_runs_go_in_order_and_their_wait_is_not_timed(reserved_one: Timed) -> None:
    """One slot, four runs asked in turn: they start in that order, and each ends ok
    within a wall limit smaller than the whole queue's time (the wait is not counted)."""
    image = reserved_one.image
    spec = sh("read up _ < /proc/uptime; echo $up; sleep 0.4",
              limits=Limits(wall_ms=1000))

    eng = reserved_one.r.engine

    async def queue() -> list[RunOutcome]:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(eng.run(image, spec, policy="judge", tenant=T)))
            # The next is asked once this one holds the slot or waits for it.
            while sum(eng.timing_info(T)["yours"].values()) <= i:
                await asyncio.sleep(0.005)
        return list(await asyncio.gather(*tasks))

    outs = reserved_one.r.run(queue())
    assert [o.result.status for o in outs] == [Status.OK] * 4, [o.result for o in outs]
    starts = [float(o.result.stdout.split()[0]) for o in outs]
    assert starts == sorted(starts)
    assert all(o.result.wall_ms < 1000 for o in outs)


def test_repeat_reports_the_spread_and_the_median_run(reserved_one: Timed) -> None:
    out = reserved_one.run(sh("echo hi", repeat=5))
    rep = out.repeats
    assert rep is not None and rep.n == 5 and rep.statuses == {"ok": 5}
    assert rep.cpu_ms is not None
    assert rep.cpu_ms.min <= rep.cpu_ms.median <= rep.cpu_ms.max
    assert rep.wall_ms.min <= rep.wall_ms.median <= rep.wall_ms.max
    assert 0 <= rep.main < 5 and out.result.stdout == b"hi\n"
    with pytest.raises(PolicyError, match="repeat"):
        reserved_one.run(sh("true", repeat=51))
    with pytest.raises(PolicyError, match="rerun_near_limit"):
        reserved_one.run(sh("true", repeat=2, rerun_near_limit=True))


def test_a_time_limit_near_its_limit_is_rerun_once(reserved_one: Timed) -> None:
    out = reserved_one.run(sh(BUSY, limits=Limits(cpu_ms=100), rerun_near_limit=True))
    assert out.result.status == Status.TIME_LIMIT and out.result.near_limit
    assert out.rerun is not None and out.rerun.status == Status.TIME_LIMIT
    plain = reserved_one.run(sh(BUSY, limits=Limits(cpu_ms=100)))
    assert plain.rerun is None and plain.result.near_limit
    ok = reserved_one.run(sh("true", rerun_near_limit=True))
    assert ok.result.status == Status.OK and ok.rerun is None and not ok.result.near_limit


def test_without_a_reservation_runs_share_every_cpu(tmp_path: Path, images: Any) -> None:
    with timed(tmp_path, images.oci, None) as t:
        out = t.run(sh(where()))
        assert out.result.cpus == format_cpuset(HOST) and not out.result.dedicated_cpu
        assert out.result.stdout.decode().split()[0] == format_cpuset(HOST)
        assert t.r.engine.timing_info(T)["cpus"] is None


def test_a_tenant_sees_only_its_own_slot_use(reserved_one: Timed) -> None:
    other = Tenant("other")
    image = reserved_one.image
    eng = reserved_one.r.engine

    async def look() -> tuple[dict[str, Any], dict[str, Any]]:
        task = asyncio.ensure_future(eng.run(image, sh("sleep 0.5"), policy="judge",
                                             tenant=T))
        while eng.timing_info(T)["yours"]["running"] == 0:
            await asyncio.sleep(0.01)
        mine, theirs = eng.timing_info(T), eng.timing_info(other)
        await task
        return mine, theirs

    mine, theirs = reserved_one.r.run(look())
    assert mine["yours"] == {"running": 1, "waiting": 0}
    assert theirs["yours"] == {"running": 0, "waiting": 0}
    assert theirs["cpus"] == "1" and theirs["enforced_by"] == "cpuset"


def test_a_tenant_behind_anothers_burst_goes_next(reserved_one: Timed) -> None:
    """One slot: T's four runs wait behind T's first; the other tenant's run, asked last,
    starts right after T's first waiting one (tenants take turns), not after all four."""
    eng, image = reserved_one.r.engine, reserved_one.image
    other = Tenant("other")
    spec = sh("read up _ < /proc/uptime; echo $up; sleep 0.2")

    async def burst() -> tuple[list[RunOutcome], RunOutcome]:
        first = asyncio.ensure_future(eng.run(image, spec, policy="judge", tenant=T))
        while not eng.timing_info(T)["yours"]["running"]:
            await asyncio.sleep(0.005)
        mine = []
        for i in range(4):
            mine.append(asyncio.ensure_future(eng.run(image, spec, policy="judge", tenant=T)))
            while eng.timing_info(T)["yours"]["waiting"] <= i:
                await asyncio.sleep(0.005)
        theirs = asyncio.ensure_future(eng.run(image, spec, policy="judge", tenant=other))
        while not eng.timing_info(other)["yours"]["waiting"]:
            await asyncio.sleep(0.005)
        await first
        return list(await asyncio.gather(*mine)), await theirs

    mine, theirs = reserved_one.r.run(burst())
    starts = sorted([float(o.result.stdout.split()[0]) for o in mine])
    start = float(theirs.result.stdout.split()[0])
    assert starts[0] <= start <= starts[1], (starts, start)


def test_on_cgroup_v2_host_load_is_the_runs_own_waiting(
        v2_session: Session, busybox_root: Path) -> None:  # noqa: F811 (the fixture)
    """The run cgroup's cpu.pressure: how long the run itself waited for a CPU."""
    c = v2_session.container(busybox_root, profile="judge")
    r = v2_session.exec(c, ["sh", "-c", BUSY], cpu_ms=100)
    assert r.status == Status.TIME_LIMIT
    if r.host_load is None:
        pytest.skip("this kernel keeps no CPU pressure (PSI)")
    assert r.measured_by["host_load"] == CGROUP_PSI and 0 <= r.host_load <= 1
