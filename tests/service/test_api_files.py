"""Copies in and out through the API with hostile containers (issue #10): links planted by
the container's code are refused, never written through; a copy out streams (the
service's memory does not grow with the file); the state directory is private and layers
keep no setuid bit or file capability."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from testbed import busybox
from tests.service.conftest import MAIN_TOKEN, ROOT, Service


async def _sh(s: aiohttp.ClientSession, sid: str, script: str) -> str:
    async with s.post(f"/v1/containers/{sid}/exec",
                      json={"cmd": ["sh", "-c", script], "env": {"PATH": "/bin"}}) as r:
        assert r.status == 200, await r.text()
        result = await r.json()
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


async def _session(s: aiohttp.ClientSession, image: str) -> str:
    async with s.post("/v1/containers", json={"image": image, "policy": "default"}) as r:
        assert r.status == 201, await r.text()
        return str((await r.json())["id"])


async def _put(s: aiohttp.ClientSession, sid: str, path: str, data: bytes) -> tuple[int, Any]:
    async with s.put(f"/v1/containers/{sid}/files", params={"path": path}, data=data) as r:
        return r.status, (await r.json() if r.status != 204 else None)


def test_a_put_through_a_planted_link_is_a_400_and_writes_nothing(service: Service,
                                                                   images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        try:
            before = await _sh(s, sid, "stat -c '%u %a' /bin/busybox; md5sum /bin/busybox")
            await _sh(s, sid, "ln -s /bin/busybox /tmp/in.txt && ln -s /etc /tmp/etc")
            status, body = await _put(s, sid, "/tmp/in.txt", b"\xcc" * 4096)
            assert status == 400 and body["error"]["field"] == "path", body
            assert body["error"]["message"].startswith(
                "/tmp/in.txt is a symbolic link (-> '/bin/busybox')"), body
            assert "give the real path" in body["error"]["message"]
            # A missing parent below a planted directory link: nothing is made through it.
            status, body = await _put(s, sid, "/tmp/etc/made/x.txt", b"x")
            assert status == 400 and body["error"]["field"] == "path", body
            assert ("passes through the symbolic link /tmp/etc (-> '/etc')"
                    in body["error"]["message"]), body
            assert await _sh(s, sid, "stat -c '%u %a' /bin/busybox; md5sum /bin/busybox; "
                                     "[ ! -e /etc/made ] && echo none") == before + "none\n"
            # The real path works.
            assert (await _put(s, sid, "/tmp/real/x.txt", b"ok"))[0] == 204
            assert await _sh(s, sid, "cat /tmp/real/x.txt") == "ok"
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    service.call(go)


def _peak_rss_reset(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def test_a_copy_out_streams_without_holding_the_file(service: Service, images: Any) -> None:
    """48 MiB out of a session, as a file and in a directory's tar: the service's peak RSS
    stays within a few MiB of where it was (it held the file three times over before)."""
    size = 48 << 20
    pid = service.proc.pid

    async def copy(s: aiohttp.ClientSession, sid: str, path: str) -> tuple[Any, bytes]:
        _peak_rss_reset(pid)
        before = _rss_kib(pid, "VmRSS")
        got = io.BytesIO()
        async with s.get(f"/v1/containers/{sid}/files", params={"path": path}) as r:
            assert r.status == 200, await r.text()
            async for chunk in r.content.iter_chunked(1 << 16):
                got.write(chunk)
        growth = _rss_kib(pid, "VmHWM") - before
        assert growth < 16 << 10, f"copying {path} out grew the service's RSS by {growth} KiB"
        return r.headers, got.getvalue()

    async def go(s: aiohttp.ClientSession) -> None:
        sid = await _session(s, images.oci)
        try:
            await _sh(s, sid, f"mkdir /tmp/d && head -c {size} /dev/urandom > /tmp/d/big && "
                              "echo small > /tmp/d/small")
            want = (await _sh(s, sid, "md5sum /tmp/d/big")).split()[0]
            headers, data = await copy(s, sid, "/tmp/d/big")
            assert headers["Content-Length"] == str(size)
            assert headers["Content-Type"] == "application/octet-stream"
            assert hashlib.md5(data).hexdigest() == want
            headers, data = await copy(s, sid, "/tmp/d")
            assert headers["Content-Type"] == "application/x-tar"
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                assert sorted(tar.getnames()) == ["d", "d/big", "d/small"]
                f = tar.extractfile("d/big")
                assert f is not None and hashlib.md5(f.read()).hexdigest() == want
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    service.call(go)


@pytest.fixture(scope="module")
def setuid_rootfs(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A busybox root with a setuid-root copy of busybox and a file-capability one."""
    root = busybox.build_rootfs(tmp_path_factory.mktemp("rootfs") / "root")
    cap = struct.pack("<5I", 0x02000001, 1 << 13, 0, 0, 0)  # cap_net_raw+ep, revision 2
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root, arcname=".")
        for name, mode, pax in (("bin/su", 0o4755, {}), ("bin/sg", 0o2755, {}),
                                ("bin/ping", 0o755, {"SCHILY.xattr.security.capability":
                                                     cap.decode("utf-8", "surrogateescape")})):
            info = tar.gettarinfo(root / "bin/busybox", arcname=name)
            info.mode, info.uid, info.gid, info.pax_headers = mode, 0, 0, pax
            with (root / "bin/busybox").open("rb") as f:
                tar.addfile(info, f)
    return gzip.compress(buf.getvalue(), compresslevel=1)


