"""What POST /v1/build makes agrees with buildah (issue #12 point 5): each Dockerfile below is
built by sandboxd and pushed, read back with skopeo (digests as the build reported them) and
unpacked with umoci; buildah builds the same context; the two root filesystems must hold the
same paths, kinds, permission bits, link targets and contents (owners too when we are root:
a rootless umoci unpack cannot keep them), and the run config fields Docker defines must be
equal. Not compared: mtimes, history, and the number of layers (buildah commits one layer
for all of a stage's steps, sandboxd one per step, Docker's classic builder one per step:
the layering is each builder's own choice, the image's filesystem is not)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import tenacity

from tests.service.conftest import Service
from tests.service.test_api_build import Files, build, context, image_of
from tests.support.images import Tools

ROOT = os.geteuid() == 0
# buildah's re-exec into its chroot copies itself into a memfd and seals it; the kernel
# refuses the seal (EBUSY) while another CPU's LRU batch still holds a page of the copy,
# which a loaded 2-core CI machine hits now and then. Seen once in CI; the build is sound.
BUILDAH_TRANSIENT = "sealing memfd copy: Device or resource busy"
# Run config fields a Dockerfile sets and every builder must write alike (Docker's
# image spec, v1.2). Empty and absent are the same: builders differ in which they write.
RUN_FIELDS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User", "Labels", "ExposedPorts",
              "Volumes", "StopSignal", "Healthcheck", "Shell", "OnBuild")
# Labels buildah writes of its own into every image it builds.
BUILDAH_LABELS = ("io.buildah.version",)
BUILDAH_MOUNT_POINTS = ("etc/hosts", "etc/resolv.conf", "run")
EMPTY = hashlib.sha256(b"").hexdigest()[:16]


def _bundle_tar() -> bytes:
    """A local tar.gz for ADD (extracted by both): a directory, modes, an owner, a link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, data, owner in (
                ("pkg", tarfile.DIRTYPE, 0o750, b"", 0),
                ("pkg/tool", tarfile.REGTYPE, 0o755, b"#!/bin/sh\necho tool\n", 0),
                ("pkg/secret", tarfile.REGTYPE, 0o600, b"only the owner\n", 33),
                ("pkg/current", tarfile.SYMTYPE, 0o777, b"tool", 0),
                ("hostname.d", tarfile.DIRTYPE, 0o755, b"", 0),
                ("hostname.d/extra", tarfile.REGTYPE, 0o644, b"added\n", 0)):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, owner, owner, 1
            if kind == tarfile.SYMTYPE:
                info.linkname = data.decode()
                data = b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class Case:
    name: str
    dockerfile: str  # "{base}" stands for the test registry's busybox
    files: Files = field(default_factory=dict)
    build_args: tuple[str, ...] = ()
    # Run config fields where buildah is the odd one out: what Docker writes (read in
    # BuildKit's dockerfile2llb), which ours must equal instead of buildah's.
    docker: Mapping[str, Any] = field(default_factory=dict)
    # What Docker's reference says some paths must be ("kind mode", None: absent), checked
    # in ours whatever buildah made.
    expect: Mapping[str, str | None] = field(default_factory=dict)
    # Paths whose owner buildah gets wrong: Docker's owner, checked in ours (as root) in
    # place of buildah's.
    owners: Mapping[str, tuple[int, int]] = field(default_factory=dict)


