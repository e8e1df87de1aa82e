"""The benchmarks' C builds: exit0 is a program that only exits (no libc, so no start-up
code of one), and a source gcc refuses is a BenchError naming it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from loadtest import cbuild
from loadtest.baseline import BenchError


def test_exit0_exits_0_with_no_libc_in_it(tmp_path: Path) -> None:
    exe = cbuild.build_exit0(tmp_path)
    assert subprocess.run([str(exe)], check=False).returncode == 0
    # Static and without libc: no interpreter, and none of glibc's start-up in it.
    head = exe.read_bytes()
    assert b"/lib64/ld-linux" not in head and b"/lib/ld-linux" not in head
    assert b"__libc_start_main" not in head and b"GLIBC" not in head


def test_a_source_gcc_refuses_is_a_bench_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "broken.c"
    bad.write_text("int main(void) { return undeclared; }\n")
    with pytest.raises(BenchError, match=r"(?s)cannot build broken\.c .*undeclared"):
        cbuild.build(bad, tmp_path / "broken")
