"""The filter-load benchmark runs end to end (--quick): a row for each built-in profile's
program in both forms, beside the one-instruction filter, and the JSON line's figures are
the programs the runtime compiles. No speed is checked: only that the figures are there and
sensible."""

from __future__ import annotations

import pytest

from loadtest import filterload
from sandbox.runtime import bpf
from tests.support.benchmarks import quick_run


def test_quick_run_times_each_program_beside_a_one_instruction_filter() -> None:
    lines, figures = quick_run("loadtest.filterload")
    assert figures["loads"] == filterload.QUICK_LOADS
    progs = filterload.programs()
    assert set(figures["programs"]) == {*progs, filterload.BARE}
    assert "default, own-process-only" in progs
    for name, fig in figures["programs"].items():
        want = 1 if name == filterload.BARE else bpf.length(progs[name])
        assert fig["instructions"] == want, name
        assert 0 < fig["p10_us"] <= fig["median_us"] <= fig["p90_us"], (name, fig)
        if name != filterload.BARE:
            rows = [ln for ln in lines if ln.startswith(f"`{name}` (")]
            assert len(rows) == 2 and all(filterload.BARE in ln for ln in rows), lines


def test_a_program_the_kernel_refuses_fails_the_benchmark() -> None:
    # A jump past the program's end: the kernel's checker refuses it at load.
    bad = bpf.insn(bpf.JA, 0, 0, 5) + filterload.ALLOW
    with pytest.raises(filterload.BenchError, match="the kernel refused the filter"):
        filterload.measure({"broken": bad}, 10)
