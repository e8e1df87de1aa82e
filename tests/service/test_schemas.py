"""The request bodies' msgspec types (service/bodies.py) and what the document says of them:
the server's own parsers agree with the patterns, errors name the field and say what to
give, and the rules between fields are in the document too. No service: the types alone."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import msgspec
import pytest

from sandbox import InvalidReference, parse_reference
from service import bodies
from service.app import routes
from service.errors import ApiError
from service.schemas import RUN_BODY, openapi

GOOD_REFERENCES = [
    "busybox", "busybox:1.36", "library/busybox", "ghcr.io/org/app:1.0", "localhost/app",
    "localhost:5000/a/b/c:v_1.2-x", "127.0.0.1:5000/test/busybox:oci", "[::1]:5000/app",
    "[fd00::1]/app", "a__b/c--d/e.f_g", "Registry.Example.com/x",
    "busybox@sha256:" + "a" * 64, "x.io/y:t@sha256:" + "0" * 64, "a" * 64 + ":tag",
    "a" * 64 + "@sha256:" + "0" * 64,
]
BAD_REFERENCES = [
    "", "Busybox", "busybox:", "busybox@sha256:abc", "a" * 64, "UPPER/Case::x",
    "https://x.io/y", "x.io/", "/y", "a b", "a\0b", "a\nb", "[fd]/x", "a-.b/c", "a_b.c/d",
    "a-b.c_d/x", "x//y", "busybox:-tag", "busybox:" + "t" * 129, "x@y@z", "é",
    "x.io/" + "a" * 300,
]


@pytest.mark.parametrize("text", GOOD_REFERENCES)
def test_a_reference_the_pattern_takes_parses(text: str) -> None:
    assert re.search(bodies.REFERENCE_PATTERN, text), text
    parse_reference(text)


@pytest.mark.parametrize("text", BAD_REFERENCES)
def test_a_reference_the_pattern_refuses_is_refused(text: str) -> None:
    assert len(text) > bodies.REFERENCE_MAX or not re.search(bodies.REFERENCE_PATTERN, text)
    if len(text) <= bodies.REFERENCE_MAX:  # longer ones only the schema refuses
        with pytest.raises(InvalidReference):
            parse_reference(text)


@pytest.mark.parametrize(("path", "ok"), [
    ("/", True), ("/a/b", True), ("//a", True), ("/a/", True), ("/.a", True), ("/a..", True),
    ("/..a", True), ("/...", True), ("/.", True), ("a", False), ("", False), ("/..", False),
    ("/a/../b", False), ("/a/..", False), ("/a\0", False)])
def test_container_paths(path: str, ok: bool) -> None:
    assert bool(re.search(bodies.PATH, path)) == ok
    assert ok == (path.startswith("/") and "\0" not in path and ".." not in path.split("/"))


GOOD: dict[str, Any] = {"image": "busybox", "cmd": ["true"]}


@pytest.mark.parametrize(("body", "field", "words"), [
    ({**GOOD, "limits": {"gpus": 1}}, "limits.gpus", "unknown field; known: "),
    ({**GOOD, "env": {"A": 1}}, "env.A", "expected a string, got an integer"),
    ({**GOOD, "env": {"A=B": "1"}}, "env", "without '='"),
    ({**GOOD, "files": [{"path": "/a/../b", "content": ""}]}, "files[0].path", "'..'"),
    ({**GOOD, "files": [{"path": "/a"}]}, "files[0].content", "exactly one of content"),
    ({**GOOD, "limits": {"wall_ms": 0}}, "limits.wall_ms", "0 is out of range"),
    ({**GOOD, "limits": {"pids": True}}, "limits.pids", "got a boolean"),
    ({**GOOD, "limits": {"pids": 2.5}}, "limits.pids", "got a number"),
    ({**GOOD, "network": "host"}, "network", "not one of full, none, proxy"),
    ({**GOOD, "tty_size": {"rows": 1, "cols": 1}}, "tty_size", "only with tty"),
    ({**GOOD, "stdin": "a", "stdin_base64": "YQ=="}, "stdin_base64", "not both"),
    ({**GOOD, "image": "UPPER/Case::x"}, "image", "not an image reference"),
])
def test_errors_name_the_field(body: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ApiError) as e:
        RUN_BODY.validate(body, "")
    assert e.value.status == 400 and e.value.field == field and words in e.value.message, \
        (e.value.field, e.value.message)


def test_what_was_given_is_what_the_handler_gets() -> None:
    body = {**GOOD, "limits": {"wall_ms": 2.0}, "files": [{"path": "/a", "content": "x"}]}
    got = RUN_BODY.validate(body, "")
    assert got == {**GOOD, "limits": {"wall_ms": 2}, "files": [{"path": "/a", "content": "x"}]}
    assert type(got["limits"]["wall_ms"]) is int  # 2.0 is an integer to JSON Schema
    raw = b'{"image": "busybox", "cmd": ["true"], "tty": true}'
    assert RUN_BODY.parse(raw) == {**GOOD, "tty": True}
    assert RUN_BODY.parse(b'{"image": "busybox", "tty": 1}') is None  # validate says why


def test_the_document_says_the_rules_between_fields() -> None:
    doc = openapi(routes(), "test")
    schemas = doc["components"]["schemas"]
    run = schemas["RunRequest"]
    assert {"not": {"required": ["stdin", "stdin_base64"]}} in run["allOf"]
    assert {"anyOf": [{"required": ["tty"]}, {"not": {"required": ["tty_size"]}}]} \
        in run["allOf"]
    assert run["properties"]["env"]["propertyNames"] == {"pattern": bodies.ENV_NAME}
    assert run["properties"]["image"]["pattern"] == bodies.REFERENCE_PATTERN
    assert set(run["properties"]["network"]["enum"]) == {"none", "proxy", "full"}
    assert schemas["JobRequest"]["allOf"] == [{"oneOf": [{"required": ["run"]},
                                                         {"required": ["batch"]}]}]
    ws = doc["paths"]["/v1/runs/ws"]["x-websocket"]
    assert ws["x-first-message"] == {"$ref": "#/components/schemas/RunRequest"}
    assert ws["x-messages"] == {"$ref": "#/components/schemas/WebSocketMessage"}


def test_the_result_is_declared_once() -> None:
    """The API's RunResult is filled by name from the engine's (runbodies.result_json): what it
    does not take from the engine is the handler's own few fields."""
    from sandbox.engine.repeats import Repeats as EngineRepeats
    from service.results import ENGINE_FIGURES, Repeats, RunResult

    api = {f.name for f in msgspec.structs.fields(RunResult)}
    assert api - set(ENGINE_FIGURES) == {
        "image", "pool_hit", "request_id", "stdout", "stderr", "network", "files",
        "file_ids", "file_errors", "repeats", "rerun"}
    assert [f.name for f in msgspec.structs.fields(Repeats)] == \
        [f.name for f in dataclasses.fields(EngineRepeats)]