CASES = [
    Case("busybox", """
ARG BASE={base}
FROM ${{BASE}}
ARG WHO=nobody
ARG KIND=default-kind
ENV GREETING="hello $WHO" KIND=$KIND PATH=/usr/local/bin:/bin
LABEL org.example.who="$WHO" org.example.multi="a b" plain=1
EXPOSE 8080 53/udp 7000-7001/tcp
VOLUME ["/data"]
STOPSIGNAL SIGUSR1
HEALTHCHECK --interval=5s --timeout=2s --start-period=1s --retries=2 \\
    CMD wget -q -O- http://localhost:8080/ || exit 1
WORKDIR /srv/app/sub
COPY app/ /srv/app/
COPY notes.txt rel/
COPY --chown=1000:1000 --chmod=640 conf.txt /etc/
COPY --chmod=755 run.sh /tmp/
COPY --chown=33:33 notes.txt /opt/deep/missing/
ADD bundle.tar.gz /opt/bundle/
ADD bundle.tar.gz /etc/
ADD --chown=5:5 bundle.tar.gz /opt/owned/
COPY --chown=nobody:nogroup notes.txt /home/
COPY links/ /srv/links/
RUN ["/bin/sh", "-c", "echo exec form > /srv/exec-form"]
SHELL ["/bin/sh", "-ec"]
RUN echo "$GREETING" >> /etc/passwd; rm /etc/group; echo new > /etc/new; \\
    rm -rf /srv/app/lib && mkdir /srv/app/lib && echo fresh > /srv/app/lib/fresh; \\
    rm -rf /var && mkdir -p /var/tmp && echo v > /var/tmp/v; \\
    echo s > /srv/setuid && chmod 4755 /srv/setuid && mkdir -m 2775 /srv/setgid
USER 1000:1000
ENTRYPOINT ["/bin/sh", "-c"]
CMD echo "$GREETING"
ONBUILD RUN echo child
""", {"app/main.py": "print('app')\n", "app/lib/util.py": "X = 1\n",
      "app/lib/data/table.csv": "a,b\n1,2\n", "notes.txt": "notes\n", "conf.txt": "k=v\n",
      "run.sh": "#!/bin/sh\necho run\n", "bundle.tar.gz": _bundle_tar(),
      "links/target.txt": "target\n", "links/rel": ("symlink", "target.txt"),
      "links/abs": ("symlink", "/etc/passwd"), "links/dangling": ("symlink", "../nowhere"),
      "links/dir": ("symlink", ".")}, ("WHO=judges",), docker={
          # buildah 1.28 ignores SHELL for a shell-form CMD or ENTRYPOINT; Docker's
          # withShell() prepends the image's Shell (the reference: SHELL "affects the shell
          # form of RUN, CMD and ENTRYPOINT").
          "Cmd": ["/bin/sh", "-ec", 'echo "$GREETING"'],
          # buildah keeps a port range as one key; Docker expands it (nat.ParsePortSpecs).
          "ExposedPorts": {"8080/tcp": {}, "53/udp": {}, "7000/tcp": {}, "7001/tcp": {}}},
         expect={"tmp": "dir 1777", "etc": "dir 0755", "etc/conf.txt": "file 0640",
                 "tmp/run.sh": "file 0755", "opt/deep/missing/notes.txt": "file 0644",
                 "opt/bundle/pkg": "dir 0750", "opt/bundle/pkg/secret": "file 0600",
                 "etc/pkg/current": "symlink 0777 tool", "etc/hostname.d/extra": "file 0644",
                 "srv/app/sub": "dir 0755", "srv/app/sub/rel/notes.txt": "file 0644",
                 "srv/links/abs": "symlink 0777 /etc/passwd", "etc/group": None,
                 "srv/app/lib/util.py": None, "srv/app/lib/fresh": "file 0644",
                 "var/tmp": "dir 0755", "srv/setuid": "file 4755", "srv/setgid": "dir 2775",
                 "data": None},
         # buildah 1.28 keeps an ADDed archive's owners under --chown; BuildKit gives its
         # entries --chown's ids ("explicit --chown values override the header ownership",
         # file/unpack.go ownerMapper), as ours does.
         owners={f"opt/owned/{p}": (5, 5) for p in (
             "pkg", "pkg/tool", "pkg/secret", "pkg/current", "hostname.d",
             "hostname.d/extra")}),

    Case("multistage-scratch", """
FROM {base} AS build
ARG WHO=nobody
WORKDIR /src
RUN echo "made for $WHO" > out.txt && mkdir -p lib/deep && echo x > lib/deep/x \\
    && ln -s out.txt lib/link && ln -s /nowhere lib/dangling
FROM scratch
COPY --from=build /src/ /out/
COPY --from=build /bin/busybox /bin/
COPY --from=build --chown=1000:1000 --chmod=600 /src/out.txt /owned.txt
COPY --chown=7:8 tree/ /ctx/
WORKDIR /made/by/workdir
ENTRYPOINT ["/bin/busybox"]
CMD ["cat", "/out/out.txt"]
""", {"tree/a.txt": "a\n", "tree/sub/b.txt": "b\n", "tree/sub/ln": ("symlink", "../a.txt")},
         ("WHO=judges",)),

    Case("copy-keeps-directories", """
FROM {base} AS build
RUN mkdir -p /src/shared/tmp /src/private && chmod 2775 /src/shared \\
    && chmod 1777 /src/shared/tmp && chmod 700 /src/private && echo p > /src/private/p \\
    && chown -R 1000:1000 /src/private
FROM scratch
COPY --from=build /src/ /out/
COPY --chmod=750 tree/ /chmodded/
""", {"tree/a.txt": "a\n", "tree/sub/b.txt": "b\n"}),

    Case("copy-from-keeps-setuid", """
FROM {base} AS build
RUN echo s > /s && chmod 4755 /s && echo g > /g && chmod 2755 /g
FROM scratch
COPY --from=build /s /g /
"""),

    Case("copy-a-link", """
FROM scratch
COPY link-to-file /
COPY link-to-dir /linked/
""", {"file.txt": "through a link\n", "link-to-file": ("symlink", "file.txt"),
      "dir/inside.txt": "inside\n", "link-to-dir": ("symlink", "dir")}),

    Case("forms", """
FROM {base}
ENV A=1 B="two words"
ENV A=${{A}}0 C=${{UNSET:-fallback}}
LABEL "with space"="v" empty=""
ENTRYPOINT exec echo "$A"
CMD ["ignored"]
HEALTHCHECK NONE
STOPSIGNAL 9
EXPOSE 9000
VOLUME /v1 /v2
WORKDIR relative
USER nobody
"""),

    Case("workdir-after-user", """
FROM {base}
USER nobody
WORKDIR /home/app
"""),

    Case("onbuild", """
FROM {base} AS parent
ONBUILD RUN echo triggered > /triggered
ONBUILD ENV FROM_TRIGGER=1
FROM parent
RUN cat /triggered
"""),
]


