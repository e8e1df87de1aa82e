"""Peers side by side in the HTTP load test: every installed peer (bwrap, crun, runc,
podman) really runs `true` and the judge workload (stdin and files) with its output checked,
kills a run that overstays its timeout, leaves no process, container state or directory
behind, a missing one is reported skipped
with what to install, and the report shows the peers. Nothing is faked; no speed is
asserted."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import psutil
import pytest

from loadtest.http import peers, report
from loadtest.http.driver import closed_loop
from loadtest.http.run import Plan, run
from loadtest.http.service import spawned
from loadtest.http.stats import Outcome
from loadtest.http.workloads import WORKLOADS, Workload
from testbed import busybox

REQUESTS = 4
# A run that overstays its timeout, recognisable among the machine's processes.
NAP = f"{600 + os.getpid() % 1000}"
OVERSTAY = Workload("overstay", "sleeps past its timeout", f'"$BIN/sleep" {NAP}')


def _leftovers(base: Path) -> list[str]:
    """Live processes that name this test's directory or containers, or are the overstaying
    run: there must be none."""
    marks = (str(base), f"loadtest-{os.getpid()}-", f"sleep {NAP}")
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if p.info["status"] != psutil.STATUS_ZOMBIE and any(m in cmd for m in marks):
            found.append(cmd)
    return found


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _runtime_states() -> set[str]:
    """Container states in the runtimes' default state directories (ours use private ones)."""
    dirs = [Path("/run/runc"), Path("/run/crun")]
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        dirs += [Path(xdg, "runc"), Path(xdg, "crun")]
    return {f"{d}/{c}" for d in dirs if os.access(d, os.R_OK) for c in os.listdir(d)
            if c.startswith(f"loadtest-{os.getpid()}-")}


@pytest.mark.parametrize("name", peers.PEERS)
def test_an_installed_peer_runs_the_workloads_and_leaves_nothing(name: str,
                                                                 tmp_path: Path) -> None:
    binary = peers.TARGETS[name].binaries[0]
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (apt-get install {peers.PACKAGES[name]})")
    env = peers.PeerEnv(busybox.build_rootfs(tmp_path / "rootfs"), tmp_path / "peers")
    env.work.mkdir()
    before = set(psutil.Process().children(recursive=True))  # the suite's own servers
    mounts_before = _mount_points()

    async def phases() -> tuple[dict[str, tuple[int, int, list[str]]], Outcome]:
        peer = await peers.ready(name, env)
        assert isinstance(peer, peers.Peer), peer
        out = {}
        for w in ("true", "judge"):
            async with peer.target(WORKLOADS[w], 2, 60) as target:
                phase = await closed_loop(target.send, 2, requests=REQUESTS)
            rec = phase.recorder
            out[w] = (rec.ok, rec.failed, rec.errors)
        async with peer.target(OVERSTAY, 1, 1.0) as target:
            overstayed = await target.send(0)
        return out, overstayed

    done, overstayed = asyncio.run(phases())
    for w, (ok, failed, errors) in done.items():
        # `send` checks each run's stdout: the judge's answer to its own stdin case.
        assert (ok, failed) == (REQUESTS, 0), (w, errors)
    assert (overstayed.ok, overstayed.status) == (False, "timeout"), overstayed
    assert list(env.work.iterdir()) == []  # bundles, state dirs and files removed
    assert set(psutil.Process().children(recursive=True)) - before == set()
    assert _leftovers(tmp_path) == []
    assert _mount_points() - mounts_before == set()  # root podman mounts its store
    assert _runtime_states() == set()


def test_a_missing_or_broken_peer_is_skipped_with_what_to_do(tmp_path: Path) -> None:
    env = peers.PeerEnv(tmp_path / "rootfs", tmp_path, search_path=str(tmp_path))
    for name in peers.PEERS:
        reason = asyncio.run(peers.ready(name, env))
        assert isinstance(reason, str)
        assert "not found on PATH" in reason and "apt-get install" in reason, reason
    # A bwrap that cannot run (as where user namespaces are off): skipped with its error.
    broken = tmp_path / "bwrap"
    broken.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\n"
                      "exit 1\n")
    broken.chmod(0o755)
    reason = asyncio.run(peers.ready("bwrap", env))
    assert isinstance(reason, str)
    assert "probe (busybox true) failed" in reason and "No permissions" in reason, reason
    assert "user namespaces" in reason
    with pytest.raises(ValueError, match="unknown peer"):
        peers.select("bwrap,lxc")
    assert peers.select("none") == () and peers.select("auto") == peers.PEERS


def test_the_report_shows_peers_side_by_side_and_the_skipped_ones(tmp_path: Path) -> None:
    # Only bwrap on the peers' search path: runc is missing there, whatever is installed.
    only = tmp_path / "bin"
    only.mkdir()
    bwrap = shutil.which("bwrap")
    if bwrap is not None:
        (only / "bwrap").symlink_to(bwrap)
    with spawned(pool_idle=2) as svc:
        result = asyncio.run(run(Plan(
            url=svc.url, token=None, image=svc.image, workloads=(WORKLOADS["true"],),
            concurrency=2, requests=3, warmup=1, peers=("bwrap", "runc"),
            peer_path=str(only), progress=False)))
    result["command"] = "python -m loadtest --peers bwrap,runc"
    side = result["workloads"]["true"]["peers"]
    assert "runc not found on PATH" in side["runc"]["skipped"]
    assert result["peers"]["runc"] == side["runc"]
    if bwrap is None:
        assert "bwrap not found" in side["bwrap"]["skipped"]
    else:
        assert (side["bwrap"]["ok"], side["bwrap"]["errors"]) == (3, 0)
        assert set(side["bwrap"]["overhead"]) == {"p50", "p99", "throughput"}
        assert result["peers"]["bwrap"]["command"].startswith(f"{only}/bwrap --unshare-all")
    text = report.table(result)
    assert "peer runc skipped: runc not found on PATH" in text
    assert (" bwrap " in text) == (bwrap is not None)
    page = report.html(result, result["command"])
    section = page.split('<section id="peers">')[1].split("</section>")[0]
    assert "Peers side by side" in section and "runc not found on PATH" in section
    assert ("<svg" in section) == (bwrap is not None)
