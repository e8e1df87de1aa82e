"""The HTTP load test: every workload end to end through `--spawn` (a real registry, a real
`sandboxd serve`, real containers), and the open loop's latency accounting against a fake
slow server. Report content and structure are checked, never speed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from loadtest.http.driver import Phase, closed_loop, open_loop
from loadtest.http.service import LoadTestError, check_loopback
from loadtest.http.targets import HttpTarget
from loadtest.http.workloads import JUDGE_CASES, WORKLOADS

REPO = Path(__file__).resolve().parents[2]
PERCENTILES = ("p50", "p90", "p99", "p99_9")
REQUESTS = 3


@pytest.mark.one_pass
def test_every_workload_through_spawn_reports_figures_statuses_and_plots(
        tmp_path: Path) -> None:
    html, out = tmp_path / "report.html", tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "loadtest", "--spawn", "--workload", "all", "--requests",
         str(REQUESTS), "--concurrency", "2", "--warmup", "1", "--json-only", "--peers",
         "none", "--sweep", "2",
         "--html", str(html), "--json-out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == report
    assert report["mode"] == "closed" and report["concurrency"] == 2
    assert list(report["workloads"]) == list(WORKLOADS)
    # A judge-c request is a submission: one compile exec, then every case.
    runs = {n: JUDGE_CASES + 1 if WORKLOADS[n].compiler else 1 for n in WORKLOADS}
    for name, w in report["workloads"].items():
        for side in ("sandboxed", "bare"):
            s = w[side]
            assert (s["requests"], s["ok"], s["errors"]) == (REQUESTS, REQUESTS, 0), \
                (name, side, s["error_samples"])
            assert s["statuses"] == {"ok": REQUESTS}, (name, side)
            lat = [s["latency_ms"][p] for p in PERCENTILES]
            assert all(v > 0 for v in lat) and lat == sorted(lat), (name, side, lat)
            assert s["latency_ms"]["max"] >= lat[-1]
            assert s["throughput_per_s"] > 0
            assert s["cdf_ms"][-1][1] == 1.0 and s["timeline"]["per_s"]
        assert w["sandboxed"]["http"] == {"200": REQUESTS}
        if not WORKLOADS[name].compiler:  # a submission is many runs: no one pool figure
            assert sum(w["sandboxed"]["pool"].values()) == REQUESTS
        assert set(w["overhead"]) == {"p50", "p99", "throughput"}
        assert all(v > 0 for v in w["overhead"].values()), (name, w["overhead"])
        assert w["sandboxed"]["in_flight_mean"] > 0 and w["sandboxed"]["running_mean"] > 0
        if not WORKLOADS[name].compiler:
            # The tight bare loops of the same command, as many runs at the same concurrency,
            # and every side's ratios to the fastest of them.
            tight = w["tight_bare"]
            assert set(tight) == {"fork_exec", "posix_spawn"}
            assert all((t["runs"], t["concurrency"]) == (REQUESTS, 2) for t in tight.values())
            best = min(t["latency_ms"]["p50"] for t in tight.values())
            assert w["sandboxed"]["vs_fastest_bare"]["p50"] == round(
                w["sandboxed"]["latency_ms"]["p50"] / best, 3)
            assert w["bare"]["vs_fastest_bare"]["throughput"] > 0
        delta = w["sandboxed"]["service_metrics_delta"]
        assert delta['sandboxd_runs_total{status="ok"}'] == REQUESTS * runs[name]
        assert (delta.get("sandboxd_pool_hits_total", 0)
                + delta.get("sandboxd_pool_misses_total", 0)) == REQUESTS * runs[name]
    # Warm-up and measured runs of every workload, all ok, as the service counted them.
    assert report["metrics_delta"]['sandboxd_runs_total{status="ok"}'] == \
        sum(runs.values()) * (REQUESTS + 1)
    page = html.read_text()
    assert "bare posix_spawn loop" in page and "bare fork+exec loop" in page
    for section in ("summary", "cdf", "throughput", "overhead", "statuses", "metrics",
                    "isolation-sweep"):
        assert f'<section id="{section}">' in page
    # The sweep ran after the HTTP phases: every variant of both programs measured.
    for variant in report["sweep"]["variants"].values():
        assert variant["true"]["median_ms"] > 0 and variant["syscalls"]["median_ms"] > 0
    assert "overhead per isolation layer" in page
    assert page.count("<svg") >= 2 * len(WORKLOADS) + 2
    assert "<script" not in page and "src=" not in page  # self-contained


def test_a_url_off_this_machine_is_refused() -> None:
    assert check_loopback("http://127.0.0.1:8643/") == "http://127.0.0.1:8643"
    assert check_loopback("http://[::1]:8643") == "http://[::1]:8643"
    for url in ("http://10.0.0.1:8643", "http://example.com", "ftp://127.0.0.1", "127.0.0.1"):
        with pytest.raises(LoadTestError):
            check_loopback(url)
    done = subprocess.run([sys.executable, "-m", "loadtest", "--url", "http://192.0.2.1:1",
                           "--image", "busybox"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1 and "loopback only" in done.stderr


# --- the open loop against a fake slow server ----------------------------------------------

SERVICE_S = 0.05        # the fake server's time per request, one request at a time
INTERVAL_S = 0.02       # arrivals faster than that
N = 12


async def _against_slow_server(run: object) -> Phase:
    lock = asyncio.Lock()

    async def runs(_: web.Request) -> web.Response:
        async with lock:
            await asyncio.sleep(SERVICE_S)
        return web.json_response({"status": "ok", "exit_code": 0, "stdout": "",
                                  "pool_hit": True})

    app = web.Application()
    app.router.add_post("/v1/runs", runs)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with HttpTarget(f"http://127.0.0.1:{port}", None, "busybox", WORKLOADS["true"],
                              connections=64, timeout_s=30) as target:
            return await run(target.send)  # type: ignore[operator, no-any-return]
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("max_inflight", [1, 64])
def test_open_loop_latency_runs_from_the_scheduled_send_time(max_inflight: int) -> None:
    phase = asyncio.run(_against_slow_server(
        lambda send: open_loop(send, 1 / INTERVAL_S, requests=N, max_inflight=max_inflight,
                               keep_samples=True)))
    assert phase.recorder.ok == N and [s.seq for s in phase.samples] == list(range(N))
    for k, s in enumerate(phase.samples):
        # The schedule never slips, however far behind the server is.
        assert s.scheduled == pytest.approx(k * INTERVAL_S)
        # The server finishes request k no earlier than (k+1) service times after the
        # start: measured from its scheduled time, the backlog it waited behind is counted.
        latency = s.done - s.scheduled
        assert latency >= SERVICE_S + k * (SERVICE_S - INTERVAL_S) - 0.002 * (k + 1), k
    latencies = [s.done - s.scheduled for s in phase.samples]
    assert latencies == sorted(latencies) and latencies[-1] > latencies[0]
    h = phase.recorder.latency
    assert h.get_max_value() / 1e6 >= SERVICE_S + (N - 1) * (SERVICE_S - INTERVAL_S) - 0.03
    if max_inflight == 1:
        # One request at a time: each was sent only when the last one answered. Timed from
        # its actual send (a coordinated-omission measurement), a request only ever sees its
        # own service time, never the backlog: it cannot exceed the gap between answers.
        for prev, s in zip(phase.samples, phase.samples[1:], strict=False):
            assert s.sent >= prev.done
            assert s.done - s.sent <= s.done - prev.done
            assert s.done - prev.done >= SERVICE_S - 0.002
        # So the omitting figure stays flat while the scheduled-time one grows by at
        # least (service - interval) per request.
        service = [s.done - s.sent for s in phase.samples]
        assert sum(service) <= phase.elapsed_s
        assert sum(latencies) - sum(service) >= \
            (SERVICE_S - INTERVAL_S) * N * (N - 1) / 2 - 0.002 * N * N


def test_closed_loop_ends_by_count_and_by_duration() -> None:
    by_count = asyncio.run(_against_slow_server(
        lambda send: closed_loop(send, 2, requests=5, keep_samples=True)))
    assert by_count.recorder.count == 5 and by_count.recorder.statuses == {"ok": 5}
    assert by_count.recorder.pool_hits == {"hit": 5}
    by_time = asyncio.run(_against_slow_server(
        lambda send: closed_loop(send, 2, duration_s=0.2)))
    # The server answers one request per SERVICE_S: within the duration at least one
    # finished, and every request started before the deadline was answered.
    assert by_time.recorder.count >= 1 and by_time.recorder.failed == 0
    # Without a bound, neither loop starts.
    with pytest.raises(ValueError):
        asyncio.run(closed_loop(lambda seq: asyncio.sleep(0), 1))  # type: ignore[arg-type, return-value]
