"""The soak in CI: thousands of runs of a mix whose verdicts are known in advance (plain
`true`, a nonzero exit, an output flood, a CPU-time loop, a memory bomb, a fork bomb under
pids, a sleep past its wall limit), at concurrency 16, through the REST API of a real
`sandboxd serve` on the judge policy, and every result must be exactly its verdict.

The runs the service kills for a limit share warm containers with the innocent ones: a kill
meant for one run that reached the next one in its container (issue #10: plain `true` came
back `signaled`) is a wrong verdict here. The longer soak is `python -m loadtest.soak`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from loadtest.soak import MIX, soak
from tests.service.conftest import start_service, stop, wait_ready

RUNS = 3000
CONCURRENCY = 16


@pytest.fixture(scope="module")
def soak_url(images: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A service of its own that keeps a warm container for every run at once, as a judge
    service would (the session's keeps two)."""
    workdir = tmp_path_factory.mktemp("sandboxd-soak")
    proc, log = start_service(workdir, f"[pools]\nmax_idle = {CONCURRENCY}\n")
    try:
        yield wait_ready(proc, log)
    finally:
        stop(proc, log)


def test_every_run_of_the_mix_gets_exactly_its_verdict(soak_url: str, images: Any) -> None:
    fig = asyncio.run(soak(soak_url, None, images.oci, RUNS, CONCURRENCY))
    assert fig["runs"] == RUNS
    assert fig["errors"] == 0, fig["error_samples"]
    assert fig["wrong_verdicts"] == 0, (
        f"{fig['wrong_verdicts']} of {RUNS} runs got a verdict that was not theirs:\n"
        + "\n".join(fig["wrong_samples"]))
    assert set(fig["mix"]) == {c.name for c in MIX}
    # Warm containers, reused run after run: where a late kill would land.
    assert fig["pool"].get("hit", 0) > RUNS // 2, fig["pool"]
