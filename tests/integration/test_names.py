"""What a container's name lookups find (sandbox/runtime/network/names.py): the runtime's
/etc/hosts and /etc/hostname in every root, as Docker and podman write theirs, so that
`localhost` resolves in an image that has no such files; slirp4netns's DNS for `full`.
They live in a layer of the root, not in a bind: a reset gives back the runtime's copy, and
an image that made /etc a link keeps its own shape (nothing is written through it)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.network import FULL
from sandbox.runtime.network.names import SLIRP_DNS
from sandbox.runtime.network.slirp import problem
from sandbox.runtime.requests import ContainerSpec
from sandbox.runtime.results import Status
from testbed import busybox
from tests.conftest import Session


def _sh(session: Session, c: Container, script: str, uid: int | None = None) -> str:
    r = session.exec(c, ["sh", "-c", script], uid=uid)
    assert r.status == Status.OK, r
    return r.stdout.decode()


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_localhost_and_the_hostname_resolve(session: Session, busybox_root: Path,
                                            profile: str) -> None:
    c = session.container(busybox_root, profile=profile)
    out = _sh(session, c, """
        cat /etc/hostname; hostname
        grep -w localhost /etc/hosts | head -1
        send() {  # until the listener is up: a refused connection is tried again
            for i in $(seq 200); do echo "$1" | nc "$2" "$3" 2>/dev/null && return; sleep 0.05
            done
        }
        nc -l -p 4242 > /tmp/got & send through-localhost localhost 4242; wait; cat /tmp/got
        nc -l -p 4243 > /tmp/got2 & send through-hostname sandbox 4243; wait; cat /tmp/got2""")
    lines = out.split("\n")
    assert lines[:3] == ["sandbox", "sandbox", "127.0.0.1\tlocalhost"], out
    assert "through-localhost" in lines and "through-hostname" in lines, out


def test_a_run_that_changes_hosts_changes_only_its_own(session: Session,
                                                       busybox_root: Path) -> None:
    c = session.container(busybox_root, profile="default")
    _sh(session, c, "echo '198.51.100.7 localhost' > /etc/hosts", uid=0)
    session.run(c.reset())
    assert _sh(session, c, "cat /etc/hosts").startswith("127.0.0.1\tlocalhost\n")
    # The image's own tree is not where it went.
    assert not (busybox_root / "etc/hosts").exists() or \
        "198.51.100.7" not in (busybox_root / "etc/hosts").read_text()


def _image_with_etc_as(session: Session, base: Path, link_to: str) -> Path:
    m = session.runtime.mapping
    root = busybox.build_rootfs(base / "rootfs", owner=(m.root_uid, m.root_gid))
    for entry in (root / "etc").iterdir():
        entry.unlink()
    (root / "etc").rmdir()
    (root / "etc").symlink_to(link_to)
    os.lchown(root / "etc", m.root_uid, m.root_gid)
    return root


@pytest.mark.parametrize("profile", ["judge", "default"])
def test_an_image_whose_etc_is_a_link_keeps_it_and_nothing_is_written_through_it(
        session: Session, tmp_path: Path, profile: str) -> None:
    """A hostile image makes /etc a link to a host directory: the runtime provides no file
    there rather than follow it, and the link stays as the image made it."""
    outside = tmp_path / "host-dir"
    outside.mkdir()
    c = session.container(_image_with_etc_as(session, tmp_path, str(outside)), profile=profile)
    assert _sh(session, c, "readlink /etc").strip() == str(outside)
    assert list(outside.iterdir()) == []


DNS_PROBLEM = problem()


def _host_nameserver() -> str | None:
    try:
        with open("/etc/resolv.conf") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1]
    except OSError:
        pass
    return None


def _answers(server: str) -> bool:
    """Whether `server` answers a DNS query (for localhost's A record) within 2 s."""
    query = struct.pack(">HHHHHH", 0x5bd, 0x100, 1, 0, 0, 0) + b"\x09localhost\x00" + \
        struct.pack(">HH", 1, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        try:
            s.sendto(query, (server, 53))
            return s.recv(512)[:2] == query[:2]
        except OSError:
            return False


@pytest.fixture
def full_container(session: Session, busybox_root: Path) -> Iterator[Container]:
    if DNS_PROBLEM is not None:
        pytest.skip(f"`full` cannot work here: {DNS_PROBLEM}")
    c = session.run(session.runtime.create_container(ContainerSpec(
        layers=(str(busybox_root),), policy="judge", network=FULL)))
    yield c
    session.run(c.destroy())


def test_full_names_slirps_dns_and_it_answers_as_the_hosts_resolver_does(
        session: Session, full_container: Container) -> None:
    out = _sh(session, full_container, "cat /etc/resolv.conf")
    assert out == f"nameserver {SLIRP_DNS}\n"
    server = _host_nameserver()
    if server is None or not _answers(server):
        pytest.skip(f"this host's own resolver ({server}) does not answer: nothing to "
                    "forward to")
    r = session.exec(full_container, ["sh", "-c", "nslookup localhost 2>&1; echo rc=$?"])
    out = r.stdout.decode()
    # An answer, whatever it says (a resolver may know localhost or not): never a timeout.
    assert SLIRP_DNS in out and "timed out" not in out and "rc=" in out, out


def test_none_keeps_the_images_resolv_conf(session: Session, busybox_root: Path) -> None:
    c = session.container(busybox_root, profile="judge")
    image = busybox_root / "etc/resolv.conf"
    out = _sh(session, c, "cat /etc/resolv.conf 2>/dev/null; true")
    assert out == (image.read_text() if image.exists() else "")
