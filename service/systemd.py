"""`sandboxd setup --user NAME --systemd`: sandboxd as a systemd service run as NAME, with
its configuration, its tokens in a file of their own, and its state directory; `--remove`
takes away what this wrote.

A system service (`User=NAME`) by default; `--user-unit` makes it NAME's own user service
instead (`systemctl --user`, started at boot through lingering), for a host whose admin
would rather not add a system unit.

The unit leaves out every hardening option a nested rootless runtime does not survive
(`FORBIDDEN`, each with why); what it keeps makes no mount a user namespace must not see
and loads no seccomp filter (a filter on the service is inherited by every sandbox, whose
policies are the one place that decides what a run may do).

Where systemd is not running (a container, a chroot, an image being built) the files are
written, the commands that start them are printed, and the setup succeeds, as
`systemctl enable` itself does in a chroot: the files are what such a setup is for."""

from __future__ import annotations

import contextlib
import dataclasses
import grp
import os
import pwd
import secrets
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbox import SandboxError

UNIT = "sandboxd.service"
# The first line of a file this wrote: `--remove` deletes only files that still carry it.
MARK = "# Written by `sandboxd setup --systemd`, deleted by its --remove unless this line goes."
# After the shutdown deadline: the requests' grace (service/app.py SHUTDOWN_GRACE_S) and
# the engine's close, which kills and reaps what is left.
STOP_MARGIN_S = 15

# Options a hardened unit would have that break the service, and why. Several imply
# NoNewPrivileges=yes for a service with User= (systemd.exec(5)).
FORBIDDEN = {
    "NoNewPrivileges": "newuidmap and newgidmap are setuid: without new privileges they cannot "
                       "write the id map of a sandbox's user namespace",
    "PrivateUsers": "the service's own user namespace maps its uid alone: no subordinate ids",
    "RestrictNamespaces": "every sandbox is new user, mount, pid, ipc, uts, net and cgroup "
                          "namespaces",
    "ProtectControlGroups": "a read-only /sys/fs/cgroup: no cgroup per container",
    "ProtectKernelTunables": "overmounts under /proc: a proc that is not fully visible "
                             "cannot be mounted again in a user namespace (each sandbox's "
                             "/proc); implies NoNewPrivileges",
    "ProtectKernelLogs": "overmounts /proc/kmsg, as ProtectKernelTunables",
    "ProtectProc": "a /proc mounted with hidepid: not fully visible, as above",
    "ProcSubset": "a /proc of pids only: not fully visible, as above",
    "SystemCallFilter": "a seccomp filter every sandbox inherits (mount, unshare, setns, "
                        "pivot_root are the runtime's own); implies NoNewPrivileges",
    "MemoryDenyWriteExecute": "inherited by every sandbox: no JIT in runs; implies "
                              "NoNewPrivileges",
    "LockPersonality": "inherited by every sandbox; implies NoNewPrivileges",
    "RestrictSUIDSGID": "inherited by every sandbox; implies NoNewPrivileges",
    "RestrictAddressFamilies": "inherited by every sandbox; implies NoNewPrivileges",
    "PrivateDevices": "a seccomp filter (@raw-io) every sandbox inherits; implies "
                      "NoNewPrivileges",
    "CapabilityBoundingSet": "newuidmap needs CAP_SETUID and CAP_SETGID through its setuid bit",
    "PrivateNetwork": "no one could reach the API",
}


@dataclass(frozen=True)
class Layout:
    """Where the service's files go, and who runs it."""

    user: str
    unit: Path          # the unit file
    config: Path        # `sandboxd serve --config`
    tokens: Path        # the config's tokens_file
    state_dir: Path
    per_user: bool      # a user service (systemctl --user) rather than a system service

    @property
    def account(self) -> pwd.struct_passwd:
        return _account(self.user)

    @property
    def manager_dropin(self) -> Path | None:
        """For a user service on a cgroup v1 host: a drop-in for the system unit of NAME's
        user manager (user@UID.service), root's work a user unit cannot do (see
        `dropin_text`)."""
        if not self.per_user:
            return None
        return Path(f"/etc/systemd/system/user@{self.account.pw_uid}.service.d") / "sandboxd.conf"


