"""go-judge's API (POST /run, /file, GET /version) on a service of its own with [gojudge]
enabled: go-judge's README examples as bodies, its status names and units (ns, bytes), its
collectors, copyOut / copyOutCached / copyOutMax, pipeMapping, and tenants kept apart."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import psutil
import pytest

from service.config import ConfigError, from_dict
from tests.service.conftest import Service, start_service, stop_service, wait_ready

A_TOKEN = "gojudge-a-0123456789abcdef"
B_TOKEN = "gojudge-b-0123456789abcdef"
MS = 1_000_000          # go-judge's times are nanoseconds
MiB = 1 << 20
# The README's "add two numbers", as a shell script: the test image has no compiler, so
# "compiling" is a copy that the run then executes from its copyOutCached id.
SOURCE = "#!/bin/sh\nread a b\necho $((a + b))\n"
COLLECT = [{"name": "stdout", "max": 10240}, {"name": "stderr", "max": 10240}]


@pytest.fixture(scope="module")
def gojudge(registry: Any, images: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Service]:
    workdir = tmp_path_factory.mktemp("gojudge")
    config = f"""
[[tokens]]
token = "{A_TOKEN}"
name = "a"

[[tokens]]
token = "{B_TOKEN}"
name = "b"

[registries."{registry.host}"]

[images]
public = ["{images.oci}"]

