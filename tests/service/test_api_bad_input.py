"""Hostile and careless input: every case is a 4xx with a JSON error naming what is wrong
(and the field when one is to blame), never a 5xx."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.service.conftest import JSON_CAP, Service

IMAGE = "{image}"  # replaced by the test registry's busybox
GOOD: dict[str, Any] = {"image": IMAGE, "cmd": ["true"]}

# (name, body, expected status, expected field or None, words the message must contain)
CASES: list[tuple[str, Any, int, str | None, str]] = [
    ("not an object", ["image"], 400, None, "object"),
    ("image wrong type", {"image": 5}, 400, "image", "string"),
    ("image missing", {"cmd": ["true"]}, 400, "image", "required"),
    ("cmd a string", {**GOOD, "cmd": "true"}, 400, "cmd", "array"),
    ("cmd item wrong type", {**GOOD, "cmd": [1]}, 400, "cmd[0]", "string"),
    ("empty cmd", {**GOOD, "cmd": []}, 400, "cmd", "at least"),
    ("unknown field", {**GOOD, "privileged": True}, 400, "privileged", "unknown"),
    ("NUL in cmd", {**GOOD, "cmd": ["a\0b"]}, 400, "cmd[0]", "NUL"),
    ("NUL in env name", {**GOOD, "env": {"A\0": "1"}}, 400, "env", "NUL"),
    ("env value not a string", {**GOOD, "env": {"A": 1}}, 400, "env.A", "string"),
    ("env name with =", {**GOOD, "env": {"A=B": "1"}}, 400, "env", "'='"),
    ("relative cwd", {**GOOD, "cwd": "tmp"}, 400, "cwd", "absolute"),
    ("file path with ..", {**GOOD, "files": [{"path": "/tmp/../etc/passwd", "content": ""}]},
     400, "files[0].path", ".."),
    ("relative file path", {**GOOD, "files": [{"path": "../x", "content": ""}]},
     400, "files[0].path", "absolute"),
    ("NUL in file path", {**GOOD, "files": [{"path": "/tmp/a\0b", "content": ""}]},
     400, "files[0].path", "NUL"),
    ("file without content", {**GOOD, "files": [{"path": "/tmp/a"}]}, 400,
     "files[0].content", "exactly one"),
    ("file mode too big", {**GOOD, "files": [{"path": "/a", "content": "", "mode": 99999}]},
     400, "files[0].mode", "range"),
    ("bad base64", {**GOOD, "stdin_base64": "***"}, 400, "stdin_base64", "base64"),
    ("stdin twice", {**GOOD, "stdin": "a", "stdin_base64": "YQ=="}, 400, "stdin_base64",
     "not both"),
    ("limit a string", {**GOOD, "limits": {"cpu_ms": "100"}}, 400, "limits.cpu_ms",
     "integer"),
    ("limit a boolean", {**GOOD, "limits": {"pids": True}}, 400, "limits.pids", "integer"),
    ("limit zero", {**GOOD, "limits": {"wall_ms": 0}}, 400, "limits.wall_ms", "range"),
    ("unknown limit", {**GOOD, "limits": {"gpus": 1}}, 400, "limits.gpus", "unknown"),
    ("limit above the maximum", {**GOOD, "policy": "judge",
                                 "limits": {"cpu_ms": 10**9}}, 400, "limits.cpu_ms", "60000"),
    ("unknown policy", {**GOOD, "policy": "yolo"}, 400, "policy", "known profiles"),
    ("network host", {**GOOD, "network": "host"}, 400, "network", "none"),
    ("bad output encoding", {**GOOD, "output_encoding": "latin1"}, 400, "output_encoding",
     "base64"),
    ("malformed reference", {**GOOD, "image": "UPPER/Case::x"}, 400, "image", "reference"),
    ("reference with a bad digest", {**GOOD, "image": "busybox@sha256:abc"}, 400, "image",
     "digest"),
    ("unknown user", {**GOOD, "user": "nobody-here"}, 400, None, "does not exist"),
]


def _fill(value: Any, image: str) -> Any:
    if value == IMAGE:
        return image
    if isinstance(value, dict):
        return {k: _fill(v, image) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, image) for v in value]
    return value


def _check(status: int, ctype: str, body: Any, want: int, field: str | None,
           words: str) -> None:
    assert ctype == "application/json"
    assert status == want, body
    err = body["error"]
    assert set(err) <= {"code", "message", "field"} and err["code"] and err["message"]
    assert words in err["message"], err
    assert err.get("field") == field, err


@pytest.mark.parametrize(("name", "body", "status", "field", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_run_bodies(service: Service, images: Any, name: str, body: Any, status: int,
                        field: str | None, words: str) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[int, str, Any]:
        async with s.post("/v1/runs", json=_fill(body, images.oci)) as r:
            return r.status, r.content_type, await r.json()
    _check(*service.call(go), status, field, words)


RAW_CASES = [
    ("malformed JSON", b'{"image": ', "application/json", 400, "not valid JSON"),
    ("lone surrogate", b'{"image": "\\ud800"}', "application/json", 400, "not valid JSON"),
    ("wrong content type", b'{"image": "x"}', "text/plain", 415, "application/json"),
    ("huge body", b'{"image": "' + b"a" * (JSON_CAP + 10) + b'"}', "application/json", 413,
     "too large"),
]


@pytest.mark.parametrize(("name", "raw", "ctype", "status", "words"), RAW_CASES,
                         ids=[c[0] for c in RAW_CASES])
def test_bad_raw_bodies(service: Service, name: str, raw: bytes, ctype: str, status: int,
                        words: str) -> None:
    async def go(s: aiohttp.ClientSession) -> tuple[int, str, Any]:
        async with s.post("/v1/runs", data=raw, headers={"Content-Type": ctype}) as r:
            return r.status, r.content_type, await r.json()
    got_status, got_ctype, body = service.call(go)
    assert got_status == status, body
    assert words in body["error"]["message"] and got_ctype == "application/json"


def test_a_chunked_body_past_the_cap_is_refused(service: Service) -> None:
    async def chunks() -> Any:
        for _ in range(20):
            yield b" " * (JSON_CAP // 10)

    async def go(s: aiohttp.ClientSession) -> tuple[int, Any]:
        async with s.post("/v1/runs", data=chunks(),
                          headers={"Content-Type": "application/json"}) as r:
            return r.status, await r.json()
    status, body = service.call(go)
    assert status == 413 and body["error"]["code"] == "body_too_large"


def test_other_endpoints_refuse_bad_input_too(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> list[tuple[int, Any]]:
        out = []
        for method, path, kw in (
                ("POST", "/v1/images/pull", {"json": {"reference": "a" * 2000}}),
                ("POST", "/v1/images/pull", {"json": {"reference": "x", "platform": "nope"}}),
                ("POST", "/v1/images/tag", {"json": {"source": "x"}}),
                ("POST", "/v1/images/gc", {"json": {"budget_bytes": -1}}),
                ("POST", "/v1/containers", {"json": {"image": "x", "cmd": ["true"]}}),
                ("POST", "/v1/images/import?reference=Bad::Ref", {"data": b"x"}),
                ("POST", "/v1/images/import", {"data": b"x"}),
                ("GET", "/v1/images/Bad::Ref", {}),
                ("DELETE", "/v1/images/x?force=maybe", {}),
                ("GET", "/v1/containers/nope/files?path=/etc/passwd", {}),
                ("GET", "/v1/nothing", {})):
            async with s.request(method, path, **kw) as r:
                out.append((r.status, await r.json()))
        return out
    results = service.call(go)
    assert [s for s, _ in results] == [400, 400, 400, 400, 400, 400, 400, 400, 400, 404, 404]
    assert all(set(b) == {"error"} and b["error"]["message"] for _, b in results)
    fields = [b["error"].get("field") for _, b in results]
    assert fields[:5] == ["reference", "platform", "target", "budget_bytes", "cmd"]