def _account(user: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"no such user {user!r}: create it first (useradd --create-home "
                           f"{user})") from None


def system_layout(user: str) -> Layout:
    return Layout(user, Path("/etc/systemd/system") / UNIT, Path("/etc/sandboxd/sandboxd.toml"),
                  Path("/etc/sandboxd/tokens.toml"), Path("/var/lib/sandboxd"), per_user=False)


def user_layout(user: str) -> Layout:
    home = Path(_account(user).pw_dir)
    return Layout(user, home / ".config/systemd/user" / UNIT,
                  home / ".config/sandboxd/sandboxd.toml", home / ".config/sandboxd/tokens.toml",
                  home / ".local/state/sandboxd", per_user=True)


def executable() -> list[str]:
    """How the unit starts this sandboxd: the `sandboxd` script beside this Python (a
    virtualenv's), else the module through this Python."""
    script = Path(sys.executable).with_name("sandboxd")
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def cgroup_v1() -> bool:
    """Whether this host's memory controller is on a cgroup v1 hierarchy. sandboxd then
    makes its cgroups in the subtrees `sandboxd setup --user NAME` delegates at the top of
    each hierarchy, which systemd neither made nor keeps: cgroupfs forgets them at every
    boot, and a `systemctl daemon-reload` removes the empty ones in a hierarchy whose
    controller no unit enables (seen under systemd 252: the cpu one, and with it each
    pooled container's cpu cgroup, so that the next run on it failed with ENODEV)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fstype, _, options = line.split(" - ", 1)[1].split(" ")[:3]
            if fstype == "cgroup" and "memory" in options.strip().split(","):
                return True
    return False


# What keeps the v1 delegation (see cgroup_v1) as long as the service is installed:
# `sandboxd setup --user NAME` again, as root ("+"), before each start; and the controllers
# sandboxd uses (cpu and cpuacct, memory, pids) enabled on the service, so that systemd keeps
# them in use from the root down and removes nothing there at a daemon-reload. (freezer and
# cpuset are not systemd's on v1: it leaves them alone.)
ACCOUNTING = "CPUAccounting=yes\nMemoryAccounting=yes\nTasksAccounting=yes\n"


def _redelegate(layout: Layout, command: list[str]) -> str:
    return shlex.join([*command, "setup", "--user", layout.user]).replace("%", "%%")


# The directories PrivateTmp= replaces for the service: a sandboxd installed below them (a
# checkout cloned into /tmp) would be hidden from its own unit (203/EXEC).
PRIVATE_TMP = (Path("/tmp"), Path("/var/tmp"))


def hidden_by_private_tmp(program: str) -> bool:
    path = Path(os.path.abspath(program))
    return any(path.is_relative_to(d) for d in PRIVATE_TMP)


def unit_text(layout: Layout, command: list[str], shutdown_deadline_s: float,
              v1: bool = False) -> str:
    """The unit file. In its usual place (/var/lib, ~/.local/state) the state directory is
    systemd's to make and give to NAME at each start (StateDirectory=). `v1`: the host's
    cgroups are v1 (a system unit then keeps the delegation itself, see ACCOUNTING; a user
    unit cannot, its manager's drop-in does)."""
    # Quoted as systemd unquotes; a % would start a specifier.
    exec_start = shlex.join([*command, "serve", "--config", str(layout.config),
                             "--state-dir", str(layout.state_dir)]).replace("%", "%%")
    group = grp.getgrgid(layout.account.pw_gid).gr_name
    base = Path(layout.account.pw_dir) / ".local/state" if layout.per_user else Path("/var/lib")
    if layout.state_dir.parent == base:
        state = f"StateDirectory={layout.state_dir.name}\nStateDirectoryMode=0700\n"
    else:  # the config's own place, which the hardening below may make read-only
        state = "" if layout.per_user else f"ReadWritePaths={layout.state_dir}\n"
    who = "" if layout.per_user else f"User={layout.user}\nGroup={group}\n"
    # A user manager cannot raise a hard limit: the unit would fail to start (205/LIMITS).
    nproc = "" if layout.per_user else "LimitNPROC=infinity\n"
    private_tmp = "" if hidden_by_private_tmp(command[0]) else "PrivateTmp=yes\n"
    hardening = "" if layout.per_user else f"""\
# Hardening a nested rootless runtime survives: read-only /usr, /boot and /etc; home
# directories read-only; a /tmp of its own (unless sandboxd lies below /tmp or /var/tmp,
# which it would hide). Left out on purpose (they break user
# namespaces or every sandbox inherits them): NoNewPrivileges (newuidmap is setuid),
# PrivateUsers, RestrictNamespaces, ProtectControlGroups, ProtectKernelTunables,
# ProtectKernelLogs, ProtectProc, ProcSubset, SystemCallFilter, MemoryDenyWriteExecute,
# LockPersonality, RestrictSUIDSGID, RestrictAddressFamilies, PrivateDevices,
# CapabilityBoundingSet (service/systemd.py says why for each).
ProtectSystem=full
ProtectHome=read-only
{private_tmp}"""
    keep = ""
    if v1 and not layout.per_user:
        keep = (f"# cgroup v1: the cgroups `sandboxd setup` delegated to {layout.user}, made "
                f"again at each start\n# (a boot forgets them) and kept at a daemon-reload "
                f"(service/systemd.py ACCOUNTING).\nExecStartPre=+{_redelegate(layout, command)}"
                f"\n{ACCOUNTING}")
    # No UMask=: the state directory (0700) keeps others out. (Under 0077 every run once
    # failed with "exec: Permission denied": the runtime now sets its own, spawner.py.)
    return f"""\
{MARK}
[Unit]
Description=sandboxd: rootless sandbox service (as {layout.user})
After=network.target

[Service]
Type=exec
{who}{keep}ExecStart={exec_start}
{state}# Its containers' cgroups are made below the service's own on cgroup v2; on v1 in those
# `sandboxd setup` delegated (cgroup_v1 in service/systemd.py).
Delegate=yes
# SIGTERM to sandboxd alone: it stops taking requests and lets runs finish within
# shutdown_deadline_s, then kills them; only what is left after that is killed here.
KillMode=mixed
TimeoutStopSec={int(shutdown_deadline_s) + STOP_MARGIN_S}
Restart=on-failure
RestartSec=2
# Every container and run counts against these (`sandboxd doctor`, pids).
TasksMax=infinity
{nproc}{hardening}
[Install]
WantedBy={"default.target" if layout.per_user else "multi-user.target"}
"""


def config_text(layout: Layout) -> str:
    return f"""\
{MARK}
# Every key: service/config.py. The state directory is the unit's (--state-dir).
tokens_file = "{layout.tokens}"

[server]
host = "127.0.0.1"
port = 8643
"""


def dropin_text(layout: Layout, command: list[str]) -> str:
    """The drop-in for NAME's user manager on a cgroup v1 host: the delegation made again
    before it starts (at boot, through lingering) and kept at a daemon-reload (ACCOUNTING).
    "-": a failure here must not keep NAME's manager, and with it their logins, from
    starting (sandboxd's runs then say they have no cgroup)."""
    return f"""\
{MARK}
# sandboxd (a user service of {layout.user}) runs in the cgroups `sandboxd setup` delegated to
# {layout.user} (cgroup v1): made again before {layout.user}'s user manager starts, as root.
[Service]
ExecStartPre=-+{_redelegate(layout, command)}
{ACCOUNTING}"""


def tokens_text() -> str:
    return f"""\
{MARK}
# Each [[tokens]] entry is a tenant: `Authorization: Bearer <token>`. Mode 0600, owned by
# the service's user: sandboxd refuses a tokens_file others may read.
[[tokens]]
name = "admin"
token = "{secrets.token_urlsafe(32)}"
"""


def install(layout: Layout, command: list[str]) -> Iterator[str]:
    """As root: the configuration and the tokens file (kept if they exist), the state
    directory and the unit; a line per step."""
    from service.config import load

    pw = layout.account
    if (other := _unit_user(layout.unit)) not in (None, layout.user):
        raise SandboxError(f"{layout.unit} runs sandboxd as {other}: remove that first "
                           f"(sandboxd setup --user {other} --systemd --remove), then set up "
                           f"{layout.user}")
    # The configuration is the admin's to edit (root's, in /etc), or the user's own.
    yield _write(layout.config, config_text(layout), 0o644,
                 pw if layout.per_user else None, keep=True)
    made = _write(layout.tokens, tokens_text(), 0o600, pw, keep=True)
    yield made
    if made.startswith("wrote"):
        yield (f"  it holds a token named admin: clients send `Authorization: Bearer <token>` "
               f"(sudo grep token {layout.tokens})")
    # An admin's own config may name the state directory: the unit then uses that one.
    with open(layout.config, "rb") as f:
        configured = tomllib.load(f).get("server", {}).get("state_dir")
    if isinstance(configured, str) and Path(configured) != layout.state_dir:
        layout = dataclasses.replace(layout, state_dir=Path(configured))
        yield f"the state directory is the one {layout.config} names: {layout.state_dir}"
    if not layout.state_dir.exists():
        for d in _missing_dirs(layout.state_dir):
            d.mkdir(0o700)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        yield f"made {layout.state_dir} (0700, {layout.user}'s)"
    config = load(layout.config, overrides={"state_dir": str(layout.state_dir)})
    if config.tokens_file is None:
        yield (f"warning: {layout.config} names no tokens_file: add "
               f'tokens_file = "{layout.tokens}" to it, or the service takes no tokens from it')
    program = Path(command[0])
    if not layout.per_user and hidden_by_private_tmp(command[0]):
        yield (f"warning: {program} lies below /tmp or /var/tmp, which the unit's "
               "PrivateTmp=yes would hide from it: the unit goes without it; install "
               "sandboxd elsewhere (e.g. a virtualenv in /opt) and set up again to keep it")
    if program.is_absolute() and not all(d.stat().st_mode & 0o001 for d in program.parents):
        yield (f"warning: {program} is in a directory other users cannot enter, so the "
               f"service (as {layout.user}) cannot start it: install sandboxd where "
               f"{layout.user} can run it (e.g. a virtualenv in /opt) and set up again")
    v1 = cgroup_v1()
    unit = unit_text(layout, command, config.shutdown_deadline_s, v1)
    yield _write(layout.unit, unit, 0o644, pw if layout.per_user else None, keep=False)
    if v1 and layout.manager_dropin is not None:
        yield _write(layout.manager_dropin, dropin_text(layout, command), 0o644, None,
                     keep=False)


def _unit_user(unit: Path) -> str | None:
    """The User= of a system unit already there (None: no unit, or no User=)."""
    with contextlib.suppress(FileNotFoundError):
        for line in unit.read_text().splitlines():
            if line.startswith("User="):
                return line.removeprefix("User=").strip()
    return None


def _missing_dirs(path: Path) -> list[Path]:
    """path's missing ancestors and path itself, outermost first."""
    return [d for d in reversed([path, *path.parents]) if not d.exists()]


def _write(path: Path, text: str, mode: int, owner: pwd.struct_passwd | None,
           keep: bool) -> str:
    """Write `text` to path (its missing directories made, owned like it, 0755), root's
    when `owner` is None; an existing file is left as it is when `keep`, else replaced."""
    if keep and path.exists():
        return f"kept {path} as it is"
    for d in _missing_dirs(path.parent):
        d.mkdir(0o755)
        if owner is not None:
            os.chown(d, owner.pw_uid, owner.pw_gid)
    tmp = path.with_name(f".{path.name}.new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, text.encode())
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return f"wrote {path} (mode {mode:04o}, owner {'root' if owner is None else owner.pw_name})"


def systemd_running() -> bool:
    """Whether systemd is this host's init (what sd_booted(3) checks)."""
    return Path("/run/systemd/system").is_dir()


def _systemctl(layout: Layout) -> list[str]:
    return (["systemctl", "--user", "--machine", f"{layout.user}@"] if layout.per_user
            else ["systemctl"])


def start_commands(layout: Layout) -> list[list[str]]:
    ctl = _systemctl(layout)
    if not layout.per_user:
        return [[*ctl, "daemon-reload"], [*ctl, "enable", "--now", UNIT]]
    # The system manager's reload first: it reads the drop-in of NAME's manager. Lingering
    # starts that manager at boot, and now, but returns once the start is queued: `start`
    # waits until it is up, so the user manager's commands do not race it.
    manager = f"user@{layout.account.pw_uid}.service"
    return [["systemctl", "daemon-reload"], ["loginctl", "enable-linger", layout.user],
            ["systemctl", "start", manager], [*ctl, "daemon-reload"],
            [*ctl, "enable", "--now", UNIT]]


def start(layout: Layout) -> Iterator[str]:
    """Start the unit now and at every boot; where systemd is not running, say so and what
    starts it. A command that fails raises SandboxError with its message."""
    commands = start_commands(layout)
    if not systemd_running():
        yield ("systemd is not running on this host (no /run/systemd/system), so the unit was "
               "written but not started; on a host booted with systemd, start it with:")
        yield from (f"    {' '.join(c)}" for c in commands)
        return
    for c in commands:
        _check(c)
    yield f"started {UNIT} (as {layout.user}); see it with: {' '.join(_status(layout))}"


def _status(layout: Layout) -> list[str]:
    return [*_systemctl(layout), "status", UNIT]


def _check(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SandboxError(f"`{' '.join(command)}` failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")


def remove(layout: Layout) -> Iterator[str]:
    """Stop and disable the unit (when systemd runs), then delete the unit, the config and
    the tokens file if they still begin with MARK. The state directory (images, records)
    is kept, as package managers keep data: the last line says how to drop it."""
    if systemd_running() and layout.unit.exists():
        _check([*_systemctl(layout), "disable", "--now", UNIT])
        yield f"stopped and disabled {UNIT}"
    for path in (layout.unit, layout.config, layout.tokens, layout.manager_dropin):
        if path is None:
            continue
        with contextlib.suppress(FileNotFoundError):
            with open(path) as f:
                ours = f.readline().rstrip("\n") == MARK
            if not ours:
                yield f"kept {path}: not written by sandboxd setup (its first line was changed)"
                continue
            path.unlink()
            yield f"removed {path}"
    for d in (layout.config.parent, layout.manager_dropin and layout.manager_dropin.parent):
        if d is None:
            continue
        with contextlib.suppress(OSError):  # the directory, once empty
            d.rmdir()
            yield f"removed {d}"
    if systemd_running():  # for a user service: its manager's drop-in went
        _check(["systemctl", "daemon-reload"])
    if layout.per_user:
        yield (f"lingering stays on for {layout.user} (other services of theirs may need it): "
               f"loginctl disable-linger {layout.user} turns it off")
    if layout.state_dir.exists():
        yield (f"kept {layout.state_dir} (images and records): `rm -rf {layout.state_dir}` "
               "drops them")
