"""`platform` on runs and sessions: a multi-platform name resolves to the entry asked for;
an image built for another architecture is a 400 before any container is made (sandboxd
emulates nothing), never an exec format error; one tenant's choice of platform for a name
changes nothing for another."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.service.conftest import LIMITED_TOKEN, Service

LIMITED = {"Authorization": f"Bearer {LIMITED_TOKEN}"}
TRUE = ["/bin/busybox", "true"]


def _arch(platform: str) -> str:
    """os/arch: what an image's config says of it (an index entry may add a variant)."""
    return "/".join(platform.split("/")[:2])


def _other(images: Any) -> str:
    others = [p for p in images.platforms if p != images.native_platform]
    if images.native_platform not in images.platforms or not others:
        pytest.skip(f"the test index has no entry for this host ({images.native_platform})")
    return others[0]


async def _post(s: aiohttp.ClientSession, path: str, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with s.post(path, json=body, headers=headers or {}) as r:
        return r.status, await r.json()


def test_another_architecture_is_a_clear_400(service: Service, images: Any) -> None:
    other = _other(images)

    async def go(s: aiohttp.ClientSession) -> None:
        async with s.get("/v1/containers") as r:
            sessions = (await r.json())["containers"]
        for path, body in (("/v1/runs", {"image": images.multi, "cmd": TRUE,
                                         "platform": other}),
                           ("/v1/containers", {"image": images.multi, "platform": other})):
            status, answer = await _post(s, path, body)
            assert status == 400, (path, answer)
            assert answer["error"]["field"] == "image"
            assert f"built for {_arch(other)}" in answer["error"]["message"]
            assert images.native_platform in answer["error"]["message"]
        async with s.get("/v1/containers") as r:
            assert (await r.json())["containers"] == sessions  # no session was made

        # A name pulled for the other platform runs nowhere here either...
        status, pulled = await _post(s, "/v1/images/pull",
                                     {"reference": images.multi, "platform": other})
        assert status == 200 and pulled["digest"] == images.platforms[other], pulled
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE})
        assert status == 400 and f"built for {_arch(other)}" in answer["error"]["message"]
        # ...until a run asks for this machine's, which pulls that entry again.
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE,
                                                     "platform": images.native_platform})
        assert (status, answer.get("status")) == (200, "ok"), answer
        assert answer["image"] == images.platforms[images.native_platform]
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE})
        assert (status, answer.get("status")) == (200, "ok"), answer

    service.call(go)


def test_a_platform_is_checked_and_named(service: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        for path, body in (("/v1/runs", {"image": images.oci, "platform": "linux"}),
                           ("/v1/containers", {"image": images.oci, "platform": "a/b/c/d"}),
                           ("/v1/runs", {"image": images.oci, "platform": 64})):
            status, answer = await _post(s, path, body)
            assert status == 400 and answer["error"]["field"] == "platform", (body, answer)

    service.call(go)


def test_a_tenants_platform_choice_is_its_own(service: Service, images: Any) -> None:
    other = _other(images)

    async def go(s: aiohttp.ClientSession) -> None:
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE,
                                                     "platform": images.native_platform})
        assert status == 200, answer
        status, pulled = await _post(s, "/v1/images/pull",
                                     {"reference": images.multi, "platform": other}, LIMITED)
        assert status == 200 and pulled["digest"] == images.platforms[other], pulled
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE})
        assert (status, answer.get("status")) == (200, "ok"), answer
        status, answer = await _post(s, "/v1/runs", {"image": images.multi, "cmd": TRUE},
                                     LIMITED)
        assert status == 400 and f"built for {_arch(other)}" in answer["error"]["message"]

    service.call(go)
