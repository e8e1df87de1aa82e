"""The OCI bundle crun and runc run a workload from: its config.json, written to match
sandboxd's isolation (read-only busybox root, /proc, /dev, a tmpfs /tmp, every namespace
including the network, no capabilities, no new privileges; a user namespace when rootless)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_VERSION = "1.0.2"
NOFILE = 1024
_NOSUID_NODEV = ["nosuid", "nodev"]
# Paths the runtimes' own default specs hide or make read-only.
MASKED = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware"]
READ_ONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


@dataclass(frozen=True)
class Bundle:
    """What one workload runs: `args` with `env` inside `root`, `binds` (host file, path
    inside) added read-only; `host_ids` is the (uid, gid) container root maps to when
    rootless (as the runtime sees them), None when the runtime runs as real root."""

    root: Path
    args: list[str]
    env: dict[str, str]
    binds: list[tuple[Path, str]]
    host_ids: tuple[int, int] | None


def _mount(dest: str, kind: str, options: list[str]) -> dict[str, Any]:
    return {"destination": dest, "type": kind, "source": kind, "options": options}


def config(b: Bundle) -> dict[str, Any]:
    namespaces = [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount", "cgroup")]
    linux: dict[str, Any] = {"namespaces": namespaces, "maskedPaths": MASKED,
                             "readonlyPaths": READ_ONLY}
    if b.host_ids is not None:
        namespaces.append({"type": "user"})
        linux["uidMappings"] = [{"containerID": 0, "hostID": b.host_ids[0], "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": b.host_ids[1], "size": 1}]
    no_caps: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "permitted",
                                                    "inheritable", "ambient")}
    mounts = [
        _mount("/proc", "proc", [*_NOSUID_NODEV, "noexec"]),
        _mount("/dev", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
        _mount("/dev/shm", "tmpfs", [*_NOSUID_NODEV, "noexec", "mode=1777", "size=65536k"]),
        _mount("/tmp", "tmpfs", [*_NOSUID_NODEV, "mode=1777"]),
        *({"destination": inside, "type": "bind", "source": str(host),
           "options": ["bind", "ro", *_NOSUID_NODEV]} for host, inside in b.binds),
    ]
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": b.args, "cwd": "/",
            "env": [f"{k}={v}" for k, v in b.env.items()], "noNewPrivileges": True,
            "capabilities": no_caps,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": NOFILE, "soft": NOFILE}],
        },
        "root": {"path": str(b.root), "readonly": True},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": linux,
    }


def write(bundle: Bundle, dest: Path) -> Path:
    """The bundle directory `dest` (created) with its config.json."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config(bundle), indent=1))
    os.chmod(dest, 0o700)
    return dest
