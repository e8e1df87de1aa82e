"""The engine: runs from images pulled on first use, warm pools, sessions. Real registry,
real containers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox.engine import Engine, EngineConfig, FileSpec, PoolConfig, RunSpec
from sandbox.errors import CapacityError, NotFound, PolicyError
from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.results import Status
from sandbox.tenants import Tenant

REPO = Path(__file__).resolve().parents[2]
T = Tenant("test")


class Running:
    """An engine on its own event loop, driven from synchronous tests."""

    def __init__(self, state: Path, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine: Engine = self.run(Engine.start(EngineConfig(state_dir=state, **kw)))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        """Let background resets and refills finish."""
        async def wait() -> None:
            while self.engine.pools._tasks:
                await asyncio.gather(*self.engine.pools._tasks, return_exceptions=True)
        self.run(wait())

    def close(self) -> None:
        self.run(self.engine.close())
        self.loop.close()


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path / "state", pools=PoolConfig(min_idle=1, max_idle=2))
    yield r
    r.close()


def sh(script: str, **kw: Any) -> RunSpec:
    return RunSpec(cmd=["sh", "-c", script], env={"PATH": "/bin"}, **kw)


def test_the_first_run_pulls_then_runs_hit_the_pool(eng: Running, images: Any) -> None:
    first = eng.run(eng.engine.run(images.oci, sh("echo one"), policy="judge", tenant=T))
    assert first.result.stdout == b"one\n" and first.result.status == Status.OK
    assert not first.pool_hit
    eng.settle()
    hits = []
    for i in range(5):
        out = eng.run(eng.engine.run(images.oci, sh(f"echo {i}"), policy="judge", tenant=T))
        assert out.result.stdout == f"{i}\n".encode()
        hits.append(out.pool_hit)
        eng.settle()
    assert all(hits)
    (stats,) = eng.engine.pools.stats()
    assert stats["hits"] == 5 and stats["misses"] == 1 and stats["policy"] == "judge"


def test_a_reused_container_carries_nothing_over(eng: Running, images: Any) -> None:
    eng.run(eng.engine.run(images.oci, sh("echo secret > /tmp/left; (sleep 1000 &) ; "
                                           "export LEAK=1"), policy="judge", tenant=T))
    eng.settle()
    out = eng.run(eng.engine.run(images.oci, sh(
        "ls -A /tmp; ps -o pid= | wc -l; echo LEAK=$LEAK"), policy="judge", tenant=T))
    assert out.pool_hit
    lines = out.result.stdout.decode().split()
    assert "left" not in lines
    # Only init, the shell, ps and wc: no sleep left from the previous run.
    assert int(lines[-2]) <= 4, out.result.stdout
    assert lines[-1] == "LEAK="


def test_a_writable_root_container_is_never_reused(eng: Running, images: Any) -> None:
    a = eng.run(eng.engine.run(images.oci, sh("echo x > /mark; cat /proc/1/stat | "
                                              "cut -d' ' -f22"), policy="default", tenant=T))
    eng.settle()
    b = eng.run(eng.engine.run(images.oci, sh("cat /mark 2>&1; cat /proc/1/stat | "
                                              "cut -d' ' -f22"), policy="default", tenant=T))
    assert b.result.stdout != a.result.stdout  # another init, started at another time
    assert b"No such file" in b.result.stdout


def test_a_loan_gives_its_container_back_and_destroys_it_when_the_block_raises(
        eng: Running, images: Any) -> None:
    engine = eng.engine
    image = eng.run(engine.image(images.oci, tenant=T))
    judge = engine.policy("judge")

    async def borrow(fail: bool) -> tuple[Container, bool]:
        loan = engine.pools.lend(image, judge, T)
        with contextlib.suppress(RuntimeError):
            async with loan as container:
                if fail:
                    raise RuntimeError("the run failed")
        return container, loan.warm

    kept, warm = eng.run(borrow(fail=False))
    eng.settle()
    assert not warm and kept.alive
    (stats,) = engine.pools.stats()
    assert (stats["busy"], stats["idle"]) == (0, 1), stats
    dropped, warm = eng.run(borrow(fail=True))
    eng.settle()
    assert warm and dropped is kept and not dropped.alive
    (stats,) = engine.pools.stats()
    # Another warmed in its place.
    assert (stats["busy"], stats["idle"], stats["created"]) == (0, 1, 2), stats


def test_a_run_keeps_the_policy_it_was_given(eng: Running, images: Any) -> None:
    """Resolved once: the registry's profile of that name changing afterwards reaches
    neither the run, nor its container, nor the limits of its exec."""
    engine = eng.engine
    given = engine.policy("judge")
    engine.runtime.policies.register(dataclasses.replace(
        given.profile, defaults=dataclasses.replace(given.profile.defaults, output_bytes=1)))
    out = eng.run(engine.run(images.oci, sh("echo twelve bytes"), policy=given, tenant=T))
    assert out.result.stdout == b"twelve bytes\n" and not out.result.stdout_truncated


def test_an_interactive_run_waits_on_its_user_not_on_the_default_clock(
        eng: Running, images: Any) -> None:
    """A run fed as it goes (stdin a descriptor: the WebSocket, `sbx run -it`) gets the
    policy's maxima for wall time, CPU time and output unless it asks; a batch run of the
    same policy gets its defaults."""
    engine = eng.engine
    judge = engine.policy("judge").profile
    engine.runtime.policies.register(dataclasses.replace(
        judge, name="judge-short",
        defaults=dataclasses.replace(judge.defaults, wall_ms=300, output_bytes=4)))
    script = "sleep 1; echo twelve bytes"

    def run(stdin: int | None, limits: Limits | None = None) -> Any:
        return eng.run(engine.run(images.oci, sh(script, stdin=stdin, limits=limits),
                                  policy="judge-short", tenant=T)).result

    batch = run(None)
    assert batch.status == Status.WALL_LIMIT, batch
    r, w = os.pipe()
    try:
        typed = run(r)
        asked = run(r, Limits(wall_ms=300))
    finally:
        os.close(r)
        os.close(w)
    assert typed.status == Status.OK and typed.stdout == b"twelve bytes\n", typed
    assert asked.status == Status.WALL_LIMIT, asked


def test_files_and_image_defaults(eng: Running, images: Any) -> None:
    out = eng.run(eng.engine.run(images.oci, RunSpec(
        cmd=["cat", "/tmp/in.txt"], files=(FileSpec("/tmp/in.txt", b"given\n"),)),
        policy="judge", tenant=T))
    assert out.result.stdout == b"given\n", out.result


def test_limits_above_the_policy_maxima_are_refused(eng: Running, images: Any) -> None:
    with pytest.raises(PolicyError, match="cpu_ms"):
        eng.run(eng.engine.run(images.oci, sh("true", limits=Limits(cpu_ms=10**9)),
                               policy="judge", tenant=T))
    with pytest.raises(PolicyError, match="network"):
        eng.run(eng.engine.run(images.oci, sh("true"), network="host", tenant=T))
    with pytest.raises(PolicyError):
        eng.run(eng.engine.run(images.oci, sh("true"), policy="no-such-policy", tenant=T))


def test_sessions_exec_many_times_and_expire(tmp_path: Path, images: Any) -> None:
    r = Running(tmp_path / "s", session_idle_s=1.0)
    try:
        s = r.run(r.engine.create_session(images.oci, policy="default", tenant=T))
        r.run(r.engine.sessions.exec(s.id, sh("echo kept > /tmp/f")))
        out = r.run(r.engine.sessions.exec(s.id, sh("cat /tmp/f"))).result
        assert out.stdout == b"kept\n"
        assert [x.describe()["id"] for x in r.engine.sessions.list()] == [s.id]
        r.run(asyncio.sleep(3.5))
        with pytest.raises(NotFound):
            r.engine.sessions.get(s.id)
        assert not s.container.alive
        # A run longer than the idle time keeps its session: it is in use, not idle.
        s = r.run(r.engine.create_session(images.oci, policy="default", tenant=T))
        out = r.run(r.engine.sessions.exec(s.id, sh("sleep 3.5; echo still here"))).result
        assert (out.status, out.stdout) == (Status.OK, b"still here\n")
        assert r.engine.sessions.get(s.id) is s
    finally:
        r.close()


def test_a_session_keeps_its_image_from_gc(eng: Running, images: Any) -> None:
    s = eng.run(eng.engine.create_session(images.shared_a, policy="judge", tenant=T))
    eng.engine.images.remove(images.shared_a, force=True, tenant=T)
    eng.engine.images.gc(budget_bytes=0, tenant=T)
    out = eng.run(eng.engine.sessions.exec(s.id, sh("echo alive"))).result
    assert out.stdout == b"alive\n"
    eng.run(eng.engine.sessions.delete(s.id))


def test_session_files_in_and_out(eng: Running, images: Any) -> None:
    s = eng.run(eng.engine.create_session(images.oci, policy="judge", tenant=T))
    eng.run(eng.engine.sessions.put_file(s.id, "/tmp/job/input.txt", b"3 4\n"))
    out = eng.run(eng.engine.sessions.exec(s.id, sh("read a b < /tmp/job/input.txt; "
                                           "echo $((a*b)) > /tmp/job/out.txt"))).result
    assert out.status == Status.OK, out

    async def read(path: str) -> tuple[str, bytes]:
        async with eng.engine.sessions.get_path(s.id, path) as got:
            return got.kind, await got.read()
    assert eng.run(read("/tmp/job/out.txt")) == ("file", b"12\n")
    assert eng.run(read("/tmp/job"))[0] == "dir"
    eng.run(eng.engine.sessions.delete(s.id))
    with pytest.raises(NotFound):
        eng.engine.sessions.get_path(s.id, "/tmp/job/out.txt")


def _cgroup_dirs(cid: str) -> list[Path]:
    return list(Path("/sys/fs/cgroup").glob(f"*/sandboxd*/c-{cid}"))


def test_an_instance_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path: Path,
                                                                    images: Any) -> None:
    state = tmp_path / "crashy"
    script = textwrap.dedent(f"""
        import asyncio, os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(REPO)!r})
        from sandbox.engine import Engine, EngineConfig
        from sandbox.tenants import LOCAL
        async def main():
            e = await Engine.start(EngineConfig(state_dir=Path({str(state)!r})))
            s = await e.create_session({images.oci!r}, policy="judge", tenant=LOCAL)
            print(s.container.id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr
    cid = proc.stdout.split()[0]
    assert (state / "containers" / cid).exists()
    left = _cgroup_dirs(cid)
    if os.geteuid() == 0:  # as root the memory hierarchy is known: it must be there now
        assert left, "the killed instance's cgroup should outlive it"
    r = Running(state)
    try:
        assert not (state / "containers" / cid).exists()
        driver = r.engine.runtime.cgroups.driver
        if driver is not None:
            assert f"c-{cid}" not in driver.list()
        assert not any(p.exists() for p in left)
    finally:
        r.close()


def test_the_container_cap_refuses_with_a_capacity_error(tmp_path: Path, images: Any) -> None:
    r = Running(tmp_path / "cap", pools=PoolConfig(min_idle=0, max_idle=0, max_live=1))
    try:
        s = r.run(r.engine.create_session(images.oci, policy="judge", tenant=T))
        with pytest.raises(CapacityError, match="max_live"):
            r.run(r.engine.run(images.oci, sh("true"), policy="judge", tenant=T))
        r.run(r.engine.sessions.delete(s.id))
        out = r.run(r.engine.run(images.oci, sh("echo ok"), policy="judge", tenant=T))
        assert out.result.stdout == b"ok\n"
    finally:
        r.close()


def test_sequential_runs_on_a_warm_pool_start_no_container(tmp_path: Path,
                                                           images: Any) -> None:
    """A reused container on its way back counts as warm: no start-and-destroy per run."""
    r = Running(tmp_path / "churn", pools=PoolConfig(min_idle=3, max_idle=3))
    try:
        r.run(r.engine.run(images.oci, sh("true"), policy="judge", tenant=T))
        r.settle()
        (before,) = r.engine.pools.stats()
        for _ in range(10):
            assert r.run(r.engine.run(images.oci, sh("true"), policy="judge", tenant=T)).pool_hit
            r.settle()
        (after,) = r.engine.pools.stats()
        assert after["created"] == before["created"] == 3
        assert after["idle"] == 3
    finally:
        r.close()


def test_a_container_is_warm_again_as_its_run_ends(tmp_path: Path, images: Any) -> None:
    """Init resets a pool container as its run ends, before it reads the next request: runs
    back to back (nothing in between to let a reset finish) reuse the one container, and
    none sees what the one before it left."""
    r = Running(tmp_path / "again", pools=PoolConfig(min_idle=1, max_idle=1))
    try:
        r.run(r.engine.run(images.oci, sh("true"), policy="judge", tenant=T))
        r.settle()
        (before,) = r.engine.pools.stats()

        async def back_to_back() -> list[Any]:
            return [await r.engine.run(images.oci, sh(
                f"ls /tmp; echo {i} > /tmp/left-{i}; sleep 100 & echo ok"), policy="judge",
                tenant=T)
                for i in range(4)]

        outs = r.run(back_to_back())
        (after,) = r.engine.pools.stats()
        assert [o.result.stdout for o in outs] == [b"ok\n"] * 4
        assert all(o.pool_hit for o in outs)
        assert after["created"] == before["created"] and after["misses"] == before["misses"]
    finally:
        r.close()


def test_a_request_cannot_believe_it_got_another_network_than_its_policy(
        eng: Running, images: Any) -> None:
    judge = eng.engine.runtime.policies.profile("judge")
    eng.engine.runtime.policies.register(dataclasses.replace(judge, name="hostnet",
                                                             network="host"))
    with pytest.raises(PolicyError, match="runs with network 'host', not 'none'"):
        eng.run(eng.engine.run(images.oci, sh("true"), policy="hostnet",
                               network="none", tenant=T))
    assert eng.run(eng.engine.run(images.oci, sh("echo ok"), policy="judge",
                                  network="none", tenant=T)).result.stdout == b"ok\n"
