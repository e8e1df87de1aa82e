"""Fixtures shared by the runtime suites: one Runtime per session on its own event loop, a
busybox root filesystem, containers that are always destroyed, and an end-of-session check
that nothing of ours is left behind."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.profiles import Limits
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult
from sandbox.runtime.spawnerclient import Runtime
from testbed import busybox

pytest_plugins = ["tests.support.fixtures"]

T = TypeVar("T")


def shared_dir() -> Path:
    """The steering repository's shared/ folder (data such as Docker's seccomp profile)."""
    env = os.environ.get("SANDBOXD_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


class Session:
    """Runs the async runtime from synchronous tests on one event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.runtime: Runtime = self.run(Runtime.start())
        self.containers: list[Container] = []

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def container(self, layers: list[Path] | Path, profile: str = "default",
                  writable: bool | None = None) -> Container:
        if isinstance(layers, Path):
            layers = [layers]
        c = self.run(self.runtime.create_container(
            ContainerSpec(layers=tuple(str(p) for p in layers), policy=profile,
                          writable=writable)))
        self.containers.append(c)
        return c

    def exec(self, container: Container, argv: list[str], *, stdin: bytes | None = None,
             env: dict[str, str] | None = None, cwd: str = "/", uid: int | None = None,
             **limits: Any) -> RunResult:
        req = ExecRequest(argv=argv, env=env if env is not None else {"PATH": "/bin"},
                          cwd=cwd, stdin=stdin, limits=Limits(**limits) if limits else None,
                          uid=uid)
        return self.run(container.exec(req))

    def close(self) -> None:
        for c in self.containers:
            self.run(c.destroy())
        self.run(self.runtime.close())
        self.loop.close()


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {" ".join(line.split()[3:5]) for line in f}


def _temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("sandboxd-*")}


@pytest.fixture(scope="session")
def session() -> Iterator[Session]:
    """The runtime for the whole session; at its end nothing of ours may remain."""
    procs_before = {p.pid for p in psutil.Process().children(recursive=True)}
    mounts_before, temps_before = _mounts(), _temp_dirs()
    s = Session()
    yield s
    driver = s.runtime.cgroups.driver
    for c in s.containers:
        s.run(c.destroy())
    # Only this session's own: root's runtimes share a base with any other on the host.
    ours = {f"c-{c.id}" for c in s.containers}
    cgroups_left = sorted(ours & set(driver.list())) if driver is not None else []
    s.close()
    assert cgroups_left == [], f"cgroups left behind: {cgroups_left}"
    leftover = [p for p in psutil.Process().children(recursive=True)
                if p.pid not in procs_before]
    assert not leftover, f"processes left behind: {leftover}"
    assert _mounts() - mounts_before == set(), "mounts left in the host's namespace"
    assert _temp_dirs() - temps_before == set(), "temporary directories left behind"


@pytest.fixture(scope="session")
def busybox_root(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    m = session.runtime.mapping
    return busybox.build_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs",
                                owner=(m.root_uid, m.root_gid))


@pytest.fixture
def container(session: Session, busybox_root: Path) -> Iterator[Container]:
    c = session.container(busybox_root)
    yield c
    session.run(c.destroy())


@pytest.fixture
def judge_container(session: Session, busybox_root: Path) -> Iterator[Container]:
    c = session.container(busybox_root, profile="judge")
    yield c
    session.run(c.destroy())
