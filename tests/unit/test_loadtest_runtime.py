"""The runtime benchmark runs end to end (--quick) and its last line carries every figure,
for each policy asked; its file-heavy run really writes the root, and the next run of a
container reset in place does not see it.

No speed is checked: only that each required figure is there, numeric and sensible.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from loadtest import runtime as bench
from sandbox.runtime.requests import ExecRequest
from sandbox.runtime.results import Status
from tests.support import benchmarks

PER_POLICY = ("warm_exec_median_ms", "warm_exec_p99_ms", "warm_exec_runs_per_s",
              "warm_exec_exit0_median_ms", "warm_exec_exit0_p99_ms",
              "warm_exec_2_containers_runs_per_s", "cold_start_median_ms",
              "cold_start_p99_ms", "idle_container_uss_mib")
WRITABLE = ("writable_warm_reset_median_ms", "writable_fresh_median_ms",
            "writable_warm_vs_fresh_median", "back_to_back_write_root_median_ms",
            "back_to_back_true_median_ms", "true_after_write_root_median_ms",
            "bare_touch_median_ms")
OVERHEADS = ("cpu_overhead_pct", "syscall_overhead_pct")


def quick_run(*args: str) -> tuple[list[str], dict[str, Any]]:
    return benchmarks.quick_run("loadtest.runtime", *args)


def number(figures: dict[str, Any], key: str) -> float:
    value = figures.get(key)
    assert isinstance(value, int | float) and not isinstance(value, bool), (key, value)
    assert math.isfinite(value), (key, value)
    return float(value)


def row(lines: list[str], figure: str) -> str:
    return next(line for line in lines if line.startswith(figure + "  "))


@pytest.mark.one_pass
def test_quick_run_prints_every_figure_for_both_policies() -> None:
    lines, figures = quick_run()
    assert figures["policy_list"] == ["judge", "default"]
    for policy in ("judge", "default"):
        per = figures["policies"][policy]
        for key in PER_POLICY:
            assert number(per, key) > 0, (policy, key)
        assert per["warm_exec_p99_ms"] >= per["warm_exec_median_ms"]
        assert per["warm_exec_vs_bare_median"] == pytest.approx(
            per["warm_exec_median_ms"] / figures["bare_exec_median_ms"])
        # Each figure beside both tight bare loops of the same binaries, with the ratio.
        for prog, bare in (("", "bare_exec"), ("_exit0", "bare_exit0")):
            assert per[f"warm_exec{prog}_over_bare_ms"] == pytest.approx(
                per[f"warm_exec{prog}_median_ms"] - figures[f"{bare}_median_ms"])
        for figure in ("exec `true` median (ms)", "exec `true` 2 loops, 2 containers "
                       "(runs/s)", "cold start median (ms)", "exec of exit0 (no libc) median (ms)"):
            line = row(lines, f"{policy}: {figure}")
            assert "fork+exec" in line and "posix_spawn" in line and line.count("x)") == 2
        assert "unshare" in row(lines, f"{policy}: cold start median (ms)")
        # Runs 30 ms apart stand beside the bare loops run 30 ms apart.
        spaced = row(lines, f"{policy}: exec `true` 30 ms apart, median (ms)")
        for method in ("fork+exec", "posix_spawn"):
            key = f"bare_spaced_{method.replace('+', '_')}_median_ms"
            assert f"{method} 30 ms apart {figures[key]:.3f}" in spaced, spaced
    for key in WRITABLE:
        assert number(figures, key) > 0, key
    assert figures["writable_runs"] == 3
    assert figures["writable_warm_vs_fresh_median"] == pytest.approx(
        figures["writable_warm_reset_median_ms"] / figures["writable_fresh_median_ms"])
    number(figures, "reset_of_written_root_median_ms")   # a difference: any sign
    assert "a fresh container" in row(lines, "default: file-heavy run, warm, reset in place (ms)")
    assert row(lines, "default: back to back, `touch` in the root (ms)").count("x)") == 2
    assert "`true` after `true`" in row(lines, "default: `true` right after a `touch` in the "
                                               "root (ms)")
    for key in OVERHEADS:
        assert number(figures, key) > -100, key  # a ratio of two positive times
    for prefix in ("bare_exec", "bare_exec_2", "bare_unshare", "bare_touch", "bare_exit0",
                   "bare_spaced"):
        for method in ("fork_exec", "posix_spawn"):
            assert figures[f"{prefix}_{method}_median_ms"] > 0, (prefix, method)
        assert figures[f"{prefix}_median_ms"] == min(figures[f"{prefix}_fork_exec_median_ms"],
                                                     figures[f"{prefix}_posix_spawn_median_ms"])


def test_the_policy_option_measures_only_the_policies_named() -> None:
    lines, figures = quick_run("--policy", "judge", "--json-only")
    assert lines == []
    assert figures["policy_list"] == ["judge"]
    assert list(figures["policies"]) == ["judge"]
    assert number(figures["policies"]["judge"], "warm_exec_median_ms") > 0
    # The writable root's figures are the default policy's: not asked, not measured.
    assert not any(key.startswith(("writable_", "back_to_back_")) for key in figures)
    assert figures["workload_policy"] == "judge"


def test_the_file_heavy_run_writes_the_root_and_the_next_run_sees_the_image() -> None:
    asyncio.run(_file_heavy_run_and_the_run_after())


async def _file_heavy_run_and_the_run_after() -> None:
    async with bench.prepared() as (runtime, root):
        image_bin = len(list((root / "bin").iterdir()))
        look = ["sh", "-c", f"ls {bench.WRITTEN_DIR} 2>/dev/null | wc -l; ls /bin | wc -l"]
        c = await bench.create(runtime, root, bench.WRITABLE)
        try:
            async def seen(reset_after: bool) -> list[int]:
                r = await c.exec(ExecRequest(argv=look, env=bench.ENV),
                                 reset_after=reset_after)
                assert r.status == Status.OK, r
                return [int(n) for n in r.stdout.split()]

            assert await seen(False) == [0, image_bin]
            # Run N writes its files and deletes image files; a look in the same root
            # (no reset between) sees both...
            await bench.checked_exec(c, bench.writable_script(root), uid=0)
            assert await seen(True) == [bench.WRITTEN_FILES, image_bin - bench.DELETED_FILES]
            # ...and once reset in place, the next run sees the image as it was: so the
            # script, which fails on its own leftovers, runs again, and again leaves
            # nothing behind for the run after.
            for _ in range(2):
                await bench.checked_exec(c, bench.writable_script(root), uid=0,
                                         reset_after=True)
                assert await seen(False) == [0, image_bin]
        finally:
            await c.destroy()