@dataclass(frozen=True)
class Entry:
    kind: str                      # "dir", "file", "symlink" or "other"
    mode: int                      # permission bits with setuid, setgid, sticky
    content: str                   # a file's sha256, a link's target
    owner: tuple[int, int] | None  # only as root: a rootless unpack cannot keep owners

    def __str__(self) -> str:
        owner = f"{self.owner[0]}:{self.owner[1]}" if self.owner else ""
        return " ".join(p for p in (self.kind, f"{self.mode:04o}", self.content, owner) if p)


def tree(root: Path) -> dict[str, Entry]:
    """Every path below `root` (relative, "/" separated) and what it is."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            content = ""
            if stat.S_ISDIR(st.st_mode):
                kind = "dir"
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                kind, content = "file", hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            else:
                kind = "other"
            owner = (st.st_uid, st.st_gid) if ROOT else None
            out[path.relative_to(root).as_posix()] = Entry(kind, stat.S_IMODE(st.st_mode),
                                                           content, owner)
    return out


def buildah_alone(path: str, entry: Entry, volumes: Mapping[str, Any]) -> bool:
    """An empty file or directory buildah writes of its own and Docker does not: a RUN's
    mount points (buildah leaves /etc/hosts, /etc/resolv.conf and /run in the layer; Docker
    keeps them out of the image) and a VOLUME's directory (Docker's VOLUME only sets the
    config: BuildKit's dispatchVolume writes no layer)."""
    empty = entry.kind == "dir" or (entry.kind == "file" and entry.content == EMPTY)
    return empty and (path in BUILDAH_MOUNT_POINTS or f"/{path}" in volumes)


