"""cgroup limits and accounting: one interface, a v1 and a v2 driver chosen by detect()."""

from sandbox.runtime.cgroups.base import (
    UNLIMITED,
    Cgroup,
    CgroupDriver,
    CgroupLimits,
    CgroupStats,
    Lease,
)
from sandbox.runtime.cgroups.detect import Detection, detect
from sandbox.runtime.cgroups.v1 import V1Driver
from sandbox.runtime.cgroups.v2 import V2Driver

__all__ = [
    "UNLIMITED",
    "Cgroup",
    "CgroupDriver",
    "CgroupLimits",
    "CgroupStats",
    "Detection",
    "Lease",
    "V1Driver",
    "V2Driver",
    "detect",
]
