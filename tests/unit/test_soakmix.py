"""The soak's verdict check (loadtest/soakmix.py): a case's answer is exact, and a limit the
service says it enforces by an rlimit (no cgroup for it) has the answer that rlimit gives,
only then."""

from __future__ import annotations

from typing import Any

from loadtest.soakmix import MIX, Context, RunCase
from sandbox.runtime.run import FALLBACK_CPU, FALLBACK_MEMORY

MEMORY = next(c for c in MIX if c.name == "memory")


def _ctx() -> Any:
    return Context.__new__(Context)


def test_the_memory_case_takes_the_rlimit_answer_only_when_the_service_says_so() -> None:
    assert isinstance(MEMORY, RunCase)
    killed = {"status": "memory_limit", "exit_code": None, "warnings": []}
    failed = {"status": "nonzero_exit", "exit_code": 1, "stderr": "dd: out of memory\n"}
    assert MEMORY.wrong(0, _ctx(), killed) is None
    assert "expected memory_limit" in (MEMORY.wrong(0, _ctx(), failed | {"warnings": []})
                                       or "")
    assert "expected memory_limit" in (MEMORY.wrong(0, _ctx(), failed | {
        "warnings": [FALLBACK_CPU]}) or "")
    assert MEMORY.wrong(0, _ctx(), failed | {"warnings": [FALLBACK_MEMORY]}) is None
    # With the fallback said, a kill for memory is not its answer either.
    assert "expected nonzero_exit exit 1" in (MEMORY.wrong(0, _ctx(), killed | {
        "warnings": [FALLBACK_MEMORY]}) or "")
