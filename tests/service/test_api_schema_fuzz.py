"""Schemathesis against a running sandboxd's own /openapi.json: every operation, generated
valid and invalid requests, and two properties for each response: never a 5xx, and the
response is what the document says.

The service is this module's own (its own state directory): the fuzzer creates sessions,
tags and removes images and runs the image GC, which must not touch what other tests share.
Inputs are bounded so that the module stays near a minute on 2 cores: few examples per
operation, no coverage phase (it enumerates every boundary of every field), image references
kept on the test registry (never a pull from the internet), run time limits capped, and
container paths pointed at one real session so that exec and files do real work.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from service.api import VERSION
from service.app import routes
from service.schemas import openapi
from tests.service.conftest import MAIN_TOKEN, start_service, wait_ready

AUTH = {"Authorization": f"Bearer {MAIN_TOKEN}"}
MAX_EXAMPLES = 25
RUN_LIMIT_MS = 2000
CONFIG = schemathesis.Config.from_dict({
    "phases": {"coverage": {"enabled": False}, "stateful": {"enabled": False}},
    "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
})

# The import body is a tar: sent as raw bytes, like any binary body.
schemathesis.serializer.alias("application/x-tar", "application/octet-stream")

# "METHOD /path": what the service's document gets wrong there. For these operations only
# the response-schema check is left out of the fuzzing (the 5xx check still runs), and
# test_known_schema_mismatch expects it to fail. None today.
KNOWN_SCHEMA_MISMATCHES: dict[str, str] = {}


@dataclass(frozen=True)
class Target:
    url: str
    image: str            # a small image on the test registry
    registry_host: str
    session_id: str       # a live session for the /v1/containers/{id}/... operations
    log: Path


@pytest.fixture(scope="module")
def fuzz_target(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("sandboxd-fuzz")
    config = f"""
[server]
session_idle_s = 60
shutdown_deadline_s = 2

[[tokens]]
token = "{MAIN_TOKEN}"
name = "main"

[registries."{registry.host}"]

[pools]
min_idle = 0
max_idle = 1

# go-judge's endpoints (off by default) are fuzzed too: never a 5xx, as documented.
[gojudge]
enabled = true
image = "{images.oci}"
policy = "judge"

