"""The pod's seccomp profile (deploy/kubernetes/seccomp/sandboxd.json) is enough for the
runtime: a process that loads it, as the container runtime loads it into sandboxd's pod,
then starts the runtime and runs containers under both root shapes (a writable overlay,
a read-only bind). And it is no more than enough: without one of the calls it adds to the
runs' policy, making a container fails.

The child runs as the pod runs sandboxd: no_new_privs (allowPrivilegeEscalation: false) and
no newuidmap on its PATH (the image has none), so the single-id map as an ordinary user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import busybox

PROFILE = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "seccomp" / \
    "sandboxd.json"

CHILD = r"""
import asyncio, ctypes, json, sys
from sandbox.runtime import seccomp
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.spawnerclient import Runtime

profile, root, dropped = json.loads(sys.argv[1]), sys.argv[2], set(sys.argv[3:])
profile["syscalls"] = [r for r in profile["syscalls"] if not dropped & set(r["names"])]
PR_SET_NO_NEW_PRIVS = 38
if ctypes.CDLL(None).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    raise SystemExit("prctl(PR_SET_NO_NEW_PRIVS) failed")
seccomp.install(seccomp.compile_profile(seccomp.load_profile(profile, name="pod")).bpf)

async def main():
    runtime = await Runtime.start()
    results = {}
    try:
        for policy, writable in (("default", True), ("judge", None)):
            c = await runtime.create_container(
                ContainerSpec(layers=(root,), policy=policy, writable=writable))
            try:
                r = await c.exec(ExecRequest(argv=["sh", "-c", "echo x > /tmp/f && cat /tmp/f"],
                                             env={"PATH": "/bin"}))
                results[policy] = [str(r.status), r.stdout.decode()]
            finally:
                await c.destroy()
    finally:
        await runtime.close()
    print(json.dumps(results))

asyncio.run(main())
"""


def run_child(root: Path, *dropped: str) -> subprocess.CompletedProcess[str]:
    # No newuidmap on PATH, as in the image; the interpreter by its full path.
    env = {"PATH": "/nonexistent", "HOME": os.environ.get("HOME", "/"),
           "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    return subprocess.run([sys.executable, "-c", CHILD, PROFILE.read_text(), str(root),
                           *dropped], capture_output=True, text=True, env=env, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Owned by whoever runs the tests: container root is that user under the single-id map
    # (as root, the direct map's container root reads the world-readable files).
    return busybox.build_rootfs(tmp_path_factory.mktemp("pod-seccomp") / "rootfs")


def test_the_pod_profile_lets_the_runtime_make_and_run_containers(root: Path) -> None:
    done = run_child(root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == {"default": ["ok", "x\n"], "judge": ["ok", "x\n"]}


@pytest.mark.parametrize("call", ["pivot_root", "unshare"])
def test_without_a_runtime_call_the_profile_would_break_containers(root: Path,
                                                                   call: str) -> None:
    done = run_child(root, call)
    assert done.returncode != 0
    assert f"{call}" in done.stderr and "Operation not permitted" in done.stderr