[gojudge]
enabled = true
image = "{images.oci}"
policy = "judge"
"""
    proc, log = start_service(workdir, config)
    svc = Service(wait_ready(proc, log), proc, log, workdir / "state", registry.host)
    yield svc
    stop_service(svc, workdir)


def _call(svc: Service, token: str | None, fn: Any) -> Any:
    """`fn(session)` with a client session that sends `token` (none: no header)."""
    async def go() -> Any:
        async with aiohttp.ClientSession(svc.url, headers=svc.headers(token)) as s:
            return await fn(s)
    return asyncio.run(go())


async def _run(s: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post("/run", json=body) as r:
        return r.status, await r.json()


def _cmd(args: list[str], **extra: Any) -> dict[str, Any]:
    """A cmd as go-judge's README writes them: PATH, stdin empty, stdout and stderr
    collected, 10 s of CPU, 100 MiB, 50 processes."""
    return {"args": args, "env": ["PATH=/usr/bin:/bin"],
            "files": [{"content": ""}, *COLLECT], "cpuLimit": 10_000 * MS,
            "memoryLimit": 100 * MiB, "procLimit": 50, **extra}


def test_compile_then_run_from_the_cached_binary(gojudge: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        status, compiled = await _run(s, {"cmd": [_cmd(
            ["/bin/cp", "a.sh", "a"], copyIn={"a.sh": {"content": SOURCE}},
            copyOut=["stdout", "stderr"], copyOutCached=["a.sh", "a"])]})
        assert status == 200, compiled
        [c] = compiled
        assert c["status"] == "Accepted" and c["exitStatus"] == 0, c
        assert c["files"] == {"stdout": "", "stderr": ""}
        assert set(c["fileIds"]) == {"a", "a.sh"} and c["fileIds"]["a"] == c["fileIds"]["a.sh"]
        assert all(isinstance(c[k], int) and c[k] >= 0 for k in ("time", "memory", "runTime"))
        assert c["runTime"] > 100_000, c  # nanoseconds: even a cp takes more than 0.1 ms
        status, ran = await _run(s, {"cmd": [{
            "args": ["a"], "env": ["PATH=/usr/bin:/bin"],
            "files": [{"content": "1 1"}, *COLLECT], "cpuLimit": 10_000 * MS,
            "memoryLimit": 100 * MiB, "procLimit": 50,
            "copyIn": {"a": {"fileId": c["fileIds"]["a"]}}, "copyOut": ["stdout"]}]})
        assert status == 200, ran
        assert ran[0]["status"] == "Accepted" and ran[0]["files"] == {"stdout": "2\n"}, ran
        # The cached file is listed under its copyOutCached name, downloaded, deleted.
        async with s.get("/file") as r:
            assert r.status == 200 and (await r.json())[c["fileIds"]["a"]] in ("a", "a.sh")
        async with s.get(f"/file/{c['fileIds']['a']}") as r:
            assert r.status == 200 and await r.text() == SOURCE
        async with s.delete(f"/file/{c['fileIds']['a']}") as r:
            assert r.status == 200
        async with s.get(f"/file/{c['fileIds']['a']}") as r:
            assert r.status == 404
    _call(gojudge, A_TOKEN, go)


def test_real_cpu_limit_wins_over_clock_limit_as_in_go_judge(gojudge: Service) -> None:
    """go-judge takes realCpuLimit, the older name of the clock limit, over clockLimit when
    both are set: a 1 s sleep under realCpuLimit 300 ms and clockLimit 3 s is a TLE."""
    async def go(s: aiohttp.ClientSession) -> None:
        code, [r] = await _run(s, {"cmd": [_cmd(["/bin/sleep", "1"], cpuLimit=1000 * MS,
                                                realCpuLimit=300 * MS, clockLimit=3000 * MS)]})
        assert code == 200, r
        assert r["status"] == "Time Limit Exceeded", r
        assert 300 * MS <= r["runTime"] < 1000 * MS, r
    _call(gojudge, A_TOKEN, go)


@pytest.mark.parametrize(("args", "limits", "status", "exit_status"), [
    (["/bin/sh", "-c", "while :; do :; done"], {"cpuLimit": 200 * MS, "clockLimit": 5000 * MS},
     "Time Limit Exceeded", 9),
    (["/bin/sleep", "5"], {"cpuLimit": 1000 * MS, "clockLimit": 300 * MS},
     "Time Limit Exceeded", 9),
    (["/bin/sh", "-c", "x=a; while :; do x=$x$x; done"], {"memoryLimit": 32 * MiB},
     "Memory Limit Exceeded", 9),
    (["/bin/sh", "-c", "exit 3"], {}, "Nonzero Exit Status", 3),
    (["/bin/sh", "-c", "kill -SEGV $$"], {}, "Signalled", 11),
    (["/nonexistent"], {}, "Internal Error", 127),   # go-judge: "Program is not exist"
])
def test_statuses_and_units(gojudge: Service, args: list[str], limits: dict[str, int],
                            status: str, exit_status: int) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        code, [r] = await _run(s, {"cmd": [_cmd(args, **limits)]})
        assert code == 200, r
        assert r["status"] == status and r["exitStatus"] == exit_status, r
        if "cpuLimit" in limits and status.startswith("Time") and limits["clockLimit"] > \
                limits["cpuLimit"]:
            assert r["time"] >= limits["cpuLimit"], r            # CPU time in ns
        if "clockLimit" in limits and limits["clockLimit"] < limits["cpuLimit"]:
            assert r["runTime"] >= limits["clockLimit"], r       # wall time in ns
        if "memoryLimit" in limits:
            assert 0 < r["memory"] <= limits["memoryLimit"], r   # bytes
    _call(gojudge, A_TOKEN, go)


def test_collectors_and_copy_out_max(gojudge: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        # A collector over its max: Output Limit Exceeded, the first max bytes kept.
        _, [r] = await _run(s, {"cmd": [_cmd(
            ["/bin/sh", "-c", "printf '%0100d' 0"],
            files=[{"content": ""}, {"name": "stdout", "max": 10}, COLLECT[1]],
            copyOut=["stdout"])]})
        assert r["status"] == "Output Limit Exceeded" and r["files"]["stdout"] == "0" * 10, r
        write = ["/bin/sh", "-c", "printf '%0100d' 0 > out.txt"]
        # A file over copyOutMax: File Error and no content; truncated when asked for.
        _, [r] = await _run(s, {"cmd": [_cmd(write, copyOut=["out.txt"], copyOutMax=10)]})
        assert r["status"] == "File Error" and r["files"] == {}, r
        assert [e["type"] for e in r["fileError"]] == ["CopyOutSizeExceeded"], r
        _, [r] = await _run(s, {"cmd": [_cmd(write, copyOut=["out.txt"], copyOutMax=10,
                                             copyOutTruncate=True)]})
        assert r["files"] == {"out.txt": "0" * 10}, r
        assert r["fileError"][0]["type"] == "CopyOutSizeExceeded", r
        # A missing file: File Error, unless its name ends in '?'.
        _, [r] = await _run(s, {"cmd": [_cmd(["/bin/true"], copyOut=["nothing"])]})
        assert r["status"] == "File Error" and r["fileError"][0]["name"] == "nothing", r
        _, [r] = await _run(s, {"cmd": [_cmd(["/bin/true"], copyOut=["nothing?"])]})
        assert r["status"] == "Accepted" and "fileError" not in r, r
    _call(gojudge, A_TOKEN, go)


def test_stdin_from_a_file_cpu_limits_and_a_refused_copy_in(gojudge: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        form = aiohttp.FormData()
        form.add_field("file", b"3 4\n", filename="input.txt")
        async with s.post("/file", data=form) as r:
            fid = await r.json()
        _, [r] = await _run(s, {"cmd": [_cmd(
            ["/bin/cat"], files=[{"fileId": fid}, *COLLECT], cpuRateLimit=500,
            cpuSetLimit="0", addressSpaceLimit=True, copyOut=["stdout"])]})
        assert r["status"] == "Accepted" and r["files"] == {"stdout": "3 4\n"}, r
        # The judge policy's root is read-only: go-judge's File Error, nothing run.
        _, [r] = await _run(s, {"cmd": [_cmd(["/bin/true"],
                                             copyIn={"/etc/x": {"content": "x"}})]})
        assert r["status"] == "File Error" and r["runTime"] == 0, r
        assert r["fileError"] == [{"name": "/etc/x", "type": "CopyInCreateFile",
                                   "message": r["error"]}], r
    _call(gojudge, A_TOKEN, go)


def test_several_commands_run_and_answer_in_order(gojudge: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        code, results = await _run(s, {"cmd": [
            _cmd(["/bin/sh", "-c", "sleep 0.2; echo first"], copyOut=["stdout"]),
            _cmd(["/bin/echo", "second"], copyOut=["stdout"])]})
        assert code == 200, results
        assert [r["files"]["stdout"] for r in results] == ["first\n", "second\n"]
    _call(gojudge, A_TOKEN, go)


def test_the_readmes_interaction_example(gojudge: Service) -> None:
    """go-judge's "Multiple (interaction problem)" body as its README gives it: cmd 0's
    stdout piped to cmd 1's stdin; then the same pipe proxied, its content copied out."""
    def body(pipe: dict[str, Any], copy_out: list[str]) -> dict[str, Any]:
        return {"cmd": [{
            "args": ["/bin/cat", "1"], "env": ["PATH=/usr/bin:/bin"],
            "files": [{"content": ""}, None, {"name": "stderr", "max": 10240}],
            "cpuLimit": 1000 * MS, "memoryLimit": MiB, "procLimit": 50,
            "copyIn": {"1": {"content": "TEST 1"}}, "copyOut": copy_out,
        }, {
            "args": ["/bin/cat"], "env": ["PATH=/usr/bin:/bin"],
            "files": [None, {"name": "stdout", "max": 10240}, {"name": "stderr", "max": 10240}],
            "cpuLimit": 1000 * MS, "memoryLimit": MiB, "procLimit": 50,
            "copyOut": ["stdout", "stderr"]}],
            "pipeMapping": [{"in": {"index": 0, "fd": 1}, "out": {"index": 1, "fd": 0}, **pipe}]}

    async def go(s: aiohttp.ClientSession) -> None:
        code, results = await _run(s, body({}, ["stderr"]))
        assert code == 200, results
        assert [r["status"] for r in results] == ["Accepted", "Accepted"], results
        assert results[0]["files"] == {"stderr": ""}, results
        assert results[1]["files"] == {"stdout": "TEST 1", "stderr": ""}, results
        code, results = await _run(s, body({"proxy": True, "name": "pipe", "max": 4},
                                           ["stderr", "pipe"]))
        assert code == 200, results
        assert results[0]["files"] == {"stderr": "", "pipe": "TEST"}, results
        assert results[1]["files"]["stdout"] == "TEST 1", results
        # A copyIn the container refuses: nothing runs, each cmd a File Error.
        refused = body({}, ["stderr"])
        refused["cmd"][0]["copyIn"] = {"/etc/1": {"content": "x"}}
        code, results = await _run(s, refused)
        assert code == 200 and [r["status"] for r in results] == ["File Error"] * 2, results
    _call(gojudge, A_TOKEN, go)


