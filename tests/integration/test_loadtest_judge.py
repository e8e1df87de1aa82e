"""The code judge with a compiler (workload judge-c): the gcc image made from Debian's
packages compiles in a read-only container and its binary runs in the busybox image; whole
submissions through a real spawned service and bare; a wrong solution is a counted
`wrong_answer`, not a crash. Figures are checked for presence and sense, never speed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.http.judge import JudgeBareTarget, JudgeHttpTarget
from loadtest.http.service import Spawned, spawned
from loadtest.http.stats import Outcome
from loadtest.http.targets import BareEnv
from loadtest.http.workloads import (
    JUDGE_C_PATH,
    JUDGE_C_SOLUTION,
    JUDGE_CASES,
    WORKLOADS,
    judge_answer,
    judge_input,
)
from testbed import busybox
from testbed.demoimages import gcc_rootfs
from tests.conftest import Session

REPO = Path(__file__).resolve().parents[2]
REQUESTS = 3
# Right on the first case (a single number), wrong on every later one.
WRONG_SOLUTION = JUDGE_C_SOLUTION.replace("sum += n;", "sum = n;")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None,
                                reason="needs the host's gcc: apt-get install gcc libc6-dev")


def test_gcc_image_compiles_read_only_and_its_binary_runs_in_busybox(
        session: Session, busybox_root: Path, tmp_path: Path) -> None:
    root = gcc_rootfs(tmp_path / "gcc")
    compiler = session.container(root, profile="judge")  # read-only root, /tmp a tmpfs
    built = session.exec(compiler, ["sh", "-c", f"cat > {JUDGE_C_PATH} && gcc -O2 -static -o "
                                     f"/tmp/a {JUDGE_C_PATH} && cat /tmp/a"],
                         stdin=JUDGE_C_SOLUTION.encode(), env={"PATH": "/usr/bin:/bin"},
                         cpu_ms=30_000, wall_ms=60_000, output_bytes=16 << 20)
    assert built.status == "ok" and built.stdout[:4] == b"\x7fELF", built.stderr[-2000:]
    # No libc in the busybox image: only a static binary runs there.
    judge = session.container(busybox_root, profile="judge")
    case = 5
    ran = session.exec(judge, ["sh", "-c", f"cat > /tmp/a && chmod 755 /tmp/a && "
                               f"echo '{judge_input(case).strip()}' | /tmp/a"],
                       stdin=built.stdout)
    assert (ran.status, ran.stdout.decode()) == ("ok", judge_answer(case)), ran.stderr


@pytest.fixture(scope="module")
def service() -> Iterator[Spawned]:
    with spawned(pool_idle=4, compiler=True) as svc:
        assert svc.compiler_image is not None and svc.compiler_image.endswith("/loadtest/gcc:12")
        yield svc


def test_submissions_through_the_cli_report_compile_and_case_times_beside_bare(
        service: Spawned) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "--url", service.url, "--image", service.image,
         "--compiler-image", str(service.compiler_image), "--workload", "judge-c",
         "--requests", str(REQUESTS), "--concurrency", "2", "--warmup", "1", "--peers", "none"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    w = json.loads(lines[-1])["workloads"]["judge-c"]
    for side in ("sandboxed", "bare"):
        s = w[side]
        assert (s["requests"], s["errors"], s["statuses"]) == (REQUESTS, 0, {"ok": REQUESTS}), \
            (side, s["error_samples"])
        sub = s["submission"]
        assert sub["cases_per_submission"] == JUDGE_CASES
        compile_p50, case_p50 = sub["compile_ms"]["p50"], sub["case_ms"]["p50"]
        assert compile_p50 > 0 and case_p50 > 0
        # A submission is one compile, then every case: one after another bare, as a batch
        # (several at once) sandboxed.
        cases = JUDGE_CASES if side == "bare" else 1
        assert s["latency_ms"]["max"] >= sub["compile_ms"]["min"] + cases * sub["case_ms"]["min"]
    delta = w["sandboxed"]["service_metrics_delta"]
    # One compile exec and every case per submission, all ok, as the service counted them.
    assert delta['sandboxd_runs_total{status="ok"}'] == REQUESTS * (JUDGE_CASES + 1)
    assert w["overhead"]["p50"] > 0
    table = "\n".join(lines[:-1])
    assert "sandboxed: compile p50" in table and "bare: compile p50" in table


def test_a_wrong_solution_is_a_counted_wrong_answer_on_both_sides(service: Spawned,
                                                                  tmp_path: Path) -> None:
    wrong = dataclasses.replace(WORKLOADS["judge-c"], name="judge-c-wrong",
                                files=((JUDGE_C_PATH, WRONG_SOLUTION, 0o644),))

    async def submit() -> tuple[Outcome, Outcome]:
        assert service.compiler_image is not None
        async with JudgeHttpTarget(service.url, None, service.image, service.compiler_image,
                                   wrong, connections=1, timeout_s=120) as http:
            sandboxed = await http.send(0)
        (tmp_path / "scratch").mkdir()
        env = BareEnv(busybox.build_rootfs(tmp_path / "rootfs"), tmp_path / "scratch")
        async with JudgeBareTarget(env, wrong, workers=1) as bare:
            return sandboxed, await bare.send(0)

    for outcome in asyncio.run(submit()):
        assert (outcome.ok, outcome.status) == (False, "wrong_answer"), outcome
        # Case 0 (one number) passes; case 1 is the first one judged wrong.
        assert "case 1" in outcome.error, outcome.error


def test_without_a_compiler_image_all_leaves_judge_c_out_and_naming_it_is_refused(
        service: Spawned) -> None:
    base = [sys.executable, "-m", "loadtest", "--url", service.url, "--image", service.image,
            "--peers", "none"]
    named = subprocess.run([*base, "--workload", "judge,judge-c"], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=False)
    assert named.returncode == 2 and "--compiler-image" in named.stderr
    everything = subprocess.run(
        [*base, "--workload", "all", "--requests", "1", "--warmup", "0", "--no-bare",
         "--json-only"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert everything.returncode == 0, everything.stderr[-3000:]
    assert "judge-c left out" in everything.stderr
    report = json.loads(everything.stdout.strip().splitlines()[-1])
    assert list(report["workloads"]) == [n for n in WORKLOADS if n != "judge-c"]
