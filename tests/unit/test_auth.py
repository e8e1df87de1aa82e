"""Principal.allow_image: which registries a caller's image references may name, and that
each reference it allowed is parsed once (a judge names one image for every run)."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox.tenants import Tenant
from service.auth import Principal
from service.errors import ApiError


def test_an_allowed_reference_is_checked_once_and_a_refused_one_every_time(
        monkeypatch: Any) -> None:
    who = Principal("judge", Tenant("J"), registries=("registry.example:5000",))
    checks = 0
    check = Principal._check_image

    def counted(self: Principal, reference: str, field: str) -> None:
        nonlocal checks
        checks += 1
        check(self, reference, field)

    monkeypatch.setattr(Principal, "_check_image", counted)
    for _ in range(3):
        who.allow_image("registry.example:5000/judge/gcc:13", "image")
    assert checks == 1
    for _ in range(2):
        with pytest.raises(ApiError, match=r"may not use registry docker\.io"):
            who.allow_image("busybox", "image")
    assert checks == 3
    # Another caller keeps its own: this one's allowance is not the other's.
    other = Principal("other", Tenant("O"), registries=())
    with pytest.raises(ApiError, match=r"may not use registry registry\.example:5000"):
        other.allow_image("registry.example:5000/judge/gcc:13", "image")
    monkeypatch.setattr(who._allowed, "size", 1)
    who.allow_image("registry.example:5000/judge/python:3", "image")   # the first forgotten
    who.allow_image("registry.example:5000/judge/gcc:13", "image")
    assert checks == 6