def test_go_clients_bodies_are_read_as_go_reads_them(gojudge: Service) -> None:
    """Go clients send every field of their structs (nulls, zeros); the README's last
    example has a field go-judge ignores (cpuRate)."""
    async def go(s: aiohttp.ClientSession) -> None:
        null_file = {"src": None, "content": None, "fileId": None, "symlink": None,
                     "streamIn": False, "streamOut": False, "pipe": False}
        body = {"requestId": "", "pipeMapping": None, "cmd": [{
            "args": ["/bin/echo", "hi"], "env": ["PATH=/bin"], "cpuRate": 0.1,
            "files": [{**null_file, "content": ""},
                      {**null_file, "name": "stdout", "max": 100},
                      {**null_file, "name": "stderr", "max": 100}],
            "cpuLimit": 1000 * MS, "clockLimit": 0, "memoryLimit": 64 * MiB, "stackLimit": 0,
            "procLimit": 10, "cpuRateLimit": 0, "cpuSetLimit": "", "copyIn": None,
            "copyOut": ["stdout"], "copyOutCached": None, "copyOutMax": 0, "copyOutDir": "",
            "copyOutTruncate": False, "tty": False, "strictMemoryLimit": False,
            "dataSegmentLimit": False, "addressSpaceLimit": False}]}
        code, r = await _run(s, body)
        assert code == 200 and r[0]["files"] == {"stdout": "hi\n"}, r
    _call(gojudge, A_TOKEN, go)


