"""What a container's name lookups find (sandbox/runtime/network/names.py): the runtime's
/etc/hosts and /etc/hostname in every root, as Docker and podman write theirs, so that
`localhost` resolves in an image that has no such files; slirp4netns's DNS for `full`.
They live in a layer of the root, not in a bind: a reset gives back the runtime's copy, and
an image that made /etc a link keeps its own shape (nothing is written through it)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.network.names import SLIRP_DNS
from sandbox.runtime.network.slirp import problem
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
        # A listener's stdin that never ends (a FIFO it holds open for writing too): at the
        # end of its stdin busybox's nc may close before it has read what came in.
        mkfifo /tmp/quiet
        nc -l -p 4242 > /tmp/got 0<>/tmp/quiet & send through-localhost localhost 4242
        wait; cat /tmp/got
        nc -l -p 4243 > /tmp/got2 0<>/tmp/quiet & send through-hostname sandbox 4243
        wait; cat /tmp/got2""")
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


FULL_PROBLEM = problem()
REPO = Path(__file__).resolve().parents[2]
# The test's own resolver, on the host's loopback: slirp4netns asks it from the host side,
# where 127.0.0.0/8 is no blocked range (the container can reach only 10.0.2.3).
RESOLVER = "127.53.0.1"
ANSWER = "192.0.2.77"


def _reply(query: bytes) -> bytes:
    """A DNS answer to `query`: ANSWER for an A question, no record for any other."""
    end = 12
    while query[end]:
        end += query[end] + 1
    qtype = struct.unpack(">H", query[end + 1:end + 3])[0]
    question = query[12:end + 5]
    answers = (b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + socket.inet_aton(ANSWER)
               if qtype == 1 else b"")
    return query[:2] + struct.pack(">HHHHH", 0x8180, 1, 1 if answers else 0, 0, 0) + \
        question + answers


# Runs in a mount namespace of its own, where /etc/resolv.conf names RESOLVER: the spawner
# it starts gives slirp4netns that file, the one place slirp reads its upstream from.
_IN_NAMESPACE = f"""
import socket, subprocess, sys, tempfile, threading
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from tests.integration.test_names import RESOLVER, _reply
from tests.conftest import Session
from testbed import busybox
from sandbox.runtime.requests import ContainerSpec

work = Path(sys.argv[1])
(work / "resolv.conf").write_text(f"nameserver {{RESOLVER}}\\n")
subprocess.run(["mount", "--bind", str(work / "resolv.conf"), "/etc/resolv.conf"], check=True)
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind((RESOLVER, 53))
def serve():
    while True:
        query, peer = server.recvfrom(512)
        server.sendto(_reply(query), peer)
threading.Thread(target=serve, daemon=True).start()
s = Session()
m = s.runtime.mapping
root = busybox.build_rootfs(work / "rootfs", owner=(m.root_uid, m.root_gid))
c = s.run(s.runtime.create_container(ContainerSpec(layers=(str(root),), policy="judge",
                                                   network="full")))
r = s.exec(c, ["sh", "-c", "cat /etc/resolv.conf; nslookup -type=a where.example.test"])
print(r.stdout.decode(), r.stderr.decode())
s.run(c.destroy())
s.close()
"""


def test_full_resolves_names_through_slirps_dns(tmp_path: Path) -> None:
    """The container's resolv.conf names slirp4netns's forwarder, which asks the resolver
    of the host (here the test's own, answering ANSWER for every name)."""
    if FULL_PROBLEM is not None:
        pytest.skip(f"`full` cannot work here: {FULL_PROBLEM}")
    if os.geteuid() != 0:
        pytest.skip("giving slirp4netns a resolver of the test's own takes a mount namespace "
                    "with another /etc/resolv.conf, which only root can make here")
    tmp_path.chmod(0o755)
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                           "-c", _IN_NAMESPACE, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert out.startswith(f"nameserver {SLIRP_DNS}\n"), out
    assert ANSWER in out, out


def test_none_keeps_the_images_resolv_conf(session: Session, busybox_root: Path) -> None:
    c = session.container(busybox_root, profile="judge")
    image = busybox_root / "etc/resolv.conf"
    out = _sh(session, c, "cat /etc/resolv.conf 2>/dev/null; true")
    assert out == (image.read_text() if image.exists() else "")
