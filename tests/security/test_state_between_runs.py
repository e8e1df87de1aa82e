"""Nothing one run leaves reaches the next run in the same container (issue #10).

Each case plants one kind of state with the `state` probe (tests/security/probes/state.c),
as container root (the most a run can be), then checks from the next run, exactly as the
warm pools use containers: every container is exec'd with `reset_after` and reused, a
read-only root (`judge`) and a writable one (`default`, whose root a reset makes anew
when a run changed it). The check must find none of it and print what a run in a fresh
container prints.

Both id maps a runtime uses: the host's (`plan`: a range, so container init runs under an
id of its own) and `single` (one id, shared by init and every run, as for an ordinary user
without subordinate ids).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.runtime.container import Container
from sandbox.runtime.requests import ContainerSpec, ExecRequest
from sandbox.runtime.results import RunResult, Status
from sandbox.runtime.spawnerclient import Runtime
from tests.conftest import Session

ENV = {"PATH": "/bin", "SBX_DECLARED": "only this"}
POLICIES = ("judge", "default")
MAPPINGS = ("plan", "single")


class Slot:
    """One pool slot as the pools use it: exec'd with reset_after and reused."""

    def __init__(self, session: Session, runtime: Runtime, root: Path, policy: str) -> None:
        self.session, self.runtime, self.root, self.policy = session, runtime, root, policy
        self.container: Container | None = None
        self.used: list[str] = []          # the container id of every run, in order

    def run(self, *args: str, uid: int | None = None) -> RunResult:
        if self.container is None or not self.container.alive:
            self.container = self.session.run(self.runtime.create_container(
                ContainerSpec(layers=(str(self.root),), policy=self.policy)))
        c = self.container
        r = self.session.run(c.exec(ExecRequest(argv=["/probes/state", *args], env=dict(ENV),
                                                uid=uid, gid=uid),
                                    reset_after=True))
        self.used.append(c.id)
        return r

    def close(self) -> None:
        if self.container is not None:
            self.session.run(self.container.destroy())


@pytest.fixture
def slot(request: pytest.FixtureRequest, session: Session, runtimes: dict[str, Runtime],
         probe_root: Path) -> Iterator[Slot]:
    policy, mapping = request.param
    s = Slot(session, runtimes[mapping], probe_root, policy)
    yield s
    s.close()


def _lines(r: RunResult, prefix: str) -> list[str]:
    return [line for line in r.stdout.decode(errors="replace").splitlines()
            if line.startswith(prefix)]


def _describe(r: RunResult) -> str:
    return (f"status={r.status} error={r.error}\nstdout:\n{r.stdout.decode(errors='replace')}"
            f"\nstderr:\n{r.stderr.decode(errors='replace')}")


# What each plant must have managed, so that a clean check proves something.
PLANTED = {
    "files": lambda lines: any(line.startswith("PLANT file /tmp/") for line in lines)
    and any(line.startswith("PLANT file /dev/shm/") for line in lines),
    "ipc": lambda lines: {"PLANT sysv-shm ok", "PLANT sysv-msg ok", "PLANT sysv-sem ok",
                          "PLANT mqueue ok", "PLANT posix-shm ok"} <= set(lines),
    "daemon": lambda lines: "PLANT daemon-sockets ok ok" in lines,
    "init": lambda lines: len(lines) >= 7,
    "root": lambda lines: len(lines) == 6 and all(line.endswith(" ok") for line in lines),
}


@pytest.mark.parametrize("what", list(PLANTED))
@pytest.mark.parametrize("slot", [(p, m) for p in POLICIES for m in MAPPINGS], indirect=True,
                         ids=[f"{p}-{m}" for p in POLICIES for m in MAPPINGS])
def test_a_run_leaves_nothing_to_the_next(slot: Slot, what: str) -> None:
    if what == "root" and slot.policy == "judge":
        pytest.skip("a read-only root cannot be changed (tests/integration/test_runtime.py)")
    fresh = slot.run("check")
    assert fresh.status == Status.OK, _describe(fresh)
    assert _lines(fresh, "LEAK") == [], f"a fresh container is not clean:\n{_describe(fresh)}"

    plant = slot.run("plant", what, uid=0)
    assert plant.status == Status.OK, _describe(plant)
    assert PLANTED[what](_lines(plant, "PLANT")), f"the plant did not take:\n{_describe(plant)}"

    after = slot.run("check")
    assert len(set(slot.used)) == 1, slot.used  # the very same container, reset in place
    assert after.status == Status.OK, (
        f"the run after `state plant {what}` failed:\n{_describe(after)}\nplanted:\n"
        + "\n".join(_lines(plant, "PLANT")))
    assert _lines(after, "LEAK") == [], _describe(after)
    changed = sorted(set(_lines(after, "STATE")) ^ set(_lines(fresh, "STATE")))
    assert changed == [], (
        f"state after `state plant {what}` differs from a fresh container's (- fresh, "
        f"+ after):\n" + "\n".join(("+ " if line in _lines(after, "STATE") else "- ") + line
                                   for line in changed)
        + "\nplanted:\n" + "\n".join(_lines(plant, "PLANT")))
    env = sorted(line.removeprefix("STATE self-env ") for line in _lines(after, "STATE self-env"))
    assert env == sorted(f"{k}={v}" for k, v in ENV.items())