def tree_differences(ours: Mapping[str, Entry], theirs: Mapping[str, Entry],
                     volumes: Mapping[str, Any],
                     owners: Mapping[str, tuple[int, int]]) -> list[str]:
    out = []
    for p in sorted(ours.keys() | theirs.keys()):
        a, b = ours.get(p), theirs.get(p)
        if a is None and b is not None and buildah_alone(p, b, volumes):
            continue
        if p in owners and a is not None and b is not None:
            if ROOT and a.owner != owners[p]:
                out.append(f"/{p}: ours {a}, Docker's owner {owners[p]}")
            a, b = replace(a, owner=None), replace(b, owner=None)
        if a != b:
            out.append(f"/{p}: ours {a or 'missing'}, buildah's {b or 'missing'}")
    return out


def run_fields(config: Mapping[str, Any]) -> dict[str, Any]:
    run = config.get("config") or {}
    fields = {k: run.get(k) or None for k in RUN_FIELDS}
    labels = {k: v for k, v in (fields["Labels"] or {}).items() if k not in BUILDAH_LABELS}
    fields["Labels"] = labels or None
    # A mapping: buildah moves a variable ENV sets again to the end, where Docker replaces
    # it in place (BuildKit's addEnv) as ours does; the order carries no meaning.
    fields["Env"] = dict(e.partition("=")[::2] for e in fields["Env"] or ()) or None
    fields["os"], fields["architecture"] = config.get("os"), config.get("architecture")
    return fields


def config_differences(ours: Mapping[str, Any], theirs: Mapping[str, Any],
                       docker: Mapping[str, Any]) -> list[str]:
    a, b = run_fields(ours), run_fields(theirs)
    out = [f"{k}: ours {a[k]!r}, buildah's {b[k]!r}" for k in a
           if k not in docker and a[k] != b[k]]
    return out + [f"{k}: ours {a[k]!r}, Docker's {v!r}" for k, v in docker.items()
                  if a[k] != v]


def remove(path: Path) -> None:
    """rmtree, after making every directory ours to empty (an image may hold 0555 ones)."""
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o700)
    shutil.rmtree(path)


class Buildah:
    """buildah with a storage of its own (vfs, chroot isolation: rootless works with both)
    that every case shares, so the base image is pulled once."""

    def __init__(self, workdir: Path) -> None:
        self.tools = Tools(workdir)
        self.storage = [workdir / "storage", workdir / "runroot"]
        self.argv = ["buildah", "--root", str(self.storage[0]), "--runroot",
                     str(self.storage[1]), "--storage-driver", "vfs"]

    @tenacity.retry(retry=tenacity.retry_if_exception(
                        lambda e: BUILDAH_TRANSIENT in str(e)),
                    stop=tenacity.stop_after_attempt(3), reraise=True)
    def _build(self, context_dir: Path, build_args: tuple[str, ...]) -> None:
        args = [a for arg in build_args for a in ("--build-arg", arg)]
        self.tools.run(*self.argv, "build", "--quiet", "--isolation", "chroot", "--format",
                       "docker", "--tls-verify=false", *args, "-t", "cmp", str(context_dir))

    def build(self, context_dir: Path, layout: Path, build_args: tuple[str, ...]
              ) -> dict[str, Any]:
        """Build, write the image to `layout` (tag "theirs"); returns its Docker config."""
        self._build(context_dir, build_args)
        # An OCI layout holds the OCI config, which has no Healthcheck, Shell or OnBuild:
        # the fields come from the Docker config buildah keeps beside it.
        self.tools.run(*self.argv, "push", "--quiet", "cmp", f"oci:{layout}:theirs")
        inspected = orjson.loads(self.tools.run(*self.argv, "inspect", "--type", "image",
                                                "cmp"))
        self.tools.run(*self.argv, "rmi", "cmp")
        return dict(inspected["Docker"])

    def close(self) -> None:
        if ROOT:
            for d in self.storage:
                shutil.rmtree(d, ignore_errors=True)
        else:  # the storage holds files of the user's subordinate ids: remove them as those
            self.tools.run(*self.argv, "unshare", "rm", "-rf", *map(str, self.storage))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("compat")
    yield path
    remove(path)