def test_the_go_judge_document_has_the_configured_policy_maxima() -> None:
    """/run's document is narrowed when the service starts: its limits are the [gojudge]
    policy's maxima as the config leaves them, in go-judge's nanoseconds."""
    from service.api import gojudge
    from service.config import from_dict

    config = from_dict({"gojudge": {"enabled": True, "image": "busybox", "policy": "judge"},
                        "policies": {"judge": {"maxima": {"wall_ms": 7000}}}},
                       {"SANDBOXD_STATE_DIR": "/nonexistent"})
    doc = openapi(routes(), "test")
    gojudge.narrow_document(doc, config)
    rules = doc["components"]["schemas"]["GojudgeCmd"]["allOf"]
    limits = [rule["properties"] for rule in rules if "cpuLimit" in rule.get("properties", {})]
    assert limits == [limits[0]] and limits[0]["realCpuLimit"] == {"maximum": 7000 * 10 ** 6}
    assert limits[0]["cpuLimit"] == {"maximum": 60_000 * 10 ** 6}   # the profile's own
    # clockLimit is the clock only without a realCpuLimit (which go-judge lets win).
    clock = [rule["then"]["properties"]["clockLimit"] for rule in rules
             if "clockLimit" in rule.get("then", {}).get("properties", {})]
    assert clock == [{"maximum": 7000 * 10 ** 6}]