@pytest.mark.parametrize(("cmd", "pipes", "field"), [
    ({"cpuLimit": "1s"}, None, "cmd[0].cpuLimit"),
    ({"copyIn": {"x": {"src": "/etc/passwd"}}}, None, 'cmd[0].copyIn["x"].src'),
    ({"copyIn": {"x": {"fileId": "sha256:0"}}}, None, 'cmd[0].copyIn["x"].fileId'),
    ({"copyIn": {"../x": {"content": ""}}}, None, 'cmd[0].copyIn["../x"]'),
    ({"env": ["NOEQUALS"]}, None, "cmd[0].env[0]"),
    ({"cpuLimit": 10 ** 15}, None, "cmd[0].cpuLimit"),
    ({"files": [{"content": ""}, {"content": "x"}]}, None, "cmd[0].files[1]"),
    ({}, [{"in": {"index": 0, "fd": 1}, "out": {"index": 0, "fd": 1}}],
     "pipeMapping[0].out.fd"),
    ({}, [{"in": {"index": 3, "fd": 1}, "out": {"index": 0, "fd": 0}}],
     "pipeMapping[0].in.index"),
    ({}, [{"in": {"index": 0, "fd": 1}, "out": {"index": 0, "fd": 0}}] * 2,
     "pipeMapping[1].in"),
])
def test_a_bad_request_is_a_4xx_naming_the_go_judge_field(
        gojudge: Service, cmd: dict[str, Any], pipes: Any, field: str) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        body: dict[str, Any] = {"cmd": [{**_cmd(["/bin/true"]), **cmd}]}
        if pipes is not None:
            body["pipeMapping"] = pipes
        code, message = await _run(s, body)
        assert code == 400, message
        assert isinstance(message, str) and message.startswith(field + ":"), message
    _call(gojudge, A_TOKEN, go)


def test_a_piped_fd_takes_the_pipe_not_its_file(gojudge: Service) -> None:
    """go-judge refuses a file given for a piped fd; here the pipe takes the fd and the file
    is not used (a rule between the cmds and the pipes that /openapi.json could not say)."""
    async def go(s: aiohttp.ClientSession) -> None:
        code, results = await _run(s, {
            "cmd": [_cmd(["/bin/echo", "piped"]),
                    _cmd(["/bin/cat"], files=[{"content": "not used"}, *COLLECT],
                         copyOut=["stdout"])],
            "pipeMapping": [{"in": {"index": 0, "fd": 1}, "out": {"index": 1, "fd": 0}}]})
        assert code == 200 and results[1]["files"] == {"stdout": "piped\n"}, results
    _call(gojudge, A_TOKEN, go)


def test_proxied_pipes_share_what_a_pipeline_keeps(gojudge: Service) -> None:
    """Two proxied pipes of go-judge's default max (64 MiB each) are more than a pipeline
    keeps in all: the request runs, the later pipe keeping what is left."""
    async def go(s: aiohttp.ClientSession) -> None:
        proxied = {"proxy": True, "name": "pipe"}
        code, results = await _run(s, {
            "cmd": [_cmd(["/bin/echo", "x"]), _cmd(["/bin/cat"]), _cmd(["/bin/cat"])],
            "pipeMapping": [
                {"in": {"index": 0, "fd": 1}, "out": {"index": 1, "fd": 0}, **proxied},
                {"in": {"index": 1, "fd": 1}, "out": {"index": 2, "fd": 0}, **proxied}]})
        assert code == 200 and [r["status"] for r in results] == ["Accepted"] * 3, results
    _call(gojudge, A_TOKEN, go)


