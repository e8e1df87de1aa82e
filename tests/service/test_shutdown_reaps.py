"""After `sandboxd serve` stops, nothing of it is left: no process, and no zombie (issue #10).

The service runs under a child subreaper of our own (a small wrapper), so that whatever it
leaves behind is re-parented there rather than to pid 1, which would reap it unseen: every
process the wrapper reaps or still finds besides the service itself was left behind.

Ways to stop: SIGTERM to the service; SIGTERM to its whole process group, as a service
manager or a terminal sends it (the spawner must not die first, taking its containers
mid-run with it); an engine that fails to start after its runtime has started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from testbed import busybox

REPO = Path(__file__).resolve().parents[2]

WRAPPER = textwrap.dedent("""
    import ctypes, json, os, re, signal, subprocess, sys, time, urllib.error, urllib.request

    workdir, how, image_tar = sys.argv[1], sys.argv[2], sys.argv[3]
    if ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) != 0:  # PR_SET_CHILD_SUBREAPER
        raise SystemExit("cannot become a subreaper")
    log = open(f"{workdir}/log", "wb")
    service = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--state-dir", f"{workdir}/state", "--config", f"{workdir}/sandboxd.toml"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = None, time.monotonic() + 60
    while how != "broken" and time.monotonic() < deadline and service.poll() is None:
        text = open(f"{workdir}/log").read()
        m = re.search(r"listening on (http://127\\.0\\.0\\.1:\\d+)", text)
        if m and "the engine is ready" in text:
            url = m.group(1)
            break
        time.sleep(0.05)

    def call(path, body, kind):
        req = urllib.request.Request(url + path, data=body, method="POST",
                                     headers={"Content-Type": kind})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            return json.loads(e.read())

    runs = []
    if url is not None:
        with open(image_tar, "rb") as f:
            call("/v1/images/import?reference=local/reaped:1", f.read(), "application/x-tar")
        for _ in range(2):  # a pool container stays behind, warm
            runs.append(call("/v1/runs", json.dumps({"image": "local/reaped:1",
                             "policy": "judge", "cmd": ["true"]}).encode(),
                             "application/json").get("status"))
        if how == "group":
            os.killpg(service.pid, signal.SIGTERM)
        else:
            service.send_signal(signal.SIGTERM)
    code = service.wait(timeout=60)
    left, until = [], time.monotonic() + 2
    while time.monotonic() < until:  # orphans die of PDEATHSIG, then land here
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        left.append(pid)
    print(json.dumps({"code": code, "runs": runs, "left": left}))
""")


@pytest.fixture(scope="module")
def image_tar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = busybox.build_rootfs(tmp_path_factory.mktemp("reaped") / "rootfs")
    tar = root.parent / "rootfs.tar"
    with tarfile.open(tar, "w") as t:
        t.add(root, arcname=".")
    return tar


@pytest.mark.parametrize("how", ["service", "group", "broken"])
def test_nothing_of_the_service_is_left_after_it_stops(tmp_path: Path, image_tar: Path,
                                                       how: str) -> None:
    (tmp_path / "sandboxd.toml").write_text("[pools]\nmin_idle = 1\nmax_idle = 1\n")
    if how == "broken":
        # The engine fails after its runtime (and spawner) started: the catalog is no database.
        (tmp_path / "state/images").mkdir(parents=True)
        (tmp_path / "state/images/catalog.db").write_bytes(b"not a database\n" * 64)
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(tmp_path), how, str(image_tar)],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    log = (tmp_path / "log").read_text(errors="replace")
    assert proc.returncode == 0, f"{proc.stderr}\n{log}"
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    if how == "broken":
        assert got["code"] == 1 and "the engine failed to start" in log, log
    else:
        assert got["code"] == 0 and got["runs"] == ["ok", "ok"], (got, log)
    assert got["left"] == [], (
        f"processes of sandboxd were left for pid 1 to reap: {got['left']}\n{log}")