@pytest.fixture(scope="module")
def buildah(workdir: Path) -> Iterator[Buildah]:
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (apt-get install buildah)")
    b = Buildah(workdir / "buildah")
    yield b
    b.close()


def unpack_context(files: Files, dest: Path) -> None:
    """The very tar sandboxd receives, extracted for buildah (directories it only implies
    are 0755, as sandboxd's context takes them)."""
    with tarfile.open(fileobj=io.BytesIO(context(files)), mode="r:") as tar:
        tar.extractall(dest)
    for dirpath, dirnames, _ in os.walk(dest):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sandboxd_and_buildah_build_the_same_image(service: Service, images: Any,
                                                   buildah: Buildah, workdir: Path,
                                                   case: Case) -> None:
    tools = buildah.tools
    here = workdir / case.name
    ctx, ours_layout, theirs_layout = here / "context", here / "ours", here / "theirs"
    files = {"Dockerfile": case.dockerfile.format(base=images.oci), **case.files}
    unpack_context(files, ctx)
    name = f"{service.registry_host}/compat/{case.name}:1"

    async def go(s: aiohttp.ClientSession) -> tuple[dict[str, Any], dict[str, Any]]:
        # buildah works (in a thread) while sandboxd builds: two builders, two cores.
        theirs = asyncio.ensure_future(asyncio.to_thread(
            buildah.build, ctx, theirs_layout, case.build_args))
        status, events = await build(s, files, tag=name, build_arg=list(case.build_args))
        assert status == 200, events
        built = image_of(events)
        async with s.post("/v1/images/push", json={"source": name}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["digest"] == built["digest"]
        return built, await theirs

    built, their_config = service.call(go)

    # What the registry holds is what the build reported, byte for byte.
    manifest = tools.run("skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{name}")
    config_raw = tools.run("skopeo", "inspect", "--tls-verify=false", "--config", "--raw",
                           f"docker://{name}")
    assert f"sha256:{hashlib.sha256(manifest.encode()).hexdigest()}" == built["digest"]
    assert orjson.loads(manifest)["config"]["digest"] == built["config_digest"]
    assert f"sha256:{hashlib.sha256(config_raw.encode()).hexdigest()}" == built["config_digest"]
    inspected = orjson.loads(tools.run("skopeo", "inspect", "--tls-verify=false",
                                       f"docker://{name}"))
    assert inspected["Digest"] == built["digest"]
    our_config = orjson.loads(config_raw)
    digest = tools.skopeo_copy(f"docker://{name}", f"oci:{ours_layout}:ours",
                               "--src-tls-verify=false")
    assert digest == built["digest"]  # an OCI manifest: copied into the layout unchanged

    for layout, tag in ((ours_layout, "ours"), (theirs_layout, "theirs")):
        tools.run("umoci", "unpack", *tools.rootless, "--image", f"{layout}:{tag}",
                  str(here / f"bundle-{tag}"))
    ours_tree = tree(here / "bundle-ours" / "rootfs")
    theirs_tree = tree(here / "bundle-theirs" / "rootfs")
    remove(here)

    volumes = our_config.get("config", {}).get("Volumes") or {}
    for path, want in case.expect.items():
        got = ours_tree.get(path)
        assert (got is None if want is None else str(got).startswith(want)), (path, got)
    differences = (config_differences(our_config, their_config, case.docker)
                   + tree_differences(ours_tree, theirs_tree, volumes, case.owners))
    assert not differences, "\n".join(differences)
