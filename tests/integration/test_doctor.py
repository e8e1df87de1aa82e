"""`sandboxd doctor` on this very host, as whoever runs the suite (root, then sbx-test).

The doctor runs as a command (a subprocess): on a cgroup v2 host its cgroup detection may
move the calling process into a leaf, which pytest's own process must not undergo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# This suite makes containers with writable roots all along: were any of these not ok, the
# doctor would be wrong about this host (or the suite could not pass).
NEEDED_HERE = ("kernel", "seccomp", "userns", "overlay", "proc")


def doctor(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "service.cli", "doctor", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


def trial_cgroups() -> list[Path]:
    return list(Path("/sys/fs/cgroup").glob("*/sandboxd*/doctor-*"))


def test_doctor_reports_this_host_as_json(tmp_path: Path) -> None:
    state = tmp_path / "state"
    status, out = doctor("--json", "--state-dir", str(state))
    report: dict[str, Any] = json.loads(out)
    levels = {f["check"]: f["level"] for f in report["findings"]}
    assert status == (0 if report["ok"] else 1) == (1 if report["failures"] else 0)
    assert report["uid"] == os.geteuid()
    for check in NEEDED_HERE:
        assert levels[check] == "ok", report
    assert levels["state_dir"] in ("ok", "warn")  # given, so looked at
    assert levels["cgroups"] in (("ok",) if os.geteuid() == 0 else ("ok", "warn")), report
    for f in report["findings"]:
        assert f["level"] in ("ok", "warn", "fail", "skipped")
        if f["level"] in ("warn", "fail"):
            assert f["fix"], f"a problem without its fix: {f}"
    assert not state.exists()  # looked at, not made
    assert trial_cgroups() == []


def test_a_blocking_problem_exits_1_with_its_fix(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")  # root's
    config = tmp_path / "sandboxd.toml"
    config.write_text(f'[server]\nstate_dir = "{theirs}"\n')
    status, out = doctor("--config", str(config))
    assert status == 1
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("FAIL  state_dir"))
    fix = next(i for i in range(first, len(lines)) if lines[i].lstrip().startswith("fix:"))
    message = " ".join(line.strip() for line in lines[first:fix])
    assert f"{theirs} belongs to uid" in message
    assert "chown -R " in lines[fix]
    assert lines[-1].startswith("1 problem blocking runs")
    assert trial_cgroups() == []


@pytest.mark.parametrize(("setup", "check", "said"), [
    # A pod without procMount: Unmasked: a path of /proc with something mounted over it.
    ("mount --bind /dev/null /proc/timer_list", "proc",
     ("/proc/timer_list mounted over it", "Operation not permitted",
      "unmount /proc/timer_list")),
    # A host that allows no user namespace (the limit is per user namespace: this one's).
    ("echo 0 > /proc/sys/user/max_user_namespaces", "userns",
     ("user.max_user_namespaces=0", "sysctl -w user.max_user_namespaces=65536")),
], ids=["masked-proc", "no-user-namespaces"])
def test_a_problem_made_for_real_is_found_and_fixed(tmp_path: Path, setup: str, check: str,
                                                    said: tuple[str, ...]) -> None:
    # Made in a user and mount namespace of the test's own (rootless), where the doctor
    # runs as that namespace's root: its probes meet the problem as a pod's sandboxd would.
    script = tmp_path / "problem.sh"
    script.write_text(f"{setup} && exec {sys.executable} -m service.cli doctor --json\n")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh",
                           str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 1, done.stderr
    found = {f["check"]: f for f in json.loads(done.stdout)["findings"]}
    assert found[check]["level"] == "fail"
    for s in said:
        assert s in f"{found[check]['message']} {found[check]['fix']}", found[check]
    assert trial_cgroups() == []
