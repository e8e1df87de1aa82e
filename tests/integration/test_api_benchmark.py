"""The API benchmark runs end to end (--quick): its own registry and sandboxd serve, per
policy.

No speed is checked: only that each required figure is there for each policy asked and
sensible, each beside its bare baselines with the ratio; and how the --profile mode files
py-spy's samples.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from loadtest.httpprofile import LOOP as LOOP_LAYER
from loadtest.httpprofile import WORKER, shares, table
from loadtest.rows import policies_arg
from tests.support import benchmarks


def quick_run(*args: str) -> tuple[list[str], dict[str, Any]]:
    return benchmarks.quick_run("loadtest.api", *args)


@pytest.mark.one_pass
def test_quick_run_prints_every_figure_for_both_policies() -> None:
    lines, fig = quick_run()
    assert fig["policy_list"] == ["judge", "default"]
    assert set(fig["policies"]) == {"judge", "default"}
    for policy, per in fig["policies"].items():
        for key in ("warm_run_median_ms", "warm_run_p99_ms", "aiohttp_warm_run_median_ms",
                    "aiohttp_warm_run_p99_ms", "runs_per_s",
                    "runs_per_s_sequential", "bare_exec_median_ms", "bare_runs_per_s",
                    "idle_rss_mib_4", "client_bare_median_ms", "client_bare_runs_per_s"):
            assert isinstance(per[key], int | float) and per[key] > 0, (policy, key, per[key])
        assert per["warm_run_errors"] == 0
        assert per["idle_containers"] >= 4
        assert per["warm_run_p99_ms"] >= per["warm_run_median_ms"]
        assert per["aiohttp_warm_run_p99_ms"] >= per["aiohttp_warm_run_median_ms"]
        # Warm: the runs were served by the policy's pool (a miss starts a container).
        assert per["pool_hits"] > per["pool_misses"] > 0, policy
        # Both tight bare loops, 1 and 8 at once; the ratios are to the fastest of them.
        for method in ("fork_exec", "posix_spawn"):
            for prefix in ("bare_exec", "bare_exec_8_at_once"):
                assert per[f"{prefix}_{method}_median_ms"] > 0
                assert per[f"{prefix}_{method}_runs_per_s"] > 0
        assert per["bare_exec_median_ms"] == min(per["bare_exec_fork_exec_median_ms"],
                                                 per["bare_exec_posix_spawn_median_ms"])
        assert per["bare_runs_per_s"] == max(per["bare_exec_8_at_once_fork_exec_runs_per_s"],
                                             per["bare_exec_8_at_once_posix_spawn_runs_per_s"])
        assert per["warm_vs_bare_median"] == round(per["warm_run_median_ms"]
                                                   / per["bare_exec_median_ms"], 2)
        assert per["runs_per_s_vs_bare"] == round(per["runs_per_s"] / per["bare_runs_per_s"], 3)
        # exit0 (no libc), warm and bare: the sandbox's own time apart from a libc's start.
        for key in ("exit0_warm_run_median_ms", "exit0_warm_run_p99_ms", "bare_exit0_median_ms"):
            assert per[key] > 0, (policy, key)
        for prog, warm, bare in (("", "warm_run_median_ms", "bare_exec_median_ms"),
                                 ("exit0_", "exit0_warm_run_median_ms", "bare_exit0_median_ms")):
            assert per[f"{prog}warm_over_bare_ms"] == round(per[warm] - per[bare], 3)
        # In the table, every figure of the policy beside its baselines with the ratio.
        rows = {line.split("  ")[0].strip(): line for line in lines
                if line.startswith(f"{policy}: ")}
        for figure, ratios in ((f"{policy}: warm run median (ms)", 2),
                               (f"{policy}: warm run p99 (ms)", 2),
                               (f"{policy}: warm run median, aiohttp client (ms)", 3),
                               (f"{policy}: warm run p99, aiohttp client (ms)", 3),
                               (f"{policy}: warm run of exit0 (no libc) median (ms)", 2),
                               (f"{policy}: warm runs/s, 1 client", 2),
                               (f"{policy}: warm runs/s, 8 clients", 3),
                               (f"{policy}: warm runs/s, 8 clients of ab (C)", 2),
                               (f"{policy}: service + 4 idle containers, PSS (MiB)", 0)):
            assert rows[figure].count("x)") == ratios, rows[figure]
        # ApacheBench (scripts/test.sh installs apache2-utils): every answer a run ok.
        assert per["runs_per_s_ab"] > 0


def test_a_terminated_run_stops_its_service_and_removes_its_files(tmp_path: Path) -> None:
    # SIGTERM (what `timeout` and a CI's cancel send) unwinds as Ctrl-C does: before, the
    # benchmark died at once and left its bare root and its service's files in TMPDIR.
    proc = subprocess.Popen([sys.executable, "-m", "loadtest.api", "--quick"],
                            cwd=benchmarks.REPO, env={**os.environ, "TMPDIR": str(tmp_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # Terminated once its service serves (the spawned state dir is there).
        while not any(tmp_path.glob("sandboxd-loadtest-*/state")):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, err
    assert list(tmp_path.iterdir()) == []
    left = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or ())]
    assert left == []


def test_the_policy_option_measures_only_the_policies_named() -> None:
    lines, fig = quick_run("--policy", "default")
    assert fig["policy_list"] == ["default"]
    assert list(fig["policies"]) == ["default"]
    assert fig["policies"]["default"]["warm_run_errors"] == 0
    assert not any(line.startswith("judge") for line in lines)


@pytest.mark.parametrize("arg", ["", ",", "judge,judge"])
def test_a_policy_list_names_each_policy_once(arg: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        policies_arg(arg)
    assert policies_arg(" default, judge") == ("default", "judge")


# A py-spy stack of the service, root first (as `record --format raw` writes it).
LOOP = ("_run_module_as_main (<frozen runpy>:198);_serve (service/cli.py:62);"
        "run_forever (asyncio/base_events.py:607);"
        "_run_once (asyncio/base_events.py:1922);_run (asyncio/events.py:80)")
HANDLER = (LOOP + ";_handle_request (aiohttp/web_protocol.py:577);"
           "error_middleware (service/errors.py:163);middleware (service/auth.py:111);"
           "post_run (service/api/runs.py:188)")


def test_profile_samples_go_to_the_innermost_layer_that_names_them() -> None:
    raw = "\n".join([
        f"{HANDLER};read_json (service/api/__init__.py:91);parse_json "
        "(service/api/__init__.py:70) 5",
        f"{HANDLER};read_json (service/api/__init__.py:91);parse_json "
        "(service/api/__init__.py:75);validate_json (service/schemas.py:410) 3",
        f"{HANDLER};execute (service/api/runs.py:154);run (sandbox/engine/engine.py:90);"
        "create_future (asyncio/base_events.py:427) 7",
        f"{HANDLER};execute (service/api/runs.py:157);json_response "
        "(service/api/__init__.py:60);__init__ (aiohttp/web_response.py:600) 2",
        f"{HANDLER};execute (service/api/runs.py:157);json_response "
        "(service/api/__init__.py:60) 4",
        f"{LOOP};_handle_request (aiohttp/web_protocol.py:602) 6",
        f"{LOOP};info (logging/__init__.py:1489) 1",
        f"{LOOP} 2",
        f"{LOOP};_read_ready__data_received (asyncio/selector_events.py:995) 3",
        f"{HANDLER};execute (service/api/runs.py:154);send (sandbox/runtime/init.py:50);"
        "send_fds (socket.py:557) 4",
        # Worker threads: their sandbox function; waiting for work is idle, left out.
        "_bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:83);"
        "run (concurrent/futures/thread.py:58);recycle (sandbox/runtime/cgroups/v1.py:120) 9",
        "_bootstrap (threading.py:995);_worker (concurrent/futures/thread.py:81) 50",
        "_run_module_as_main (<frozen runpy>:198);select (selectors.py:468) 50",
    ])
    counts, total = shares(raw)
    assert total == 46
    assert counts == {
        "JSON decode (orjson, in parse_json)": 5,
        "body validation (service/schemas.py)": 3,
        "engine + runtime (sandbox/)": 7,
        "aiohttp (HTTP parse, routing, response write)": 2 + 6,
        "JSON encode (orjson, in json_response)": 4,
        "logging": 1,
        LOOP_LAYER: 2,
        f"{LOOP_LAYER}: socket receive (kernel)": 3,
        "engine + runtime (sandbox/): socket send with descriptors (kernel)": 4,
        f"{WORKER}: recycle (runtime/cgroups/v1.py)": 9,
    }
    figures = {"samples": total, "runs": 10, "runs_per_s_profiled": 1.0,
               "service_cpu_us_per_run": 390.0,
               "layers_us_per_run": {k: 10.0 * v for k, v in counts.items()},
               "spawner_inits_runs_cpu_us_per_run": 1.0, "client_cpu_us_per_run": 1.0,
               "wall_us_per_run_profiled": 1.0}
    assert "body validation (service/schemas.py)" in table(figures, 2.0)
