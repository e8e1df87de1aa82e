"""Run profiles from files: the operator's knobs (seccomp "unconfined", network "host") are
accepted, anything else is refused with a message naming what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sandbox.errors import PolicyError
from sandbox.runtime.profiles import HOST_NETWORK, UNCONFINED, Profile, load_profile


def _load(tmp_path: Path, **data: Any) -> Profile:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return load_profile("p", path)


def test_unconfined_and_host_network_are_accepted(tmp_path: Path) -> None:
    p = _load(tmp_path, seccomp="unconfined", network="host")
    assert (p.seccomp, p.network) == (UNCONFINED, HOST_NETWORK)
    p = _load(tmp_path)
    assert (p.seccomp, p.network) == ("default", "none")


@pytest.mark.parametrize(("data", "message"), [
    ({"network": "bridge"}, r"network 'bridge' is not one of 'none' .* or 'host'"),
    ({"network": None}, r"network None is not one of"),
    ({"seccomp": 42}, r"seccomp must be the name of a policy in policies/seccomp or "
                      r"'unconfined', got 42"),
    ({"seccomp": "nope"}, r"unknown seccomp profile 'nope'; built-in profiles: default, or "
                          r"'unconfined'"),
    ({"seccomp": "../default"}, r"invalid seccomp profile name"),
    ({"network": "host", "rootfs": {"sys": "ro"}},
     r"rootfs.sys 'ro' needs a network namespace .*use network 'none' or rootfs.sys 'none'"),
])
def test_bad_values_are_refused_clearly(tmp_path: Path, data: dict[str, Any],
                                        message: str) -> None:
    with pytest.raises(PolicyError, match=message) as e:
        _load(tmp_path, **data)
    assert str(e.value).startswith("profile 'p': ")
