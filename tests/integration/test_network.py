"""A container's network (issue #15 pt2), through the real runtime: `proxy` (a listener in the
container's own network namespace, the host's filtering proxy behind it) and `full`
(slirp4netns, the blocked ranges and the host's addresses unreachable); `none` reaches
nothing. Local servers only.

For the proxy, the "outside" server listens on 127.7.0.1 and the tests block 127.0.0.0/16
instead of 127.0.0.0/8: loopback addresses every identity can bind, one of them treated as
a host elsewhere, the rest (the service's own 127.0.0.1 among them) as the host's loopback.
For `full`, the outside server is in a network namespace of its own behind a veth pair,
which only root can make; an ordinary user still checks that nothing blocked answers."""

from __future__ import annotations

import contextlib
import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from sandbox.errors import RuntimeSetupError
from sandbox.runtime.container import Container
from sandbox.runtime.network import FULL, PROXY, PROXY_PORT, Allowlist, proxy_env
from sandbox.runtime.network.rules import DEFAULT_BLOCKED, Blocked
from sandbox.runtime.network.slirp import problem
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult
from testbed.ports import free_port
from tests.conftest import Session
from tests.support.netns import NETNS_DIR, network_namespace

OUTSIDE = "127.7.0.1"
# The default ranges, with the host's loopback narrowed so that OUTSIDE is not in them.
TEST_BLOCKED = (*(n for n in DEFAULT_BLOCKED if n != "127.0.0.0/8"), "127.0.0.0/16")
# A direct HTTP request from busybox (its wget crashes on a refused connection with -T).
GET = "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello {self.server.server_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_server(address: str) -> Iterator[int]:
    """A plain HTTP server on `address` answering "hello ADDRESS"; yields its port."""
    server = http.server.ThreadingHTTPServer((address, 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Net:
    session: Session
    container: Container

    def run(self, script: str, env: dict[str, str] | None = None) -> RunResult:
        return self.session.run(self.container.exec(ExecRequest(
            argv=["sh", "-c", script], env={"PATH": "/bin", **(env or {})})))


def _make(session: Session, root: Path, mode: str) -> Container:
    return session.run(session.runtime.create_container(ContainerSpec(
        layers=(str(root),), policy="judge", network=mode)))


@pytest.fixture
def blocked(session: Session) -> Iterator[None]:
    before = session.runtime.proxy.blocked
    session.runtime.proxy.blocked = Blocked.parse(TEST_BLOCKED)
    yield
    session.runtime.proxy.blocked = before


@pytest.fixture
def proxied(session: Session, busybox_root: Path, blocked: None) -> Iterator[Net]:
    c = _make(session, busybox_root, PROXY)
    yield Net(session, c)
    session.run(c.destroy())


def _through_proxy(net: Net, allow: list[str], script: str) -> tuple[RunResult, object]:
    assert net.container.network is not None
    net.container.network.begin(Allowlist.parse(allow))
    try:
        result = net.run(script, proxy_env())
    finally:
        traffic = net.container.network.end()
    return result, traffic


def test_proxy_lets_an_allowed_host_answer_and_refuses_the_rest(proxied: Net) -> None:
    with http_server(OUTSIDE) as port, http_server(OUTSIDE) as other:
        r, traffic = _through_proxy(proxied, [f"{OUTSIDE}:{port}"], f"""
            wget -q -O- http://{OUTSIDE}:{port}/a; echo "allowed=$?"
            wget -q -O- http://{OUTSIDE}:{other}/b 2>&1; echo "other port=$?"
            printf 'CONNECT {OUTSIDE}:{port} HTTP/1.1\\r\\n\\r\\nGET /c HTTP/1.0\\r\\n\\r\\n' \\
                | nc 127.0.0.1 {PROXY_PORT}
            """)
    out = r.stdout.decode()
    assert f"hello {OUTSIDE}\nallowed=0" in out, out
    assert "403 Forbidden" in out and "other port=1" in out, out
    # CONNECT (HTTPS's way) opens a tunnel to the allowed host:port, and only there.
    assert "200 Connection established" in out and out.count(f"hello {OUTSIDE}") == 2, out
    assert traffic.connections == 2 and traffic.denied == 1, traffic
    assert traffic.bytes_sent > 0 and traffic.bytes_received > 0, traffic


def test_proxy_names_the_host_and_the_setting_in_its_403(proxied: Net) -> None:
    r, _ = _through_proxy(proxied, ["example.org"], f"""
        printf 'GET http://{OUTSIDE}:81/ HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n' \\
            | nc 127.0.0.1 {PROXY_PORT}""")
    assert b"403 Forbidden" in r.stdout, r
    assert f"{OUTSIDE}:81 is not on this sandbox's allowlist".encode() in r.stdout
    assert b"[network] proxy_hosts" in r.stdout


def test_the_hosts_loopback_is_never_reached_even_when_listed(proxied: Net) -> None:
    """The service's own API and other loopback services: refused by the proxy after it
    resolves the name (localhost, a literal 127.0.0.1, 0.0.0.0), and not there at all for a
    direct connection (the container's 127.0.0.1 is its own)."""
    with http_server("127.0.0.1") as port:
        r, traffic = _through_proxy(
            proxied, [f"127.0.0.1:{port}", f"localhost:{port}", f"0.0.0.0:{port}"], f"""
            for h in 127.0.0.1 localhost 0.0.0.0; do
                wget -q -O- http://$h:{port}/ 2>&1; echo "$h=$?"
            done
            {GET} 127.0.0.1 {port} 2>&1; echo "direct=$?"
            """)
    out = r.stdout.decode()
    for h in ("127.0.0.1", "localhost", "0.0.0.0"):
        assert f"{h}=1" in out, out
    assert "hello" not in out, out
    assert "direct=1" in out and "Connection refused" in out, out
    assert traffic.denied == 3 and traffic.connections == 0, traffic


def test_a_run_never_gets_the_allowlist_of_the_run_before(proxied: Net) -> None:
    """Run A (one tenant's allowlist) then run B in the same warm container (another's):
    B's request to A's host is refused, and A's figures are not B's."""
    with http_server(OUTSIDE) as port:
        script = f"wget -q -O- http://{OUTSIDE}:{port}/ 2>&1; echo rc=$?"
        a, ta = _through_proxy(proxied, [f"{OUTSIDE}:{port}"], script)
        b, tb = _through_proxy(proxied, ["example.org"], script)
    assert b"hello" in a.stdout and b"rc=0" in a.stdout, a
    assert b"403" in b.stdout and b"hello" not in b.stdout, b
    assert (ta.connections, ta.denied, tb.connections, tb.denied) == (1, 0, 0, 1)


def test_between_runs_the_proxy_takes_no_connection(proxied: Net) -> None:
    """No run current: a connection is accepted and closed at once (nothing is relayed)."""
    with http_server(OUTSIDE) as port:
        r = proxied.run(f"wget -q -O- http://{OUTSIDE}:{port}/ 2>&1; echo rc=$?",
                        proxy_env())
    assert b"hello" not in r.stdout and b"rc=1" in r.stdout, r


def test_none_reaches_nothing(session: Session, container: Container) -> None:
    with http_server(OUTSIDE) as port:
        r = Net(session, container).run(f"""
            {GET} {OUTSIDE} {port} 2>&1; echo "loopback=$?"
            {GET} 192.0.2.1 80 2>&1; echo "away=$?"
            ip -o link | cut -d: -f2""")
    out = r.stdout.decode()
    assert "loopback=1" in out and "away=1" in out and "hello" not in out, out
    assert out.split()[-1] == "lo", out


# full


FULL_PROBLEM = problem()  # None where `full` works for this user
needs_tun = pytest.mark.skipif(FULL_PROBLEM is not None,
                               reason=f"`full` cannot work here: {FULL_PROBLEM}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def outside_host() -> Iterator[tuple[str, str]]:
    """A host elsewhere (root only): a network namespace behind a veth pair, with an address
    outside the blocked ranges (198.18.0.0/15, for benchmarks). Yields (its address, the
    host's end's address, which is this host's own)."""
    here, there = "198.18.7.1", "198.18.7.2"
    # Deleting the namespace deletes the veth pair whose end it holds.
    with network_namespace(f"sbxnet{os.getpid()}") as name:
        _ip("link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0", "netns", name)
        _ip("addr", "add", f"{here}/30", "dev", f"{name}h")
        _ip("link", "set", f"{name}h", "up")
        for args in (("addr", "add", f"{there}/30", "dev", "eth0"),
                     ("link", "set", "eth0", "up"), ("link", "set", "lo", "up")):
            _ip("-n", name, *args)
        yield name, there, here


@contextlib.contextmanager
def server_in(netns: str, address: str, port: int) -> Iterator[None]:
    proc = subprocess.Popen(
        ["nsenter", f"--net={NETNS_DIR}/{netns}", "--", "python3", "-m", "http.server",
         "--bind", address, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            done = subprocess.run(["nsenter", f"--net={NETNS_DIR}/{netns}", "--", "python3",
                                   "-c", f"import socket; socket.create_connection(('{address}',"
                                   f" {port}), 1)"], capture_output=True, timeout=30)
            if done.returncode == 0:
                break
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def _slirps() -> set[int]:
    found = set()
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # one that ended meanwhile
            if p.name() == "slirp4netns":
                found.add(p.pid)
    return found


@pytest.fixture
def full(session: Session, busybox_root: Path, blocked: None) -> Iterator[Net]:
    c = _make(session, busybox_root, FULL)
    yield Net(session, c)
    session.run(c.destroy())


@needs_tun
def test_full_reaches_no_loopback_no_blocked_range_and_cannot_undo_it(full: Net) -> None:
    assert _slirps(), "no slirp4netns serves the container"
    with http_server("127.0.0.1") as port:
        r = full.run(f"""
            {GET} 10.0.2.2 {port} 2>&1; echo "gateway=$?"
            {GET} 192.168.77.1 {port} 2>&1; echo "private=$?"
            ip route del unreachable 192.168.0.0/16 2>&1; echo "del=$?"
            ip route add 192.168.77.0/24 dev tap0 2>&1; echo "add=$?"
            ip link set tap0 down 2>&1; echo "down=$?"
            ip route""")
    out = r.stdout.decode()
    assert "hello" not in out and "gateway=1" in out and "private=1" in out, out
    assert out.count("Operation not permitted") == 3, out
    assert "del=0" not in out and "add=0" not in out and "down=0" not in out, out
    assert "unreachable 192.168.0.0/16" in out, out


@needs_tun
def test_full_reaches_a_host_elsewhere_but_not_this_hosts_addresses(
        session: Session, busybox_root: Path, blocked: None) -> None:
    if os.geteuid() != 0:
        pytest.skip("a host elsewhere is a network namespace behind a veth pair, which only "
                    "root can make here; an ordinary user has no address that is neither "
                    "blocked nor this host's own")
    port = free_port()
    with outside_host() as (netns, there, here), server_in(netns, there, port), \
            http_server(here) as local:
        c = _make(session, busybox_root, FULL)
        try:
            assert c.network is not None
            c.network.begin(Allowlist())
            r = Net(session, c).run(f"""
                {GET} {there} {port} | grep -q '200 OK'; echo "elsewhere=$?"
                {GET} {here} {local} 2>&1; echo "this host=$?"
                """)
            traffic = c.network.end()
        finally:
            session.run(c.destroy())
    out = r.stdout.decode()
    assert "elsewhere=0" in out, out
    assert "this host=1" in out and "hello" not in out, out
    assert traffic.bytes_received > 0 and traffic.bytes_sent > 0, traffic


@needs_tun
def test_full_leaves_no_slirp4netns_behind(session: Session, busybox_root: Path,
                                           blocked: None) -> None:
    before = _slirps()
    c = _make(session, busybox_root, FULL)
    started = _slirps() - before
    assert len(started) == 1
    session.run(c.destroy())
    for _ in range(200):
        if not started & _slirps():
            break
        time.sleep(0.01)
    assert not started & _slirps()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_proxy_and_full_containers_leave_no_descriptor_behind(
        session: Session, busybox_root: Path, blocked: None) -> None:
    """The service's and the spawner's descriptors (listener, exit pipe, namespaces) are
    all closed once the container is destroyed."""
    spawner = session.runtime.spawner.pid
    assert spawner is not None
    modes = [PROXY, FULL] if FULL_PROBLEM is None else [PROXY]

    def each() -> None:
        for mode in modes:
            c = _make(session, busybox_root, mode)
            assert c.network is not None
            c.network.begin(Allowlist())
            Net(session, c).run("true", proxy_env())
            c.network.end()
            session.run(c.destroy())

    each()  # once first: what the runtime opens once and keeps (PSI's file) is not counted
    before = (_fds(os.getpid()), _fds(spawner))
    each()
    assert (_fds(os.getpid()), _fds(spawner)) == before


def test_full_without_a_usable_tun_fails_saying_why_and_leaves_nothing(
        session: Session, busybox_root: Path, blocked: None) -> None:
    if FULL_PROBLEM is None:
        pytest.skip("/dev/net/tun is usable here: `full` works (the tests above)")
    spawner = session.runtime.spawner.pid
    assert spawner is not None

    def left() -> tuple[int, int, int, int]:
        return (_fds(os.getpid()), _fds(spawner), len(session.runtime.containers),
                len(psutil.Process(spawner).children()))

    before = left()
    with pytest.raises(RuntimeSetupError, match=r"chmod 0666 /dev/net/tun"):
        _make(session, busybox_root, FULL)
    for _ in range(200):  # the spawner reaps slirp4netns, the helper and init on SIGCHLD
        if left() == before and not _slirps():
            break
        time.sleep(0.01)
    assert not _slirps()
    assert left() == before  # the container's init too: it is killed, not left waiting
