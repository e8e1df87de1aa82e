"""`sandboxd setup`, root's work done once per host: cgroup tuning and delegation."""

from __future__ import annotations

from collections.abc import Iterator

from sandbox.runtime.cgroups import delegate, tuning
from sandbox.runtime.cgroups.detect import detect


def setup_host(user: str | None) -> Iterator[str]:
    """As root: favordynmods on the cgroup2 mount; with `user` (the ordinary user the
    service will run as), a cgroup subtree of its own. Says what it did, a line per step
    as it goes (on a v2 host, the systemd recipe its admin runs instead of delegating)."""
    yield tuning.favor_dynmods()
    if user is None:  # a service run as root needs only the tuning
        return
    found = detect()
    if found.driver is not None:
        found.driver.close()  # only asked which version this host runs
        if found.driver.version == 2:
            yield delegate.systemd_recipe_v2(user)
            return
    for path in delegate.delegate_v1(user):
        yield f"delegated {path} to {user}"


def undo_host_setup(user: str) -> Iterator[str]:
    """As root: remove the subtree setup_host delegated to `user`."""
    for path in delegate.undelegate_v1(user):
        yield f"removed {path}"
