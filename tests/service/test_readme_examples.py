"""README.md's curl examples ("The API, with curl") run as written: the block's lines in
one bash, in order, against a real `sandboxd serve` holding the README's two tokens. Its
Docker Hub is a local registry (the service's `[registries."docker.io"]` mirror) with the
images the examples name: busybox (the test image, multi-platform), python:3.12-slim
(Debian's python3) and gcc:13 (Debian's gcc), as testbed.demoimages makes them. Only
`$URL` is the test's own: the service listens on a free port, not on 8643.

Every request an example makes must answer 2xx, but those NOT_2XX names (a registry this
machine cannot reach); what the README says an example prints is checked where it says."""

from __future__ import annotations

import re
import shlex
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import busybox
from testbed.demoimages import TarImage, gcc_rootfs, push_images, python_rootfs, write_tar
from testbed.registry import start_registry
from tests.service.conftest import ROOT, Service, start_service, stop_service, wait_ready
from tests.support.images import docker_hub_mirror

README = ROOT / "README.md"
SECTION = "## The API, with curl"
URL_LINE = "URL=http://127.0.0.1:8643 "
# Requests an example makes that cannot succeed here, by the start of their URL's path.
NOT_2XX = {"/v1/images/push": "pushes to registry.local:5000, a name this machine has not"}
# The program the examples compile and run: "1 2" in, their sum out, and files to copy out.
A_C = r"""#include <stdio.h>
#include <sys/stat.h>
int main(void) {
    int a = 0, b = 0;
    if (scanf("%d %d", &a, &b) != 2) return 1;
    printf("%d\n", a + b);
    FILE *f = fopen("/tmp/out.txt", "w");
    if (f) { fprintf(f, "%d\n", a + b); fclose(f); }
    mkdir("/tmp/out", 0755);
    f = fopen("/tmp/out/sum", "w");
    if (f) { fprintf(f, "%d\n", a + b); fclose(f); }
    return 0;
}
"""


def curl_block() -> str:
    """The section's code: its indented lines up to the first paragraph after them."""
    lines = README.read_text().split(SECTION, 1)[1].splitlines()
    block: list[str] = []
    for line in lines[1:]:
        if line and not line.startswith("    "):
            if block:
                break
            continue
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def _with_local_bin(root: Path) -> Path:
    """/usr/local/bin, as Docker Hub's gcc image has it: an example copies into it."""
    (root / "usr" / "local" / "bin").mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def hub(images: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A registry standing in for Docker Hub, with the images the examples name: its
    host, and the config table that makes it docker.io's mirror."""
    work = tmp_path_factory.mktemp("readme-hub")
    with start_registry(work / "hub", die_with_parent=True) as registry:
        mirror = docker_hub_mirror(images, work / "tools", registry.host)
        push_images(work / "builder", [
            TarImage(write_tar(python_rootfs(work / "python"), work / "python.tar.gz"),
                     f"{registry.host}/library/python:3.12-slim", ["python3"],
                     {"PATH": "/usr/local/bin:/usr/bin:/bin"}),
            TarImage(write_tar(_with_local_bin(gcc_rootfs(work / "gcc")), work / "gcc.tar.gz"),
                     f"{registry.host}/library/gcc:13", ["bash"],
                     {"PATH": "/usr/local/bin:/usr/bin:/bin"})])
        yield registry.host, mirror


@pytest.fixture(scope="module")
def sandboxd(hub: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("readme")
    host, mirror = hub
    config = f"""
[[tokens]]
token = "alice-0123456789abcdef"
name = "alice"

[[tokens]]
token = "bob-0123456789abcdef"
name = "bob"

{mirror}
[network]
proxy_hosts = ["pypi.org", "*.pythonhosted.org"]   # as the README's sandboxd.toml
"""
    proc, log = start_service(workdir, config)
    url = wait_ready(proc, log)
    yield url
    stop_service(Service(url, proc, log, workdir / "state", host), workdir)


def _requests(trace: str) -> list[tuple[int, str, str]]:
    """(status, method, path) of each request curl made, from its --write-out lines."""
    found = re.findall(r"^STATUS (\d{3}) (\S+) https?://[^/\s]+(\S*)$", trace, re.M)
    return [(int(code), method, path) for code, method, path in found]


@pytest.mark.one_pass
def test_the_readmes_curl_examples_work_as_written(sandboxd: str, tmp_path: Path) -> None:
    block = curl_block()
    assert URL_LINE in block, f"the README's examples no longer start with {URL_LINE!r}"
    # What a reader has beside them: a.c, and a root filesystem to import.
    (tmp_path / "a.c").write_text(A_C)
    root = busybox.build_rootfs(tmp_path / "rootfs")
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(root, arcname=".")
    trace = tmp_path / "trace"
    # curl's status line of each request goes to a file of its own (its stdout is the
    # example's, often piped into jq).
    prelude = ("curl() { command curl -w '%{stderr}STATUS %{http_code} %{method} "
               "%{url_effective}\\n' \"$@\" 2>>" + shlex.quote(str(trace)) + "; }\n"
               "set -o pipefail\n")
    script = prelude + block.replace(URL_LINE, f"URL={sandboxd} ", 1)
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    out = done.stdout
    made = _requests(trace.read_text() if trace.exists() else "")
    # Every curl of the block made its request (a curl inside $(...) too).
    assert len(made) >= block.count("curl -s"), (done.stderr, made)
    bad = [(code, method, path) for code, method, path in made
           if not 200 <= code < 300 and not any(path.startswith(p) for p in NOT_2XX)]
    assert not bad, f"requests that failed: {bad}\n{out[-4000:]}\n{done.stderr[-2000:]}"
    assert any(path.startswith(p) and code >= 400 for code, _, path in made
               for p in NOT_2XX), "an example expected to fail here passed: update NOT_2XX"
    # What the README says they print.
    assert '"stdout":"olleh\\n"' in out
    assert '"stdout":"40 120\\r\\n"' in out
    assert '{"event":"stdout","data":"1\\n"}' in out
    assert '"stdout":"3\\n"' in out                       # the session's and the judge's
    assert '"event":"summary"' in out and '"by_status":{"ok":2}' in out
    assert '"ok"\n"50\\n25\\n37\\n"\n' in out             # the pipeline, through jq
    assert '"event":"image"' in out and "docker.io/library/hello:1" in out
    # Every run ended ok but pip's: python:3.12-slim here is Debian's python3, without pip
    # (and this machine may not reach PyPI). The examples scrape /metrics last.
    runs = dict(re.findall(r'^sandboxd_runs_total\{status="(\w+)"\} (\S+)$', out, re.M))
    assert set(runs) == {"ok", "nonzero_exit"} and float(runs["nonzero_exit"]) == 1, runs