def test_another_tenants_files_are_out_of_reach(gojudge: Service) -> None:
    async def upload(s: aiohttp.ClientSession) -> str:
        form = aiohttp.FormData()
        form.add_field("file", b"#!/bin/sh\necho secret\n", filename="secret.sh")
        async with s.post("/file", data=form) as r:
            assert r.status == 200, await r.text()
            return str(await r.json())

    async def owner(s: aiohttp.ClientSession) -> str:
        fid = await upload(s)
        async with s.get("/file") as r:
            assert (await r.json())[fid] == "secret.sh"
        return fid

    fid = _call(gojudge, A_TOKEN, owner)

    async def other(s: aiohttp.ClientSession) -> None:
        async with s.get("/file") as r:
            assert fid not in await r.json()
        async with s.get(f"/file/{fid}") as r:
            assert r.status == 404
        async with s.delete(f"/file/{fid}") as r:
            assert r.status == 404
        code, body = await _run(s, {"cmd": [_cmd(["a"], copyIn={"a": {"fileId": fid}})]})
        assert code == 404 and body["error"]["field"] == 'cmd[0].copyIn["a"].fileId', body
        code, body = await _run(s, {"cmd": [_cmd(["/bin/cat"],
                                                  files=[{"fileId": fid}, *COLLECT])]})
        assert code == 404 and body["error"]["field"] == "cmd[0].files[0].fileId", body

    _call(gojudge, B_TOKEN, other)

    async def still_there(s: aiohttp.ClientSession) -> None:
        code, [r] = await _run(s, {"cmd": [_cmd(["a"], copyIn={"a": {"fileId": fid}},
                                                copyOut=["stdout"])]})
        assert code == 200 and r["files"]["stdout"] == "secret\n", r
    _call(gojudge, A_TOKEN, still_there)


def test_version_is_open_and_run_needs_a_token(gojudge: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.get("/version") as r:
            assert r.status == 200 and (await r.json())["copyOutTruncate"] is True
        async with s.post("/run", json={"cmd": [_cmd(["/bin/true"])]}) as r:
            assert r.status == 401
    _call(gojudge, None, go)


def test_the_endpoint_is_off_unless_enabled(service: Service) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        for method, path in (("POST", "/run"), ("GET", "/file"), ("GET", "/version")):
            async with s.request(method, path, json={"cmd": []}) as r:
                assert r.status == 404
                assert "[gojudge] enabled" in (await r.json())["error"]["message"]
    service.call(go)


@pytest.mark.parametrize(("table", "error"), [
    ({"enabled": True}, "gojudge.image: required when gojudge.enabled is true"),
    ({"enabled": "yes", "image": "x"}, "gojudge.enabled: expected true or false"),
    ({"image": "x", "workdir": "w"}, "gojudge.workdir: 'w' must be an absolute path"),
    ({"image": "x", "policy": "nosuch"}, "gojudge.policy: "),
    ({"image": "x", "token": "t"}, "gojudge.token: unknown setting"),
])
def test_the_config_table_is_checked_at_start(table: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)):
        from_dict({"gojudge": table}, {"SANDBOXD_STATE_DIR": "/nonexistent"})


def test_the_image_may_come_from_the_query(gojudge: Service, images: Any) -> None:
    async def go(s: aiohttp.ClientSession) -> None:
        body = {"cmd": [_cmd(["/bin/echo", "hi"], copyOut=["stdout"])]}
        async with s.post("/run", params={"image": images.v2s2}, json=body) as r:
            assert r.status == 200 and (await r.json())[0]["files"] == {"stdout": "hi\n"}
        async with s.post("/run", params={"image": "Not A Name"}, json=body) as r:
            message = await r.json()
            assert r.status == 400 and message.startswith("image (the query parameter)"), \
                message
        async with s.post("/run", params={"images": "x"}, json=body) as r:
            assert r.status == 400 and "'images' is unknown" in await r.json()
    _call(gojudge, A_TOKEN, go)


# /ws ---------------------------------------------------------------------------------------

def _sleep_then(seconds: int, word: str) -> dict[str, Any]:
    return _cmd(["/bin/sh", "-c", f"sleep {seconds}; echo {word}"], clockLimit=110_000 * MS,
                copyOut=["stdout"])


