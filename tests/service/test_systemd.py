"""`sandboxd setup --user NAME --systemd`: the unit passes `systemd-analyze verify`, and its
ExecStart, run by hand as NAME the way systemd would start it, serves /readyz and a run
with a token of the tokens file; a tokens file others may read is refused; --remove leaves
nothing behind. The same under a running systemd: tests/integration/test_systemd_boot.py."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox import SandboxError
from service import systemd
from testbed.ports import free_port
from tests.service.conftest import ROOT, stop, wait_ready

USER = "sbx-test"      # the service's user: root runs it as this one, sbx-test as itself
# A user of this test's own for the whole `sandboxd setup` round trip (as root): --remove
# undoes its cgroup delegation, which sbx-test's other tests are using.
THROWAWAY = f"sbx-unit-{os.getpid()}"


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory USER can reach (pytest's own are root's alone when root runs)."""
    d = Path(tempfile.mkdtemp(prefix="sbx-unit-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.fixture
def layout(workdir: Path) -> systemd.Layout:
    """USER's service with its files in `workdir`."""
    if os.geteuid() != 0 and pwd.getpwuid(os.geteuid()).pw_name != USER:
        pytest.skip(f"files owned by {USER} are root's or {USER}'s to write")
    return systemd.Layout(USER, workdir / "system" / systemd.UNIT, workdir / "etc/sandboxd.toml",
                          workdir / "etc/tokens.toml", workdir / "state", per_user=False)


@pytest.fixture
def installed(layout: systemd.Layout) -> systemd.Layout:
    list(systemd.install(layout, systemd.executable()))
    return layout


def _service_section(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def _verify(unit: Path, *options: str) -> None:
    # A user manager's verify needs a runtime directory (a login's /run/user/UID).
    with tempfile.TemporaryDirectory(prefix="sbx-unit-run-") as runtime:
        done = subprocess.run(["systemd-analyze", *options, "verify", str(unit)],
                              capture_output=True, text=True, check=False,
                              env={**os.environ, "XDG_RUNTIME_DIR": runtime})
    # verify exits 0 on a setting it could not parse ("..., ignoring"): stderr says it.
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_the_unit_verifies_and_leaves_out_what_breaks_user_namespaces(
        installed: systemd.Layout) -> None:
    _verify(installed.unit)
    service = _service_section(installed.unit)
    assert service["User"] == [USER] and service["Delegate"] == ["yes"]
    assert service["KillMode"] == ["mixed"] and service["Restart"] == ["on-failure"]
    assert service["TasksMax"] == ["infinity"] and service["LimitNPROC"] == ["infinity"]
    assert not set(service) & set(systemd.FORBIDDEN), service
    # Under UMask=0077 every run failed ("exec: Permission denied"), seen under systemd.
    assert "UMask" not in service
    # cgroup v1: the delegation is made again at each start, as root.
    redelegate = ["+" + shlex.join([*systemd.executable(), "setup", "--user", USER])]
    assert service.get("ExecStartPre") == (redelegate if systemd.cgroup_v1() else None)
    tokens = installed.tokens.stat()
    assert tokens.st_mode & 0o777 == 0o600 and tokens.st_uid == pwd.getpwnam(USER).pw_uid


def test_a_unit_of_another_user_is_not_taken_over(installed: systemd.Layout) -> None:
    unit = installed.unit
    unit.write_text(unit.read_text().replace(f"User={USER}\n", "User=someone-else\n"))
    with pytest.raises(SandboxError, match="runs sandboxd as someone-else: remove that first"):
        list(systemd.install(installed, systemd.executable()))


def test_the_state_directory_an_existing_config_names_is_the_units(
        layout: systemd.Layout, workdir: Path) -> None:
    elsewhere = workdir / "elsewhere"
    layout.config.parent.mkdir()
    layout.config.write_text(f'tokens_file = "{layout.tokens}"\n[server]\n'
                             f'state_dir = "{elsewhere}"\n')
    said = list(systemd.install(layout, systemd.executable()))
    assert f"kept {layout.config} as it is" in said
    exec_start = shlex.split(_service_section(layout.unit)["ExecStart"][0])
    assert exec_start[exec_start.index("--state-dir") + 1] == str(elsewhere)
    assert elsewhere.stat().st_uid == pwd.getpwnam(USER).pw_uid and not layout.state_dir.exists()


# The read-only mounts of the unit's hardening, as systemd makes them in the service's mount
# namespace (PrivateTmp= is stood in for by a TMPDIR of its own: the test's files are in /tmp).
READ_ONLY = {("ProtectSystem", "full"): ("/usr", "/boot", "/efi", "/etc"),
             ("ProtectHome", "read-only"): ("/home", "/root", "/run/user")}
_REMOUNT = ('while [ "$1" != -- ]; do if [ -d "$1" ]; then mount --bind "$1" "$1" && '
            'mount -o remount,bind,ro "$1" || exit 1; fi; shift; done; shift; exec "$@"')


def _exec_start(layout: systemd.Layout, log: Path) -> subprocess.Popen[bytes]:
    """The unit's ExecStart as systemd starts it: as root, in a mount namespace with the
    unit's read-only mounts, then as User= (setpriv execs, as systemd does: no session, no
    process in between); a clean environment of the user's, cwd /, and a /tmp of its own."""
    service = _service_section(layout.unit)
    hardening = [(k, v[0]) for k, v in service.items() if k.startswith(("Protect", "Private"))]
    pw = pwd.getpwnam(service["User"][0])
    program = shlex.split(service["ExecStart"][0])[0]
    # A checkout below /tmp (a CI's clone) would be hidden by PrivateTmp: the unit omits it.
    private = [] if systemd.hidden_by_private_tmp(program) else [("PrivateTmp", "yes")]
    assert sorted(hardening) == sorted([*READ_ONLY, *private]), hardening
    if os.geteuid() == 0 and subprocess.run(["runuser", "-u", pw.pw_name, "--", "test", "-x",
                                             program], check=False).returncode != 0:
        pytest.skip(f"{pw.pw_name} cannot run {program}: this checkout lies where other users "
                    "cannot reach it (e.g. under a 0700 directory); clone it where they can")
    tmp = layout.state_dir.parent / "tmp"
    tmp.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           f"HOME={pw.pw_dir}", f"USER={pw.pw_name}", f"LOGNAME={pw.pw_name}",
           f"SHELL={pw.pw_shell}", f"TMPDIR={tmp}",
           *(e for line in service.get("Environment", []) for e in shlex.split(line))]
    as_user: list[str] = []
    if os.geteuid() == 0:
        ro = [d for dirs in READ_ONLY.values() for d in dirs]
        as_user = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _REMOUNT,
                   "sh", *ro, "--", "setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                   "--init-groups"]
    with open(log, "wb") as out:
        return subprocess.Popen([*as_user, "env", "-i", *env,
                                 *shlex.split(service["ExecStart"][0])],
                                cwd=service.get("WorkingDirectory", ["/"])[0],
                                stdout=out, stderr=subprocess.STDOUT)


def _token(layout: systemd.Layout) -> str:
    return str(tomllib.loads(layout.tokens.read_text())["tokens"][0]["token"])


def test_exec_start_as_the_user_serves_runs_with_a_token_of_the_tokens_file(
        installed: systemd.Layout, images: Any, registry: Any) -> None:
    # What an operator adds: a free port here, the test registry (on a local address).
    config = installed.config
    config.write_text(config.read_text().replace("port = 8643", f"port = {free_port()}")
                      + f'\n[registries."{registry.host}"]\n')
    log = installed.state_dir.parent / "sandboxd.log"
    proc = _exec_start(installed, log)
    url = wait_ready(proc, log)
    try:
        body = json.dumps({"image": images.oci, "cmd": ["echo", "served"]}).encode()
        headers = {"Content-Type": "application/json"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url + "/v1/runs", body, headers),
                                   timeout=60)
        assert refused.value.code == 401
        headers["Authorization"] = f"Bearer {_token(installed)}"
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/runs", body, headers),
                                    timeout=120) as r:
            result = json.load(r)
        assert result["stdout"] == "served\n", result
        assert r.headers["X-Request-Id"] == result["request_id"]
    finally:
        stop(proc, log)


