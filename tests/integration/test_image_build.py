"""deploy/build-image.sh: sandboxd's images built by sandboxd's own build (`sbx build` on a
`sandboxd serve` of the script's own), from this machine's Debian packages, written as
archives a cluster's runtime imports. Then the sandboxd image run as its pod runs it, with
no cluster: a user namespace of its own (hostUsers: false), its root read-only and pivoted
into, user 10001 with no_new_privs (allowPrivilegeEscalation: false), the pod's seccomp
profile, the ConfigMap's sandboxd.toml (only its address changed), a token from the
environment as the Secret gives it. It serves runs; and with a path of its /proc masked, as
a container runtime masks it without procMount: Unmasked, it cannot make containers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sbx.client import ApiError, SyncClient
from testbed import busybox
from testbed.demoimages import write_tar
from testbed.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "a-token-for-the-pod-test-0123456789"
SECCOMP = ROOT / "deploy" / "kubernetes" / "seccomp" / "sandboxd.json"

# Run by `unshare --user --map-root-user --map-auto --mount`: the pod's user namespace (the
# caller is its root, its subordinate ids the rest), then what the container runtime does:
# mounts, pivot_root, the pod's user, no_new_privs, the seccomp profile, the entrypoint.
POD = r"""
set -e
root=$1 config=$2 mask=$3
mount --bind "$root" "$root"
mount --rbind /proc "$root/proc"; mount --rbind /sys "$root/sys"; mount --rbind /dev "$root/dev"
[ "$mask" = mask ] && mount --bind /dev/null "$root/proc/timer_list"
mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755 tmpfs "$root/var/lib/sandboxd"
chown 10001:10001 "$root/var/lib/sandboxd"
mount -t tmpfs tmpfs "$root/etc/sandboxd"
cp "$config" "$root/etc/sandboxd/sandboxd.toml"
cp "$config.seccomp" "$root/etc/sandboxd/seccomp.json"
mkdir -p "$root/.old"
mount -o remount,bind,ro "$root"   # readOnlyRootFilesystem: true
cd "$root"
pivot_root . .old
umount -l /.old
cd /var/lib/sandboxd
exec /bin/env -i PATH=/usr/bin:/bin PYTHONPATH=/opt/sandboxd/site HOME=/var/lib/sandboxd \
    SANDBOXD_TOKENS="$SANDBOXD_TOKENS" SANDBOXD_NODE=sandboxd-0 python3 -c '
import ctypes, os
from sandbox.runtime import seccomp
os.setgroups([]); os.setgid(10001); os.setuid(10001)
if ctypes.CDLL(None).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    raise SystemExit("no_new_privs failed")
seccomp.install(seccomp.compile_profile(seccomp.load_profile("/etc/sandboxd/seccomp.json")).bpf)
os.execvp("python3", ["python3", "-m", "service.cli", "serve", "--config",
                      "/etc/sandboxd/sandboxd.toml"])