async def _answer(sock: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await sock.receive_json(timeout=60)
    assert isinstance(msg, dict)
    return msg


def test_ws_runs_requests_at_once_and_cancels_one(gojudge: Service) -> None:
    """A long request does not hold back a short one sent after it on the same connection;
    a cancel ends the long one with go-judge's error; the answers name their requests."""
    async def go(s: aiohttp.ClientSession) -> list[dict[str, Any]]:
        async with s.ws_connect("/ws") as sock:
            await sock.send_json({"requestId": "long", "cmd": [_sleep_then(30, "late")]})
            await sock.send_json({"requestId": "short", "cmd": [_cmd(["/bin/echo", "hi"],
                                                                    copyOut=["stdout"])]})
            first = await _answer(sock)
            await sock.send_json({"cancelRequestId": "long"})
            return [first, await _answer(sock)]
    short, long = _call(gojudge, A_TOKEN, go)
    assert short["requestId"] == "short" and "error" not in short, short
    [r] = short["results"]
    assert r["status"] == "Accepted" and r["files"]["stdout"] == "hi\n", r
    assert long == {"requestId": "long", "results": [], "error": "request cancelled"}


def test_ws_refuses_a_bad_request_and_goes_on(gojudge: Service) -> None:
    """go-judge closes the connection on a request it cannot read; here that request gets
    its error and the next is served. An id must be given, and unique while running."""
    async def go(s: aiohttp.ClientSession) -> list[dict[str, Any]]:
        answers = []
        async with s.ws_connect("/ws") as sock:
            await sock.send_json({"requestId": "", "cmd": [_cmd(["/bin/true"])]})
            answers.append(await _answer(sock))
            await sock.send_json({"requestId": "bad", "cmd": [{"args": []}]})
            answers.append(await _answer(sock))
            await sock.send_json({"requestId": "twice", "cmd": [_sleep_then(30, "x")]})
            await sock.send_json({"requestId": "twice", "cmd": [_cmd(["/bin/true"])]})
            answers.append(await _answer(sock))
            await sock.send_str("not json")
            answers.append(await _answer(sock))
            await sock.send_json({"requestId": "good",
                                  "cmd": [_cmd(["/bin/echo", "ok"], copyOut=["stdout"])]})
            answers.append(await _answer(sock))
        return answers
    empty, bad, twice, garbage, good = _call(gojudge, A_TOKEN, go)
    assert empty["results"] == [] and "empty request id" in empty["error"], empty
    assert bad["requestId"] == "bad" and bad["results"] == [], bad
    assert "cmd[0].args" in bad["error"], bad
    assert twice["requestId"] == "twice" and "duplicated request id" in twice["error"], twice
    assert garbage["requestId"] == "" and "not valid JSON" in garbage["error"], garbage
    assert good["results"][0]["files"]["stdout"] == "ok\n", good


def _sleeping(seconds: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.info["cmdline"] == ["sleep", str(seconds)]:
            found.append(p)
    return found


def _wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_ws_a_closed_connection_ends_its_runs(gojudge: Service) -> None:
    """The runs of a connection that closes are killed, not left to their clock."""
    async def go(s: aiohttp.ClientSession) -> None:
        async with s.ws_connect("/ws") as sock:
            await sock.send_json({"requestId": "gone", "cmd": [_sleep_then(100, "x")]})
            await asyncio.get_running_loop().run_in_executor(
                None, _wait_for, lambda: _sleeping(100), "the run did not start")
    _call(gojudge, A_TOKEN, go)
    _wait_for(lambda: not _sleeping(100), "the run outlived its connection")


def test_ws_another_tenant_cannot_cancel_a_request(gojudge: Service) -> None:
    """Request ids belong to their connection: tenant B naming A's id cancels nothing."""
    async def go() -> dict[str, Any]:
        async with aiohttp.ClientSession(gojudge.url, headers=gojudge.headers(A_TOKEN)) as a, \
                aiohttp.ClientSession(gojudge.url, headers=gojudge.headers(B_TOKEN)) as b, \
                a.ws_connect("/ws") as mine, b.ws_connect("/ws") as theirs:
            await mine.send_json({"requestId": "x", "cmd": [_sleep_then(2, "done")]})
            await theirs.send_json({"cancelRequestId": "x"})
            return await _answer(mine)
    answer = asyncio.run(go())
    assert "error" not in answer, answer
    assert answer["results"][0]["files"]["stdout"] == "done\n", answer
