"""Fixtures for the security probes: a busybox root holding the compiled probes at /probes,
containers to run them in, and host-side things that must stay out of reach."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.runtime import idmap
from sandbox.runtime.container import Container
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import RunResult
from sandbox.runtime.spawnerclient import Runtime
from testbed import busybox
from tests.conftest import Session
from tests.security.probes.build import build_probes

SETUID_PROBE = "/probes/setuid-root"


@pytest.fixture(scope="session")
def probe_root(session: Session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the probes: apt-get install gcc")
    m = session.runtime.mapping
    root = busybox.build_rootfs(tmp_path_factory.mktemp("probes") / "rootfs")
    probes = build_probes(root / "probes")
    # A setuid-root copy: owned by container root, which the run uid must not become.
    shutil.copy2(probes["setuid"], root / SETUID_PROBE.lstrip("/"))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.lchown(os.path.join(dirpath, name), m.root_uid, m.root_gid)
    os.lchown(root, m.root_uid, m.root_gid)
    os.chmod(root / SETUID_PROBE.lstrip("/"), 0o4755)
    return root


@pytest.fixture(scope="session")
def _probe_containers(session: Session, probe_root: Path) -> Iterator[dict[str, Container]]:
    made: dict[str, Container] = {}
    yield made
    for c in made.values():
        session.run(c.destroy())


def _exec(session: Session, c: Container, name: str, args: tuple[str, ...],
          env: dict[str, str] | None) -> RunResult:
    path = name if name.startswith("/") else f"/probes/{name}"
    return session.run(c.exec(ExecRequest(
        argv=[path, *args], env=env if env is not None else {"PATH": "/bin"})))


@pytest.fixture(params=["judge", "default"])
def probe_run(request: pytest.FixtureRequest, session: Session, probe_root: Path,
              _probe_containers: dict[str, Container]) -> Callable[..., RunResult]:
    """Run a probe in a container reset after every run, as the warm pools use them: every
    probe test runs under both policies, a read-only root and a writable one."""

    def run(name: str, *args: str, env: dict[str, str] | None = None) -> RunResult:
        profile = request.param
        c = _probe_containers.get(profile)
        if c is None or not c.alive:
            c = _probe_containers[profile] = session.container(probe_root, profile=profile)
        try:
            return _exec(session, c, name, args, env)
        finally:
            session.run(c.reset())

    return run


@pytest.fixture
def container_factory(session: Session, probe_root: Path) -> Iterator[Callable[[], Container]]:
    made: list[Container] = []

    def make() -> Container:
        c = session.container(probe_root, profile="judge")
        made.append(c)
        return c

    yield make
    for c in made:
        session.run(c.destroy())


@pytest.fixture
def probe_exec(session: Session) -> Callable[..., RunResult]:
    def run(container: Container, name: str, *args: str,
            env: dict[str, str] | None = None) -> RunResult:
        return _exec(session, container, name, args, env)

    return run


@pytest.fixture
def host_listener() -> Iterator[tuple[int, str]]:
    """A TCP port on the host's 127.0.0.1 and an abstract unix socket, both listening."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    name = f"sandboxd-test-{os.getpid()}-{os.urandom(4).hex()}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + name)
    unix.listen()
    try:
        yield tcp.getsockname()[1], name
    finally:
        tcp.close()
        unix.close()


@pytest.fixture
def host_marker() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sandboxd-marker-"))
    marker = d / "host-secret"
    marker.write_text("host secret\n")
    try:
        yield marker
    finally:
        shutil.rmtree(d)


@pytest.fixture
def setuid_probe_path() -> str:
    return SETUID_PROBE


@pytest.fixture(scope="module")
def runtimes(session: Session) -> Iterator[dict[str, Runtime]]:
    """The session's runtime, and one whose map holds a single id (container root, mapped
    to the same host id, so the probe root is its own)."""
    m = session.runtime.mapping
    single = idmap.IdMapping("single", (idmap.IdRange(0, m.root_uid, 1),),
                             (idmap.IdRange(0, m.root_gid, 1),), 0, 0)
    rt = session.run(Runtime.start(mapping=single))
    yield {"plan": session.runtime, "single": rt}
    session.run(rt.close())
