"""The real `sbx` (a subprocess, as a user runs it) against the real `sandboxd serve` and
the test registry: pull, run, exec, cp both ways, images, import, rm."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.service.conftest import MAIN_TOKEN, ROOT, Service

FAILED = 125


def sbx(service: Service, *argv: str, stdin: bytes = b"",
        token: str = MAIN_TOKEN) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SANDBOXD_URL": service.url, "SANDBOXD_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "sbx.cli", *argv], input=stdin,
                          capture_output=True, cwd=ROOT, env=env, timeout=60, check=False)


@pytest.fixture(scope="module")
def image(service: Service, images: Any) -> str:
    """A test busybox no other test of the session pulls, pulled through `sbx pull`."""
    done = sbx(service, "pull", images.shared_a)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().strip() == images.digests["shared_a"]
    top = images.layers["shared_a"][-1]  # its own layer: really downloaded here
    assert top.removeprefix("sha256:")[:12].encode() in done.stderr
    return str(images.shared_a)


def test_run_streams_output_and_exits_with_the_runs_code(service: Service, image: str) -> None:
    done = sbx(service, "run", "-v", image, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (done.returncode, done.stdout) == (3, b"out\n")
    assert done.stderr.startswith(b"err\n") and b"status=nonzero_exit" in done.stderr
    assert sbx(service, "run", image, "--", "sh", "-c", "kill -9 $$").returncode == 128 + 9
    done = sbx(service, "run", "--limit", "cpu_ms=100", image, "--", "sh", "-c",
               "while :; do :; done")
    assert done.returncode == 124 and b"time_limit" in done.stderr
    done = sbx(service, "run", "-i", "-e", "GREETING=hi", image, "--", "sh", "-c",
               'read line; echo "$GREETING $line"', stdin=b"there\n")
    assert (done.returncode, done.stdout) == (0, b"hi there\n")


def test_errors_exit_125_with_the_services_message(service: Service, image: str) -> None:
    done = sbx(service, "run", f"{service.registry_host}/no/such:image", "--", "true")
    assert done.returncode == FAILED and done.stderr.startswith(b"sbx: ")
    assert b"no/such" in done.stderr and b"Traceback" not in done.stderr
    done = sbx(service, "images", token="wrong-token")
    assert done.returncode == FAILED and done.stderr.startswith(b"sbx: ")


def test_sessions_exec_and_cp_both_ways(service: Service, image: str, tmp_path: Path) -> None:
    created = sbx(service, "create", image)
    assert created.returncode == 0, created.stderr
    cid = created.stdout.decode().strip()
    assert cid.encode() in sbx(service, "ps").stdout
    local = tmp_path / "in.bin"
    local.write_bytes(b"\x00\xffpayload\n")
    assert sbx(service, "cp", str(local), f"{cid}:/tmp/in.bin").returncode == 0
    done = sbx(service, "exec", cid, "--", "sh", "-c",
               "mkdir -p /tmp/d/sub && cp /tmp/in.bin /tmp/d/sub/f && ln -s sub/f /tmp/d/rel"
               " && cat /tmp/in.bin")
    assert (done.returncode, done.stdout) == (0, b"\x00\xffpayload\n"), done.stderr
    assert sbx(service, "cp", f"{cid}:/tmp/in.bin", str(tmp_path / "out.bin")).returncode == 0
    assert (tmp_path / "out.bin").read_bytes() == b"\x00\xffpayload\n"
    done = sbx(service, "cp", f"{cid}:/tmp/d", str(tmp_path / "tree"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "tree" / "d" / "sub" / "f").read_bytes() == b"\x00\xffpayload\n"
    assert os.readlink(tmp_path / "tree" / "d" / "rel") == "sub/f"
    # A link out of the directory is refused as a whole; --tar keeps it as it came.
    assert sbx(service, "exec", cid, "--", "ln", "-s", "/etc/passwd", "/tmp/d/abs").returncode == 0
    done = sbx(service, "cp", f"{cid}:/tmp/d", str(tmp_path / "refused"))
    assert done.returncode == FAILED and b"refusing the archive" in done.stderr
    assert not (tmp_path / "refused").exists()
    assert sbx(service, "cp", "--tar", f"{cid}:/tmp/d", str(tmp_path / "d.tar")).returncode == 0
    with tarfile.open(tmp_path / "d.tar") as tar:
        assert tar.getmember("d/abs").linkname == "/etc/passwd"
    assert sbx(service, "rm", cid).stdout == cid.encode() + b"\n"
    assert cid.encode() not in sbx(service, "ps").stdout
    assert sbx(service, "rm", cid).returncode == FAILED


def test_commit_then_run_the_image(service: Service, image: str) -> None:
    cid = sbx(service, "create", image).stdout.decode().strip()
    done = sbx(service, "exec", "-u", "0", cid, "--", "sh", "-c", "echo built > /opt.txt")
    assert done.returncode == 0, done.stderr
    done = sbx(service, "commit", "-c", 'CMD ["cat", "/opt.txt"]', "--change", "ENV A=1",
               "-m", "by sbx", cid, "cli/committed:1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("sha256:")
    done = sbx(service, "run", "cli/committed:1")
    assert (done.returncode, done.stdout) == (0, b"built\n"), done.stderr
    done = sbx(service, "commit", "-c", "RUN true", cid, "cli/refused:1")
    assert done.returncode == FAILED and b"changes[0]" in done.stderr
    assert sbx(service, "rm", cid).returncode == 0


def test_images_import_and_info(service: Service, image: str, tmp_path: Path) -> None:
    rootfs = io.BytesIO()
    with tarfile.open(fileobj=rootfs, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    tar_path = tmp_path / "rootfs.tar"
    tar_path.write_bytes(rootfs.getvalue())
    done = sbx(service, "import", str(tar_path), "e2e-cli/imported:1")
    assert done.returncode == 0 and done.stdout.startswith(b"sha256:"), done.stderr
    listed = sbx(service, "images").stdout.decode()
    assert "e2e-cli/imported:1" in listed and image in listed
    assert sbx(service, "rmi", "e2e-cli/imported:1").returncode == 0
    assert "e2e-cli/imported:1" not in sbx(service, "images").stdout.decode()
    info = sbx(service, "info")
    assert info.returncode == 0 and "version" in orjson.loads(info.stdout)


def test_build_prints_steps_caches_and_tags(service: Service, image: str,
                                            tmp_path: Path) -> None:
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Dockerfile").write_text(f"FROM {image}\nARG WHO\nCOPY hello.txt /\n"
                                    "RUN echo \"built for $WHO\" >> /hello.txt\n"
                                    "CMD [\"cat\", \"/hello.txt\"]\n")
    (ctx / "hello.txt").write_text("hello\n")
    done = sbx(service, "build", "-t", "cli/built:1", "--build-arg", "WHO=you", str(ctx))
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "Step 4/5 : RUN" in out and "Successfully tagged" in out, out
    again = sbx(service, "build", "-t", "cli/built:1", "--build-arg", "WHO=you", str(ctx))
    assert again.stdout.decode().count("Using cache") == 4, again.stdout
    ran = sbx(service, "run", "cli/built:1")
    assert ran.stdout == b"hello\nbuilt for you\n", ran.stderr
    failed = sbx(service, "build", str(ctx), "-f", str(ctx / "missing"))
    assert failed.returncode == 1 and b"missing" in failed.stderr