[limits]
json_body_bytes = {256 << 10}
file_body_bytes = {256 << 10}
import_body_bytes = {1 << 20}
"""
    proc, log = start_service(workdir, config)
    try:
        url = wait_ready(proc, log)
        r = requests.post(f"{url}/v1/containers", json={"image": images.oci}, headers=AUTH,
                          timeout=60)
        assert r.status_code == 201, r.text
        yield Target(url, images.oci, registry.host, r.json()["id"], log)
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"sandboxd did not stop on SIGTERM:\n{log.read_text()}"
                                 ) from None
        text = log.read_text(errors="replace")
        assert code == 0, f"sandboxd exited with {code}:\n{text}"
        assert "Traceback" not in text, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The document the service serves is built from its route table at start; the fuzzer loads
# it at collection, when no service runs yet, and test_served_document_is_this_one checks that
# the running service serves exactly it. (A lazy schema from a fixture would fetch it, but
# schemathesis 4.32's lazy loader needs `Function._nodeid`, gone in pytest 9.2.)
DOCUMENT = openapi(routes(), VERSION)
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG).exclude(
    # Writes to the registry the whole session shares, or to any host the body names; the
    # image tests cover it against a registry of their own making.
    name="POST /v1/images/push",
)


def test_served_document_is_this_one(fuzz_target: Target) -> None:
    r = requests.get(f"{fuzz_target.url}/openapi.json", headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    assert orjson.loads(r.content) == orjson.loads(orjson.dumps(DOCUMENT))


def _bounded(case: schemathesis.Case, target: Target) -> None:
    """Keep a generated request cheap and local without making it valid: only values of the
    right type are replaced, so type errors still reach the service."""
    label = case.operation.label
    if isinstance(case.body, dict) and label == "POST /v1/jobs":
        # A job's run or batch is bounded as a run is (an image pulled from the internet or
        # a long sleep would outlast the module).
        for kind in ("run", "batch"):
            if isinstance(case.body.get(kind), dict):
                case.body[kind].setdefault("limits", {"wall_ms": RUN_LIMIT_MS})
                _bounded_body(case.body[kind], label, target)
                for each in case.body[kind].get("cases", ()) if kind == "batch" else ():
                    _bounded_body(each, label, target)
    if isinstance(case.body, dict) and label == "POST /v1/batches":
        # Every case is a run: bounded as one (the batch's limits, and each case's own).
        case.body.setdefault("limits", {"wall_ms": RUN_LIMIT_MS})
        cases = case.body.get("cases")
        for each in cases if isinstance(cases, list) else ():
            _bounded_body(each, label, target)
    _bounded_body(case.body, label, target)
    # go-judge's /run takes its image from the query: the test registry's, not Docker Hub's.
    query = case.query
    if label == "POST /run" and query is not None and isinstance(query.get("image"), str):
        query["image"] = target.image
    params = case.path_parameters
    if (params is not None and isinstance(params.get("id"), str)
            and case.operation.path.startswith("/v1/containers/{id}")
            and label != "DELETE /v1/containers/{id}"):
        params["id"] = target.session_id


def _bounded_body(body: Any, label: str, target: Target) -> None:
    if isinstance(body, dict):
        if isinstance(body.get("image"), str):
            body["image"] = target.image
        if label == "POST /v1/images/pull" and isinstance(body.get("reference"), str):
            # A repository on the test registry: malformed names still fail to parse, and
            # well-formed ones are a quick 404 there, never a pull from the internet.
            body["reference"] = f"{target.registry_host}/fuzz/{body['reference']}"
        limits = body.get("limits")
        if isinstance(limits, dict):
            for key in ("wall_ms", "cpu_ms"):
                if isinstance(limits.get(key), int) and not isinstance(limits[key], bool):
                    limits[key] = min(limits[key], RUN_LIMIT_MS)
            if "wall_ms" not in limits:
                limits["wall_ms"] = RUN_LIMIT_MS
        elif label in ("POST /v1/runs", "POST /v1/containers/{id}/exec") and limits is None:
            body["limits"] = {"wall_ms": RUN_LIMIT_MS}
        # A pipeline's processes: each bounded as a run (its limits go over the body's).
        processes = body.get("processes")
        for each in processes if isinstance(processes, list) else ():
            _bounded_body(each, label, target)


@schema.parametrize()
def test_api_conforms(case: schemathesis.Case, fuzz_target: Target) -> None:
    _bounded(case, fuzz_target)
    checks = [not_a_server_error]
    if case.operation.label not in KNOWN_SCHEMA_MISMATCHES:
        checks.append(response_schema_conformance)
    case.call_and_validate(base_url=fuzz_target.url, headers=AUTH, checks=checks, timeout=30)


@pytest.mark.parametrize("label", [
    pytest.param(label, marks=pytest.mark.xfail(reason=reason, strict=True))
    for label, reason in KNOWN_SCHEMA_MISMATCHES.items()])
def test_known_schema_mismatch(label: str, fuzz_target: Target) -> None:
    """The response-schema check where it fails today, on a plain valid request: strict, so
    the day the service's schema is fixed this passes and the entry above must go."""
    method, path = label.split(" ", 1)
    case = schema[path][method].Case()
    case.call_and_validate(base_url=fuzz_target.url, headers=AUTH,
                           checks=[response_schema_conformance], timeout=30)



def test_overlong_request_line(fuzz_target: Target) -> None:
    """What the fuzzer's long path parameters hit: aiohttp's parser refuses a request line
    over 8190 bytes before any handler runs; that must stay a 4xx and log no traceback."""
    before = fuzz_target.log.read_text(errors="replace")
    r = requests.get(f"{fuzz_target.url}/v1/images/{'x' * 9000}", headers=AUTH, timeout=10)
    assert r.status_code == 400
    new = fuzz_target.log.read_text(errors="replace")[len(before):]
    assert "Traceback" not in new, new