def _denied_to_another_user(state: Path) -> bool:
    """Whether a local user other than the service's, given the state directory itself
    (whatever its parents say), is refused a look inside it."""
    fd = os.open(state, os.O_PATH | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through its exit status
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            os.stat("images", dir_fd=fd)
            os._exit(1)
        except PermissionError:
            os._exit(0)
        except BaseException:
            os._exit(2)
    os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 1), status
    return os.WEXITSTATUS(status) == 0


def test_imported_layers_keep_no_setuid_bit_or_file_capability(service: Service,
                                                               setuid_rootfs: bytes) -> None:
    async def go(s: aiohttp.ClientSession) -> str:
        async with s.post("/v1/images/import", params={"reference": "imported/setuid:1"},
                          data=setuid_rootfs,
                          headers={"Content-Type": "application/x-tar"}) as r:
            assert r.status == 201, await r.text()
        sid = await _session(s, "imported/setuid:1")
        try:
            return await _sh(s, sid, "stat -c '%n %a' /bin/su /bin/sg /bin/ping; echo runs")
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    assert service.call(go) == "/bin/su 755\n/bin/sg 755\n/bin/ping 755\nruns\n"
    layers = [p for p in (service.state_dir / "images/layers/sha256").glob("*/bin/su")
              if not p.is_symlink()]  # busybox roots have su, as a link
    assert layers, "the imported layer is not in the store"
    for su in layers:
        for name in ("su", "sg", "ping"):
            assert stat.S_IMODE((su.parent / name).stat().st_mode) == 0o755, su.parent / name
        assert "security.capability" not in os.listxattr(su.parent / "ping")


