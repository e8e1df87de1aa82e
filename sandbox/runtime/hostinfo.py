"""What this host can enforce: the capabilities report behind `sandboxd info` and /v1/info."""

from __future__ import annotations

import os
import platform
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


def _kernel() -> tuple[int, int]:
    parts = platform.release().split(".")
    try:
        return int(parts[0]), int(parts[1].split("-")[0])
    except (IndexError, ValueError):
        return 0, 0


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


def report(cgroups: Detection | None = None, mapping: idmap.IdMapping | None = None
           ) -> dict[str, Any]:
    """Every check is cheap and side-effect free; warnings say what to do about a gap."""
    warnings: list[str] = []
    kernel = _kernel()
    max_userns = _read("/proc/sys/user/max_user_namespaces")
    userns = max_userns not in (None, "0") and _read(
        "/proc/sys/kernel/unprivileged_userns_clone") != "0"
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
    filesystems = _read("/proc/filesystems") or ""
    overlay = "overlay" in filesystems and kernel >= (5, 11)
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
