"""What the soak checks after it: the service looked at while it is quiet, from its API and
from the host, once after the warm-up and once at the end; what grew between the two, or
is left over at the end, is a leak.

From the service: its sessions, images and cached files, its live containers and warm
pool (/metrics). From the host (the service's process, read through /proc, so the soak
must run on the service's machine as its user or root): the service's RSS, open
descriptors and threads; its process tree (the spawner, one init per live container,
nothing else: no run's process, no zombie); each container's mounts (read in its init's
mount namespace) and run cgroups; container cgroups that no live container owns; the
store on disk (image blobs and layers, cached files, container records) and every
temporary directory of the state dir and of the service's own TMPDIR.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from sandbox.runtime.cgroups.base import KEPT_FILES_MAX
from sandbox.runtime.idmap import MAPPER_NAME
from sandbox.runtime.spawner import HELPER_NAME

# Within this of the level after warm-up (the standard).
GROWTH = 0.05
QUIET_POLL_S = 0.5
QUIET_POLLS = 4          # the same counts this many polls in a row: quiet
QUIET_TIMEOUT_S = 120.0
STORE_DIRS = ("images/blobs/sha256", "images/layers/sha256", "files/blobs/sha256")
SPAWNER_MODULE = "sandbox.runtime.spawner"


class SoakCheckError(RuntimeError):
    """The service could not be looked at (gone, or not this machine's)."""


@dataclass(frozen=True)
class Level:
    """One look at the service while it is quiet."""

    rss: int
    fds: int                           # every descriptor but the run cgroups' below
    cgroup_fds: int                    # of run cgroups: cgroup.procs, kept counters
    run_cgroups: int                   # those on disk, of every live container
    hierarchies: int                   # cgroup hierarchies a run cgroup has a fd in
    threads: int
    live_containers: int               # its own count (/metrics)
    pool_idle: int
    records: frozenset[str]            # state_dir/containers: the containers it has
    ahead: tuple[str, ...]             # of those, cgroups made ahead of a container: empty,
                                       # their init leaf only, never run in (one at most)
    inits: int                         # the spawner's children: one per container
    strays: tuple[str, ...]            # any other process below the service
    mounts_per_container: int | None   # the most of any container (None: unreadable)
    cgroups_per_container: int | None  # run cgroups below a container's, the most of any
    stray_cgroups: tuple[str, ...]     # empty cgroups of containers of ours that are gone
    others_empty: int                  # empty container cgroups of other services (root's
                                       # services share a base): counted, not ours to judge
    store: dict[str, int]
    temp: tuple[str, ...]
    sessions: int
    images: frozenset[str]
    files: frozenset[str]

    def figures(self) -> dict[str, Any]:
        return {"rss_mib": round(self.rss / 2**20, 2), "fds": self.fds,
                "cgroup_fds": self.cgroup_fds, "run_cgroups": self.run_cgroups,
                "threads": self.threads, "live_containers": self.live_containers,
                "pool_idle": self.pool_idle, "inits": self.inits,
                "mounts_per_container": self.mounts_per_container,
                "cgroups_per_container": self.cgroups_per_container,
                "store": self.store, "sessions": self.sessions,
                "other_services_empty_cgroups": self.others_empty,
                "images": len(self.images), "files": len(self.files)}


@dataclass
class Service:
    """The service under soak: its URL and its process (on this machine)."""

    url: str
    http: aiohttp.ClientSession
    pid: int
    state_dir: Path | None = None
    cgroup_bases: tuple[str, ...] = ()     # every hierarchy's (v1: one per controller)
    cgroups_before: frozenset[str] = field(default_factory=frozenset)

    @property
    def cgroup_base(self) -> Path | None:
        """Where its containers' cgroups are looked at (v1: the memory hierarchy)."""
        return Path(self.cgroup_bases[0]) if self.cgroup_bases else None

    @classmethod
    async def attach(cls, url: str, http: aiohttp.ClientSession, pid: int) -> Service:
        """The service at `url` whose process is `pid`; the container cgroups that exist
        now are not its leftovers."""
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error as e:
            raise SoakCheckError(f"cannot read process {pid}: {e}; give the pid of the "
                                 "service under soak, on this machine") from None
        state = (Path(cmdline[cmdline.index("--state-dir") + 1])
                 if "--state-dir" in cmdline[:-1] else None)
        info = await _get_json(http, url + "/v1/info")
        svc = cls(url, http, pid, state, _cgroup_bases(info))
        svc.cgroups_before = frozenset(svc._container_cgroups())
        return svc

    async def metrics(self) -> dict[str, float]:
        async with self.http.get(self.url + "/metrics") as resp:
            text = await resp.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                name = key.split("{", 1)[0]
                out[name] = out.get(name, 0.0) + float(value)
        return out

    async def quiet(self, idle: int | None) -> bool:
        """Wait until no run is running or queued and the containers, the warm pool (at
        `idle` when given) and the process tree stay as they are; False if that never
        came within QUIET_TIMEOUT_S."""
        deadline = time.monotonic() + QUIET_TIMEOUT_S
        last: tuple[float, ...] | None = None
        same = 0
        while time.monotonic() < deadline:
            m = await self.metrics()
            now = (m.get("sandboxd_live_containers", 0.0), m.get("sandboxd_pool_idle", 0.0),
                   m.get("sandboxd_sessions", 0.0), float(self._tree_size()))
            busy = m.get("sandboxd_runs_running", 0.0) + m.get("sandboxd_runs_queued", 0.0)
            settled = busy == 0 and (idle is None or now[1] == idle)
            same = same + 1 if settled and now == last else 0
            if same >= QUIET_POLLS - 1:
                return True
            last = now
            await asyncio.sleep(QUIET_POLL_S)
        return False

    def _tree_size(self) -> int:
        try:
            return len(psutil.Process(self.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            raise SoakCheckError(f"the service (pid {self.pid}) is gone") from None

    def usage(self) -> tuple[int, int]:
        """The service's RSS and open descriptors now."""
        p = psutil.Process(self.pid)
        return int(p.memory_info().rss), p.num_fds()

    async def level(self, seen: set[str]) -> Level:
        """The look; `seen`: the containers the soak's runs ran in (gone ones too)."""
        m = await self.metrics()
        proc = psutil.Process(self.pid)
        inits, strays = self._processes(proc)
        records = frozenset(p.name for p in (self.state_dir / "containers").iterdir()
                            ) if self.state_dir is not None else frozenset()
        sessions = await _get_json(self.http, self.url + "/v1/containers")
        images = await _get_json(self.http, self.url + "/v1/images")
        files = await _get_json(self.http, self.url + "/v1/files")
        fds, cgroup_fds = _fds(self.pid, self.cgroup_bases)
        run_cgroups = [self._run_cgroups(r) for r in records]
        return Level(
            rss=int(proc.memory_info().rss), fds=fds, cgroup_fds=cgroup_fds,
            run_cgroups=sum(n for n in run_cgroups if n is not None),
            hierarchies=len(self.cgroup_bases), threads=proc.num_threads(),
            live_containers=int(m.get("sandboxd_live_containers", 0)),
            pool_idle=int(m.get("sandboxd_pool_idle", 0)), records=records,
            ahead=self._ahead(records, seen),
            inits=len(inits), strays=strays,
            mounts_per_container=_most(_mounts(p) for p in inits),
            cgroups_per_container=_most(run_cgroups),
            **self._empty_cgroups(records, seen),
            store=self._store(), temp=self._temp(proc),
            sessions=len(sessions["containers"]),
            images=frozenset(i["digest"] for i in images["images"]),
            files=frozenset(f["id"] for f in files["files"]))

    def _processes(self, proc: psutil.Process) -> tuple[list[psutil.Process], tuple[str, ...]]:
        """The containers' inits (the spawner's children, but for its own helpers made
        ahead and its id mapper), and every other process below the service that is
        neither them nor the spawner's."""
        strays: list[str] = []
        inits: list[psutil.Process] = []
        for child in proc.children():
            if SPAWNER_MODULE in " ".join(_cmdline(child)):
                inits += (p for p in child.children()
                          if _name(p) not in (HELPER_NAME, MAPPER_NAME))
            else:
                strays.append(_describe(child))
        for init in inits:
            strays += (_describe(p) for p in init.children(recursive=True)
                       if not _made_ahead(p, init))
        strays += (_describe(p) for p in proc.children(recursive=True)
                   if _status(p) == psutil.STATUS_ZOMBIE)
        return inits, tuple(strays)

    def _container_cgroups(self) -> list[str]:
        if self.cgroup_base is None or not self.cgroup_base.is_dir():
            return []
        return [p.name for p in self.cgroup_base.iterdir() if p.name.startswith("c-")]

    def _run_cgroups(self, record: str) -> int | None:
        """The run cgroups below a container's (its runs', in use or made ahead); its
        init's own is not one."""
        if self.cgroup_base is None:
            return None
        try:
            return sum(1 for p in (self.cgroup_base / f"c-{record}").iterdir()
                       if p.is_dir() and p.name != "init")
        except OSError:
            return None

    def _ahead(self, records: frozenset[str], seen: set[str]) -> tuple[str, ...]:
        """The records that are the runtime's cgroups made ahead of the next container
        (spawnerclient._CgroupsAhead), not a container's."""
        base = self.cgroup_base
        if base is None:
            return ()
        waiting = []
        for r in sorted(records - seen):
            cgroup = base / f"c-{r}"
            try:
                children = [p.name for p in cgroup.iterdir() if p.is_dir()]
            except OSError:
                continue
            if children == ["init"] and not _holds_processes(cgroup):
                waiting.append(r)
        return tuple(waiting)

    def _empty_cgroups(self, records: frozenset[str], seen: set[str]) -> dict[str, Any]:
        """Container cgroups made since the soak began that no live container owns and no
        process is in: a container destroyed without its cgroup when the soak's runs ran
        in it; another service's otherwise (one being set up this instant, or a leak of
        its own)."""
        base = self.cgroup_base
        empty = [] if base is None else [
            name for name in self._container_cgroups()
            if name not in self.cgroups_before and name[2:] not in records
            and not _holds_processes(base / name)]
        ours = tuple(sorted(n for n in empty if n[2:] in seen))
        return {"stray_cgroups": ours, "others_empty": len(empty) - len(ours)}

    def _store(self) -> dict[str, int]:
        if self.state_dir is None:
            return {}
        out = {}
        for sub in STORE_DIRS:
            d = self.state_dir / sub
            out[sub] = sum(1 for _ in d.iterdir()) if d.is_dir() else 0
        return out

    def _temp(self, proc: psutil.Process) -> tuple[str, ...]:
        """What is in the state dir's temporary directories (tmp/ of the store and the
        file cache, builds/) and in the service's own TMPDIR; the system-wide /tmp is
        everyone's and is not looked at."""
        dirs: list[Path] = []
        if self.state_dir is not None:
            dirs += [p for p in self.state_dir.glob("**/tmp") if p.is_dir()]
            dirs.append(self.state_dir / "builds")
        tmpdir = _environ(proc).get("TMPDIR")
        if tmpdir and Path(tmpdir).resolve() != Path("/tmp"):
            dirs.append(Path(tmpdir))
        return tuple(sorted(str(p) for d in dirs if d.is_dir() for p in d.iterdir()))


def leaks(after_warmup: Level, end: Level) -> list[str]:
    """Everything that grew from the level after warm-up to the end, or is left over at
    the end; empty when nothing did."""
    a, b = after_warmup, end
    found = []
    for what, x, y in (("RSS", a.rss, b.rss),
                       ("open descriptors (but the run cgroups')", a.fds, b.fds)):
        if y > x * (1 + GROWTH):
            found.append(f"the service's {what} grew from {x} to {y} (+{(y - x) / x:.1%}, "
                         f"more than {GROWTH:.0%})")
    # Each run cgroup: a cgroup.procs per hierarchy, and the counter files it keeps open.
    if b.cgroup_fds > b.run_cgroups * (b.hierarchies + KEPT_FILES_MAX):
        found.append(f"{b.cgroup_fds} descriptors of run cgroups open, for "
                     f"{b.run_cgroups} run cgroups in {b.hierarchies} hierarchies (and "
                     f"{KEPT_FILES_MAX} counter files each at most)")
    if b.inits != b.live_containers or len(b.records) - len(b.ahead) != b.live_containers:
        found.append(f"{b.live_containers} live containers by the service's count, "
                     f"{b.inits} container inits below its spawner, {len(b.records)} "
                     f"container records in its state dir ({len(b.ahead)} of them cgroups "
                     "made ahead)")
    if len(b.ahead) > 1:
        found.append(f"{len(b.ahead)} sets of cgroups made ahead of a container, where the "
                     f"runtime keeps one at most: {', '.join(b.ahead)}")
    if b.strays:
        found.append(f"processes left below the service: {', '.join(b.strays[:10])}")
    for what, x2, y2 in (("mounts in a container", a.mounts_per_container,
                          b.mounts_per_container),
                         ("run cgroups below a container's", a.cgroups_per_container,
                          b.cgroups_per_container)):
        if x2 is not None and y2 is not None and y2 > x2:
            found.append(f"{what}: at most {x2} after warm-up, {y2} at the end")
    if b.stray_cgroups:
        found.append(f"container cgroups no container owns: {', '.join(b.stray_cgroups)}")
    if b.store != a.store:
        found.append(f"the store on disk changed: {a.store} after warm-up, {b.store} at "
                     "the end")
    if b.temp:
        found.append(f"temporary files left: {', '.join(b.temp[:10])}")
    if b.sessions:
        found.append(f"{b.sessions} sessions left")
    if b.images != a.images or b.files != a.files:
        found.append(f"store entries changed: images {sorted(a.images ^ b.images)}, "
                     f"cached files {sorted(a.files ^ b.files)}")
    return found


def cgroups_left(base: str | None, containers: list[str]) -> list[str]:
    """The cgroups of `containers` still there (after their service stopped: none may)."""
    return [] if base is None else sorted(f"c-{c}" for c in containers
                                          if (Path(base) / f"c-{c}").exists())


async def _get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as resp:
        if resp.status != 200:
            raise SoakCheckError(f"GET {url}: HTTP {resp.status}: {await resp.text()}")
        doc = await resp.json()
    if not isinstance(doc, dict):
        raise SoakCheckError(f"GET {url}: not a JSON object")
    return doc


def _cgroup_bases(info: dict[str, Any]) -> tuple[str, ...]:
    """The bases of the service's container cgroups, the memory hierarchy's first (v1 has
    one per controller, some shared; v2 one)."""
    base = (info.get("host", {}).get("cgroup") or {}).get("base")
    if isinstance(base, str):
        return (base,)
    if not isinstance(base, dict):
        return ()
    first = [base["memory"]] if "memory" in base else []
    return tuple(dict.fromkeys(first + sorted(str(b) for b in base.values())))


def _fds(pid: int, cgroup_bases: tuple[str, ...]) -> tuple[int, int]:
    """The service's descriptors: those of cgroups below its bases (a run cgroup keeps its
    cgroup.procs and the counters read at a run's end open), and every other."""
    cgroups = other = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if any(target.startswith(b + "/") for b in cgroup_bases):
            cgroups += 1
        else:
            other += 1
    return other, cgroups


def _holds_processes(cgroup: Path) -> bool:
    for procs in cgroup.glob("**/cgroup.procs"):
        try:
            if procs.read_text().strip():
                return True
        except OSError:
            continue
    return False


def _mounts(init: psutil.Process) -> int | None:
    try:
        with open(f"/proc/{init.pid}/mountinfo") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _most(values: Any) -> int | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return list(p.cmdline())
    except psutil.Error:
        return []


def _name(p: psutil.Process) -> str:
    try:
        return str(p.name())
    except psutil.Error:
        return ""


def _status(p: psutil.Process) -> str:
    try:
        return str(p.status())
    except psutil.Error:
        return ""


def _made_ahead(p: psutil.Process, init: psutil.Process) -> bool:
    """Init's child made ahead for the next run (native/init.c prepare): init's own image,
    waiting, not a run's process."""
    try:
        return p.ppid() == init.pid and p.name() == "sbx-init" and not p.children()
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {p.name()} ({_status(p)})"
    except psutil.Error:
        return f"{p.pid} (gone)"


def _environ(p: psutil.Process) -> dict[str, str]:
    try:
        return dict(p.environ())
    except psutil.Error:
        return {}
