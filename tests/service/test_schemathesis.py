"""`schemathesis run --checks all` against a running sandboxd, as anyone would run it: the
document the service serves must say everything the server enforces (no schema-valid
request refused with a 400, no schema-invalid one accepted), every response must be what
it documents, and a 405 must carry the Allow header the document implies.

The service is this module's own (its own state directory, a token limited to the test
registry: a reference to any other registry is a quick 403, never a pull from the
internet). Bounded to stay under a minute on 2 cores: the boundary values of every field
(the coverage phase) and a few random requests per operation, a fixed seed so that a
failure comes back the same way, and a time budget after which Schemathesis stops where it
is (the long version: the same command without --max-time, see docs/architecture.md).
Left out: pushing (it writes to the registry the whole session shares) and the two tar
bodies (build and import), which no generator can make and whose own tests cover them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import requests

from tests.service.conftest import MAIN_TOKEN, start_service, stop, wait_ready

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
MAX_EXAMPLES = 3
SEED = 15
MAX_TIME_S = 20
RUN_TIMEOUT_S = 90


@dataclass(frozen=True)
class Target:
    url: str
    log: Path
    workdir: Path


@pytest.fixture(scope="module")
def target(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("sandboxd-schemathesis")
    config = f"""
[server]
session_idle_s = 60
shutdown_deadline_s = 2

[[tokens]]
token = "{MAIN_TOKEN}"
name = "main"
registries = ["{registry.host}"]

[registries."{registry.host}"]

[pools]
min_idle = 0
max_idle = 1

# go-judge's endpoints (off by default) are checked too.
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
        yield Target(wait_ready(proc, log), log, workdir)
    finally:
        stop(proc, log)


@pytest.mark.one_pass
def test_schemathesis_finds_nothing(target: Target) -> None:
    cwd = target.workdir / "schemathesis"   # its reports and cassettes, not the checkout's
    cwd.mkdir()
    args = [str(SCHEMATHESIS), "run", f"{target.url}/openapi.json", "--checks", "all",
            "-H", f"Authorization: Bearer {MAIN_TOKEN}",
            "--exclude-path", "/v1/images/push", "--exclude-path", "/v1/build",
            "--exclude-path", "/v1/images/import",
            "--phases", "coverage,fuzzing", "--max-examples", str(MAX_EXAMPLES),
            "--max-time", str(MAX_TIME_S), "--seed", str(SEED),
            "--generation-database", "none", "--request-timeout", "30",
            "--workers", "2", "--no-color"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEMATHESIS_")}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-20000:]
    assert "Traceback" not in target.log.read_text(errors="replace")


def test_overlong_request_line(target: Target) -> None:
    """What a fuzzer's long path parameters hit: aiohttp's parser refuses a request line
    over 8190 bytes before any handler runs; that must stay a 4xx and log no traceback."""
    before = target.log.read_text(errors="replace")
    r = requests.get(f"{target.url}/v1/images/{'x' * 9000}",
                     headers={"Authorization": f"Bearer {MAIN_TOKEN}"}, timeout=10)
    assert r.status_code == 400
    new = target.log.read_text(errors="replace")[len(before):]
    assert "Traceback" not in new, new


MS = 1_000_000
# go-judge requests /run refuses with a 400 (a field of each beyond what the schema of the
# whole request allows): the document must call each invalid, not only the server.
GO_JUDGE_REFUSED = [
    {"copyIn": {"a": {"src": "/etc/passwd"}}},
    {"copyIn": {"a": {"name": "x"}}},
    {"copyIn": {"../a": {"content": ""}}},
    {"copyOut": ["/tmp/../x"]},
    {"cpuLimit": 10 ** 15},                  # over the judge policy's maximum
    {"clockLimit": 10 ** 15},
    {"realCpuLimit": 10 ** 15, "clockLimit": 1000 * MS},   # realCpuLimit wins, as in go-judge
    {"cpuRateLimit": 5},
    {"cpuSetLimit": "4096"},                 # no host has it, nor the policy's maxima
    {"tty": True},
    {"env": ["NOEQUALS"]},
    {"addressSpaceLimit": True},              # with no memoryLimit to limit it to
    {"addressSpaceLimit": True, "memoryLimit": None},
    {"files": [None, {"content": "x"}]},      # an output takes a collector
    {"files": [{"content": "", "streamIn": True}]},
]


def test_the_document_says_what_go_judges_run_refuses(target: Target) -> None:
    """Each request /run refuses is invalid by /openapi.json, and a request it runs is
    valid: the rules of the translation and the [gojudge] policy's maxima are in the
    document as the server checks them."""
    headers = {"Authorization": f"Bearer {MAIN_TOKEN}"}
    doc = requests.get(f"{target.url}/openapi.json", headers=headers, timeout=10).json()
    schema = {**doc, "$ref": "#/components/schemas/GojudgeRequest"}
    validator = jsonschema.Draft202012Validator(schema)
    cmd = {"args": ["/bin/true"], "cpuLimit": 1000 * MS}
    pipes = [{"in": {"index": 0, "fd": 1}, "out": {"index": 1, "fd": 0}}]
    refused = [{"cmd": [{**cmd, **extra}]} for extra in GO_JUDGE_REFUSED]
    refused.append({"cmd": [cmd, cmd], "pipeMapping": pipes * 2})   # fd 1 piped twice
    for body in refused:
        r = requests.post(f"{target.url}/run", json=body, headers=headers, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert not validator.is_valid(body), (body, r.text)
    for body in ({"cmd": [cmd]}, {"cmd": [cmd, cmd], "pipeMapping": pipes}):
        r = requests.post(f"{target.url}/run", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (body, r.text)
        assert validator.is_valid(body), body