'
"""


# The build is ~30 s on a quiet machine; minutes when seven others share its two cores.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    # A session of its own: if the test is stopped, its whole group (the script's service,
    # registry and build) gets SIGTERM, and the script's EXIT trap removes its files.
    build = subprocess.Popen(["bash", str(ROOT / "deploy" / "build-image.sh"), "--out",
                              str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        output, _ = build.communicate(timeout=800)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGTERM)
            build.wait(timeout=60)
    assert build.returncode == 0, output[-5000:]
    return out


def config_of(archive: Path) -> dict[str, object]:
    raw = subprocess.run(["skopeo", "inspect", "--config", f"docker-archive:{archive}"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(raw)["config"]


def test_the_sandboxd_image_runs_the_service_as_an_ordinary_user(archives: Path) -> None:
    (archive,) = archives.glob("sandboxd-[0-9]*.tar")
    config = config_of(archive)
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["python3", "-m", "service.cli"]
    assert config["Cmd"] == ["serve", "--config", "/etc/sandboxd/sandboxd.toml"]
    assert "8643/tcp" in config["ExposedPorts"]  # type: ignore[operator]


def test_the_registry_cache_image_serves_its_mounted_config(archives: Path) -> None:
    (archive,) = archives.glob("sandboxd-registry-cache-*.tar")
    config = config_of(archive)
    assert config["User"] == "10002:10002"
    assert config["Entrypoint"] == ["/usr/bin/docker-registry"]
    assert config["Cmd"] == ["serve", "/etc/docker/registry/config.yml"]


@pytest.fixture(scope="module")
def image_root(archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    (archive,) = archives.glob("sandboxd-[0-9]*.tar")
    work = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["skopeo", "copy", "-q", f"docker-archive:{archive}", f"oci:{work}/oci:s"],
                   check=True)
    rootless = ["--rootless"] if os.geteuid() != 0 else []
    subprocess.run(["umoci", "unpack", *rootless, "--image", f"{work}/oci:s", f"{work}/b"],
                   check=True, capture_output=True)
    return work / "b" / "rootfs"


@pytest.fixture(scope="module")
def busybox_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("busybox")
    return write_tar(busybox.build_rootfs(work / "root"), work / "busybox.tar.gz")


def start_pod(image_root: Path, work: Path, *, mask: bool) -> tuple[subprocess.Popen[bytes],
                                                                       int]:
    config = tomllib.loads((ROOT / "deploy" / "kubernetes" / "sandboxd.toml").read_text())
    port = free_port()
    # Loopback only: the pod's address is its own network namespace's, this host's is not.
    text = (ROOT / "deploy" / "kubernetes" / "sandboxd.toml").read_text()
    text = text.replace(f'host = "{config["server"]["host"]}"', 'host = "127.0.0.1"')
    text = text.replace(f'port = {config["server"]["port"]}', f"port = {port}")
    (work / "sandboxd.toml").write_text(text)
    (work / "sandboxd.toml.seccomp").write_text(SECCOMP.read_text())
    log = (work / "pod.log").open("wb")
    pod = subprocess.Popen(
        ["unshare", "--user", "--map-root-user", "--map-auto", "--mount",
         "--propagation", "private", "bash", "-c", POD, "pod", str(image_root),
         str(work / "sandboxd.toml"), "mask" if mask else "-"],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SANDBOXD_TOKENS": TOKEN})
    log.close()
    return pod, port


@pytest.fixture
def pod(image_root: Path, tmp_path: Path,
        request: pytest.FixtureRequest) -> Iterator[SyncClient]:
    proc, port = start_pod(image_root, tmp_path, mask=request.param)
    client = SyncClient(f"http://127.0.0.1:{port}", TOKEN, timeout=60)
    try:
        for _ in range(300):
            try:
                if client.ready():
                    break
            except ApiError:
                pass
            assert proc.poll() is None, (tmp_path / "pod.log").read_text()[-3000:]
            time.sleep(0.1)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("pod", [False], indirect=True)
def test_the_image_serves_runs_as_its_pod_runs_it(pod: SyncClient, busybox_tar: Path) -> None:
    pod.import_image(busybox_tar, "local/busybox:1")
    result = pod.run("local/busybox:1", ["sh", "-c", "echo hello from the pod"])
    assert (result.status, result.stdout) == ("ok", "hello from the pod\n")
    assert pod.run("local/busybox:1", ["true"], policy="judge").status == "ok"


@pytest.mark.parametrize("pod", [True], indirect=True)
def test_with_a_masked_proc_the_pod_cannot_make_containers(pod: SyncClient,
                                                           busybox_tar: Path) -> None:
    pod.import_image(busybox_tar, "local/busybox:1")
    with pytest.raises(ApiError) as e:
        pod.run("local/busybox:1", ["true"])
    assert "mount proc" in e.value.message and "Operation not permitted" in e.value.message
