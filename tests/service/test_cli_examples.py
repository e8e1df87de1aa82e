"""Every example of every `sbx COMMAND --help` page run as written: each page's lines in
one bash, in order, in a directory of its own, with `sbx` on PATH and SANDBOXD_URL and
SANDBOXD_TOKEN pointing at a real `sandboxd serve`. Its Docker Hub is a local registry
(the service's `[registries."docker.io"]` mirror) holding the test busybox, multi-platform,
as library/busybox:latest, so `busybox` in an example is the test image."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sbx.manual import Example
from testbed.registry import start_registry
from tests.service.conftest import ROOT, Service, start_service, stop_service, wait_ready
from tests.support.images import docker_hub_mirror
from tests.unit.test_sbx_help import PAGES

TOKEN = "examples-token-0123456789abcdef"
# What an example exits with when it is not 0 (the page's text says so)
STATUSES = {"sbx run -v --limit wall_ms=1000 busybox -- sleep 5": 124}
# Examples that need what this test has not: they are only parsed (tests/unit/test_sbx_help)
NOT_RUN = {"sbx push busybox localhost:5000/busybox:1": "no registry on localhost:5000 here",
           "sbx run -it busybox sh": "needs a terminal: test_tty_terminal.py types into it "
                                     "in tmux"}
# The pages that change what `busybox` names run last (a pull of another platform)
LAST = {("pull",)}


@pytest.fixture(scope="module")
def sandboxd(images: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service's URL; Docker Hub's busybox is the test image, from a mirror."""
    workdir = tmp_path_factory.mktemp("examples")
    with start_registry(workdir / "hub", die_with_parent=True) as hub:
        mirror = docker_hub_mirror(images, workdir / "tools", hub.host)
        config = f"""
[[tokens]]
token = "{TOKEN}"
name = "examples"

{mirror}
[pools]
min_idle = 0
max_idle = 1
"""
        proc, log = start_service(workdir, config)
        url = wait_ready(proc, log)
        yield url
        stop_service(Service(url, proc, log, workdir / "state", hub.host), workdir)


def _run_page(url: str, workdir: Path,
              examples: tuple[Example, ...]) -> tuple[list[tuple[str, int]], str]:
    """Each example's line run in one bash, in order: (line, its exit status), and what
    they printed on stderr."""
    bin_dir, home, here = workdir / "bin", workdir / "home", workdir / "here"
    for d in (bin_dir, home, here):
        d.mkdir(exist_ok=True)
    sbx = bin_dir / "sbx"
    sbx.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m sbx.cli \"$@\"\n")
    sbx.chmod(0o755)
    statuses = workdir / "statuses"
    lines = [line for line in (e.line for e in examples) if line not in NOT_RUN]
    script = "\n".join(f"{line}\necho $? >> {shlex.quote(str(statuses))}" for line in lines)
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home),
           "PYTHONPATH": str(ROOT), "SANDBOXD_URL": url, "SANDBOXD_TOKEN": TOKEN,
           "TMPDIR": str(workdir)}
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=here, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    codes = [int(c) for c in statuses.read_text().split()] if statuses.exists() else []
    assert len(codes) == len(lines), done.stdout + done.stderr
    return list(zip(lines, codes, strict=True)), done.stderr


@pytest.mark.one_pass
def test_every_example_works_as_written(sandboxd: str, tmp_path: Path) -> None:
    pages = sorted(PAGES, key=lambda page: page[0] in LAST)
    failed = []
    for n, (path, parser) in enumerate(pages):
        assert parser.manual is not None
        workdir = tmp_path / str(n)
        workdir.mkdir()
        ran, stderr = _run_page(sandboxd, workdir, parser.manual.examples)
        for line, code in ran:
            if code != STATUSES.get(line, 0):
                failed.append(f"sbx {' '.join(path)}: {line!r} exited {code}:\n{stderr}")
    assert not failed, "\n".join(failed)