def test_the_state_dir_is_private_to_the_service_user(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"]}) as r:
            assert r.status == 200, await r.text()  # layers reached through a 0700 directory
    service.call(go)
    assert stat.S_IMODE(service.state_dir.stat().st_mode) == 0o700
    if os.geteuid() == 0:  # only root can be another local user here
        assert _denied_to_another_user(service.state_dir)


def _open_on(pid: int, suffix: str) -> list[str]:
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except FileNotFoundError:
            continue
        if target.endswith(suffix):
            found.append(target)
    return found


def test_a_reader_that_goes_away_leaves_no_descriptor(service: Service, images: Any) -> None:
    pid = service.proc.pid

    async def go(s: aiohttp.ClientSession) -> list[str]:
        sid = await _session(s, images.oci)
        try:
            await _sh(s, sid, "mkdir -p /tmp/gone/sub && head -c 8388608 /dev/zero > "
                              "/tmp/gone/sub/big")
            for path in ("/tmp/gone/sub/big", "/tmp/gone") * 3:
                async with s.get(f"/v1/containers/{sid}/files", params={"path": path}) as r:
                    assert r.status == 200
                    await r.content.readexactly(1 << 16)
                    r.close()  # the connection goes, mid-body
            for _ in range(100):  # the service notices as its next write fails
                if not (left := _open_on(pid, "/sub/big") + _open_on(pid, "/gone/sub")):
                    break
                await asyncio.sleep(0.05)
            return left
        finally:
            async with s.delete(f"/v1/containers/{sid}"):
                pass
    assert service.call(go) == []
    assert "Traceback" not in service.log_text()


def test_sbx_cp_refuses_links_a_container_planted_to_escape(service: Service, images: Any,
                                                            tmp_path: Path) -> None:
    """The container's code makes `d -> .` and `l -> d/../../escape` in a directory: the
    service copies them out as links (they are the container's), and `sbx cp` refuses to
    unpack them, since l would lead out of the destination; a lexical check of l's target
    alone ('evil/d/../../escape' is 'escape') let it through."""
    async def go(s: aiohttp.ClientSession) -> str:
        sid = await _session(s, images.oci)
        await _sh(s, sid, "mkdir /tmp/evil && ln -s . /tmp/evil/d && "
                          "ln -s d/../../escape /tmp/evil/l && echo x > /tmp/evil/f")
        return sid
    sid = service.call(go)
    try:
        dest = tmp_path / "out"
        env = {**os.environ, "SANDBOXD_URL": service.url, "SANDBOXD_TOKEN": MAIN_TOKEN}
        done = subprocess.run([sys.executable, "-m", "sbx.cli", "cp", f"{sid}:/tmp/evil",
                               str(dest)], capture_output=True, cwd=ROOT, env=env,
                              timeout=60, check=False)
        assert done.returncode == 125, done
        assert (b"sbx: refusing the archive: the link 'evil/l' (-> 'd/../../escape') leads "
                b"outside the destination") in done.stderr
        assert not dest.exists() and not (tmp_path / "escape").exists()
        done = subprocess.run([sys.executable, "-m", "sbx.cli", "cp", "--tar",
                               f"{sid}:/tmp/evil", str(tmp_path / "evil.tar")],
                              capture_output=True, cwd=ROOT, env=env, timeout=60, check=False)
        assert done.returncode == 0, done  # the archive as it came, for whoever wants it
        with tarfile.open(tmp_path / "evil.tar") as tar:
            assert tar.getmember("evil/l").linkname == "d/../../escape"
    finally:
        service.call(lambda s: s.delete(f"/v1/containers/{sid}"))


def test_a_copy_out_that_fails_midway_is_cut_short_never_complete(service: Service,
                                                                  images: Any) -> None:
    """Past a cap once the body has begun, the service cannot answer 400 any more: it
    closes the connection before the tar's end, logs why, and clients say so."""
    async def go(s: aiohttp.ClientSession) -> str:
        sid = await _session(s, images.oci)
        await _sh(s, sid, "cd /tmp && for i in $(seq 300); do mkdir d && cd d; done")
        async with s.get(f"/v1/containers/{sid}/files", params={"path": "/tmp/d"}) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
        return sid
    sid = service.call(go)
    try:
        assert (f"copy out of /tmp/d from container {sid} cut short: the directory nests "
                "deeper than 256 levels") in service.log_text()
        env = {**os.environ, "SANDBOXD_URL": service.url, "SANDBOXD_TOKEN": MAIN_TOKEN}
        done = subprocess.run([sys.executable, "-m", "sbx.cli", "cp", f"{sid}:/tmp/d",
                               "-"], capture_output=True, cwd=ROOT, env=env, timeout=60,
                              check=False)
        assert done.returncode == 125 and b"stopped partway" in done.stderr, done.stderr
    finally:
        service.call(lambda s: s.delete(f"/v1/containers/{sid}"))
