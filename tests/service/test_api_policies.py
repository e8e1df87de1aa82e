"""Policy limits from the config: the service's judge maxima and defaults are lowered in
conftest's [policies.judge] tables; runs and sessions are held to them, /v1/info shows them."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.service.conftest import JUDGE_WALL_DEFAULT, JUDGE_WALL_MAX, Service

# Within the judge profile file's maximum (120000), above the config's.
ABOVE = JUDGE_WALL_MAX + 30000


def test_info_shows_the_effective_limits(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> Any:
        async with s.get("/v1/info") as r:
            assert r.status == 200
            return (await r.json())["policies"]
    policies = service.call(go)
    assert set(policies) >= {"default", "judge"}
    judge = policies["judge"]
    assert judge["defaults"]["wall_ms"] == JUDGE_WALL_DEFAULT
    assert judge["maxima"]["wall_ms"] == JUDGE_WALL_MAX
    assert judge["maxima"]["cpu_ms"] == 60000  # not in the config: the profile file's
    assert policies["default"]["maxima"]["wall_ms"] == 1800000  # untouched


def test_a_limit_above_the_configured_maximum_is_refused(service: Service,
                                                         images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        out = []
        for path, body in (("/v1/runs", {"image": images.oci, "cmd": ["true"],
                                         "policy": "judge", "limits": {"wall_ms": ABOVE}}),
                           ("/v1/containers", {"image": images.oci, "policy": "judge",
                                               "limits": {"wall_ms": ABOVE}})):
            async with s.post(path, json=body) as r:
                out.append((r.status, await r.json()))
        # the same limit is fine where the config lowered nothing
        async with s.post("/v1/runs", json={"image": images.oci, "cmd": ["true"],
                                            "limits": {"wall_ms": ABOVE}}) as r:
            out.append((r.status, await r.json()))
        return out
    (run_status, run), (session_status, session), (other_status, other) = service.call(go)
    for status, body in ((run_status, run), (session_status, session)):
        assert status == 400, body
        assert body["error"]["field"] == "limits.wall_ms"
        assert str(JUDGE_WALL_MAX) in body["error"]["message"]
    assert other_status == 200 and other["status"] == "ok", other
