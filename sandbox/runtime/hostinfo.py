"""What this host can enforce: the capabilities report behind `sandboxd info` and /v1/info."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from sandbox.errors import SandboxError
from sandbox.runtime import idmap
from sandbox.runtime.cgroups import Detection, detect, tuning


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _seccomp_binding() -> str | None:
    try:
        import seccomp  # noqa: F401
    except ImportError:
        try:
            import pyseccomp  # noqa: F401
        except ImportError:
            return None
        return "pyseccomp"
    return "seccomp"


# Tried for real, in a throwaway user and mount namespace made by util-linux's unshare (a
# subprocess: the service process never forks); the tmpfs goes over /tmp of that private
# namespace only.
_OVERLAY_PROBE = ("mount -t tmpfs probe /tmp && mkdir /tmp/l /tmp/u /tmp/w /tmp/m && "
                  "mount -t overlay probe -o lowerdir=/tmp/l,upperdir=/tmp/u,workdir=/tmp/w,"
                  "userxattr /tmp/m")


def _in_userns(script: str) -> bool:
    try:
        done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                               script], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def report(cgroups: Detection | None = None, mapping: idmap.IdMapping | None = None
           ) -> dict[str, Any]:
    """Every check is cheap and leaves nothing behind; warnings say what to do about a gap."""
    warnings: list[str] = []
    userns = _in_userns("true")
    if not userns:
        warnings.append("user namespaces are disabled: set user.max_user_namespaces > 0 "
                        "(and kernel.unprivileged_userns_clone=1 where it exists)")
    if mapping is None:
        try:
            mapping = idmap.plan()
        except SandboxError as e:
            warnings.append(str(e))
    if mapping is not None and mapping.method == "single":
        warnings.append("only one id is mapped: untrusted code runs as container root (with "
                        "no capabilities); install uidmap and add /etc/subuid and /etc/subgid "
                        "ranges to run it as 65534")
    overlay = userns and _in_userns(_OVERLAY_PROBE)
    if not overlay:
        warnings.append("overlayfs in a user namespace needs Linux >= 5.11 with overlay "
                        "loaded; writable roots are unavailable")
    seccomp_ok = (_read("/proc/self/status") or "").find("Seccomp:") >= 0
    detected = cgroups is None
    cgroups = detect() if cgroups is None else cgroups
    warnings.extend(cgroups.warnings)
    driver = cgroups.driver
    if detected and driver is not None:
        driver.close()  # detection made the base (as root); a report leaves nothing
    favored = tuning.dynmods_favored() if driver is not None else None
    if driver is not None and not favored:
        warnings.append("cgroup moves may wait for an RCU grace period after idle (~7 ms a "
                        "run): run `sandboxd setup` as root to set favordynmods")
    return {
        "kernel": platform.release(),
        "user": os.geteuid(),
        "user_namespaces": userns,
        "id_mapping": mapping.describe() if mapping else None,
        "overlay_in_userns": overlay,
        "seccomp": {"available": seccomp_ok, "binding": _seccomp_binding()},
        "cgroup": ({**driver.describe(), "favordynmods": favored} if driver
                   else {"version": None, "fallback": "rlimits and rusage"}),
        "measurement": {
            "cpu": "cgroup" if driver and {"cpuacct", "cpu"} & driver.controllers else "rusage",
            "memory": "cgroup" if driver and "memory" in driver.controllers
            else "rusage:ru_maxrss",
        },
        "warnings": warnings,
    }