def test_a_tokens_file_others_may_read_is_refused(installed: systemd.Layout) -> None:
    installed.tokens.chmod(0o644)
    log = installed.state_dir.parent / "sandboxd.log"
    proc = _exec_start(installed, log)
    assert proc.wait(timeout=60) == 1
    assert f"chmod 600 {installed.tokens}" in log.read_text()


@pytest.fixture
def throwaway_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("sandboxd setup is root's: it delegates cgroups and writes /etc")
    if systemd.system_layout(THROWAWAY).unit.exists() or Path("/etc/sandboxd").exists():
        pytest.skip("this host has a sandboxd unit or /etc/sandboxd of its own")
    subprocess.run(["useradd", "--system", "--create-home", THROWAWAY], check=True)
    try:
        yield THROWAWAY
    finally:
        subprocess.run(["userdel", "--remove", THROWAWAY], check=True,
                       stderr=subprocess.DEVNULL)


def _setup(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "setup", *args], cwd=ROOT,
                          capture_output=True, text=True, check=False)


@pytest.mark.parametrize("scope", ["--systemd", "--user-unit"])
def test_setup_writes_the_service_says_how_to_start_it_and_remove_leaves_nothing(
        throwaway_user: str, scope: str) -> None:
    layout = (systemd.user_layout if scope == "--user-unit" else systemd.system_layout)(
        throwaway_user)
    before = _cgroup_dirs(throwaway_user)
    dropin = layout.manager_dropin
    done = _setup("--user", throwaway_user, scope)
    try:
        assert done.returncode == 0, done.stderr
        # Here PID 1 is not systemd: the files are written, and the commands that start them
        # are said.
        assert "systemd is not running" in done.stdout
        assert "enable --now sandboxd.service" in done.stdout
        _verify(layout.unit, *(["--user"] if layout.per_user else []))
        pw = pwd.getpwnam(throwaway_user)
        assert layout.tokens.stat().st_uid == pw.pw_uid
        assert layout.state_dir.stat().st_uid == pw.pw_uid
        assert _cgroup_dirs(throwaway_user) - before, "no cgroup was delegated"
        # cgroup v1: the user's manager makes the delegation again at each start.
        assert dropin is None or dropin.exists() == systemd.cgroup_v1()
    finally:
        removed = _setup("--user", throwaway_user, scope, "--remove")
    assert removed.returncode == 0, removed.stderr
    assert not layout.unit.exists() and not layout.config.parent.exists()
    assert dropin is None or not dropin.parent.exists()
    assert _cgroup_dirs(throwaway_user) == set()
    # The state directory (images, records) is kept, as package managers keep data, and
    # the output says how to drop it.
    assert f"rm -rf {layout.state_dir}" in removed.stdout
    shutil.rmtree(layout.state_dir)


def _cgroup_dirs(user: str) -> set[Path]:
    return set(Path("/sys/fs/cgroup").glob(f"*/sandboxd-{user}"))


def test_setup_systemd_names_its_user() -> None:
    done = _setup("--systemd")
    said = "run it as root" if os.geteuid() != 0 else "name it with --user"
    assert done.returncode == 2 and said in done.stderr, done.stderr


@pytest.mark.parametrize(("program", "hidden"), [
    ("/tmp/ci/s/.venv/bin/sandboxd", True), ("/var/tmp/x/sandboxd", True),
    ("/opt/sandboxd/bin/sandboxd", False), ("/tmpfoo/bin/sandboxd", False)])
def test_a_sandboxd_below_tmp_is_not_hidden_by_private_tmp(program: str, hidden: bool) -> None:
    """Seen under a real systemd: a unit with PrivateTmp=yes could not start a sandboxd
    cloned below /tmp (203/EXEC); the unit goes without it there."""
    assert systemd.hidden_by_private_tmp(program) is hidden
