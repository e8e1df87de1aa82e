"""The image config (OCI `config.md` / Docker container config) and the run defaults it gives.

`parse_config` checks a hostile config blob; `run_defaults` and `apply_run` turn it into the
argv, environment and working directory of a process exactly as `docker run` merges them;
`resolve_user` maps the config's User through the image's own /etc/passwd and /etc/group.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from sandbox.errors import ImageError, InvalidReference, ManifestError
from sandbox.images import digests
from sandbox.images.manifest import Platform
from sandbox.runtime.requests import DEFAULT_PATH

MAX_CONFIG_BYTES = 4 * 1024 * 1024
# /etc/passwd and /etc/group come from the image: bound what we parse (CVE-2026-47262).
MAX_ACCOUNT_FILE_BYTES = 1024 * 1024
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to the kernel, never an id
# Top-level fields of an OCI image config; Docker-only leftovers (container_config, ...)
# are not carried into configs we build.
_OCI_FIELDS = ("created", "author", "architecture", "os", "os.version", "os.features",
               "variant", "config", "rootfs", "history")


@dataclass(frozen=True)
class ImageConfig:
    os: str
    architecture: str
    variant: str | None
    env: tuple[str, ...]
    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    working_dir: str
    user: str
    labels: Mapping[str, str] = field(hash=False)
    diff_ids: tuple[str, ...]
    raw: Mapping[str, Any] = field(hash=False, repr=False)

    @property
    def platform(self) -> Platform:
        return Platform(self.os, self.architecture, self.variant)


def parse_config(body: bytes) -> ImageConfig:
    """Parse and check an image config blob; missing optional fields become empty."""
    if len(body) > MAX_CONFIG_BYTES:
        raise ManifestError(f"image config is {len(body)} bytes, over the {MAX_CONFIG_BYTES} "
                            "byte limit")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ManifestError(f"image config is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError("image config is not a JSON object")
    os_name = _string(doc, "os", "image config", required=True)
    arch = _string(doc, "architecture", "image config", required=True)
    variant = _string(doc, "variant", "image config") or None

    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise ManifestError("image config rootfs must be an object with type 'layers'; this "
                            "is not a container image config")
    raw_ids = rootfs.get("diff_ids")
    if not isinstance(raw_ids, list):
        raise ManifestError(f"image config rootfs.diff_ids is {_show(raw_ids)}, not a list")
    try:
        diff_ids = tuple(digests.validate(d, f"image config diff_ids[{i}]")
                         for i, d in enumerate(raw_ids))
    except InvalidReference as exc:
        raise ManifestError(str(exc)) from None

    run = doc.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise ManifestError(f"image config 'config' is {_show(run)}, not an object")
    labels = run.get("Labels")
    if labels is None:
        labels = {}
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise ManifestError("image config Labels must map strings to strings")
    return ImageConfig(
        os=os_name, architecture=arch, variant=variant,
        env=_strings(run, "Env"), entrypoint=_strings(run, "Entrypoint"),
        cmd=_strings(run, "Cmd"), working_dir=_string(run, "WorkingDir", "image config"),
        user=_string(run, "User", "image config"), labels=MappingProxyType(labels),
        diff_ids=diff_ids, raw=MappingProxyType(doc))


def _string(obj: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ManifestError(f"{where} {key} is {_show(value)}; expected a non-empty string"
                            if required else f"{where} {key} is {_show(value)}, not a string")
    if "\0" in value:
        raise ManifestError(f"{where} {key} contains a NUL character")
    return value


def _strings(obj: dict[str, Any], key: str) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ManifestError(f"image config {key} is {_show(value)}, not a list of strings")
    if any("\0" in s for s in value):
        raise ManifestError(f"image config {key} contains a NUL character")
    return tuple(value)


def _show(value: object) -> str:
    return repr(value)[:80]


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainIDs (image-spec config.md): each names the stack of layers up to and including it."""
    chain: list[str] = []
    for diff_id in diff_ids:
        digests.validate(diff_id, "diff_id")
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(
                f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return chain


def build_config(*, diff_ids: Sequence[str], base: ImageConfig | None = None,
                 run: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None, cmd: Sequence[str] | None = None,
                 entrypoint: Sequence[str] | None = None, working_dir: str | None = None,
                 user: str | None = None, created: str | None = None,
                 history_comment: str = "", created_by: str = "sandboxd",
                 author: str = "", history: Sequence[Mapping[str, Any]] | None = None,
                 platform: Platform | None = None) -> bytes:
    """A new image config: `base` (or an empty linux image for `import`) with the changes given.

    `diff_ids` is the new image's full layer list; with a base it must extend the base's.
    `run` replaces the base's "config" object (Docker's keys: what a commit's changes or a
    build's instructions made of it, see instructions.py); `env` ... `user` then change it
    (see `edit_run`). Each new layer gets a history entry (`created_by`, `history_comment`,
    `author`); `author` is also the image's (a base's is not carried over, as docker commit
    does); a build gives its steps' entries as `history` instead. `created` (RFC 3339) is
    written only if given, so the same inputs give the same bytes. Without a base, the
    image is for `platform` (default: this host's).
    """
    ids = [digests.validate(d, f"diff_ids[{i}]") for i, d in enumerate(diff_ids)]
    if base is not None and tuple(ids[:len(base.diff_ids)]) != base.diff_ids:
        raise ImageError("the new image's diff_ids must start with the base image's layers")
    doc: dict[str, Any] = (
        {k: base.raw[k] for k in _OCI_FIELDS if k in base.raw} if base is not None
        else _platform_fields(platform or Platform.host()))
    config: dict[str, Any] = dict((doc.get("config") or {}) if run is None else run)
    edit_run(config, env=env, cmd=cmd, entrypoint=entrypoint, working_dir=working_dir,
             user=user)
    doc["config"] = config
    doc["rootfs"] = {"type": "layers", "diff_ids": ids}

    entries = list(doc.get("history") or []) if base is not None else []
    if history is not None:
        entries += [dict(entry) for entry in history]
    else:
        for _ in ids[len(base.diff_ids) if base else 0:]:
            entry: dict[str, Any] = {"created_by": created_by}
            if created:
                entry["created"] = created
            if history_comment:
                entry["comment"] = history_comment
            if author:
                entry["author"] = author
            entries.append(entry)
    doc["history"] = entries
    for key, value in (("created", created), ("author", author)):
        if value:
            doc[key] = value
        else:
            doc.pop(key, None)
    out = orjson.dumps(doc, option=orjson.OPT_SORT_KEYS)
    if len(out) > MAX_CONFIG_BYTES:
        raise ImageError(f"the new image's config would be {len(out)} bytes, over the "
                         f"{MAX_CONFIG_BYTES} byte limit: shorten its labels, environment, "
                         "message or author")
    parse_config(out)  # never emit a config we would refuse
    return out


def _platform_fields(platform: Platform) -> dict[str, Any]:
    doc: dict[str, Any] = {"architecture": platform.architecture, "os": platform.os}
    if platform.variant:
        doc["variant"] = platform.variant
    return doc


def edit_run(run: dict[str, Any], *, env: Mapping[str, str] | None = None,
             cmd: Sequence[str] | None = None, entrypoint: Sequence[str] | None = None,
             working_dir: str | None = None, user: str | None = None,
             keep_cmd: bool = False) -> None:
    """Change an image's "config" object (Docker's keys) in place, each value checked: the
    options of an import and the instructions of a commit or a build all come here.

    `env` is merged over Env (a name already there keeps its place). Setting `entrypoint`
    clears Cmd unless `cmd` is given too or `keep_cmd` (a CMD earlier in the same build),
    as a Dockerfile ENTRYPOINT does. A new Cmd or Entrypoint drops ArgsEscaped, which
    only Windows images use.
    """
    if env:
        run["Env"] = _merge_env(run.get("Env") or [], env)
    if entrypoint is not None:
        run["Entrypoint"] = _argv(entrypoint, "entrypoint")
        if cmd is None and not keep_cmd:
            run.pop("Cmd", None)
    if cmd is not None:
        run["Cmd"] = _argv(cmd, "cmd")
    if cmd or entrypoint:
        run.pop("ArgsEscaped", None)
    if working_dir is not None:
        run["WorkingDir"] = _absolute(working_dir, "working_dir")
    if user is not None:
        _check_user(user)
        run["User"] = user


def _merge_env(current: Sequence[str], changes: Mapping[str, str]) -> list[str]:
    merged = dict(_env_pairs(current))
    for key, value in changes.items():
        _check_env(key, value)
        merged[key] = value
    return [f"{k}={v}" for k, v in merged.items()]


def _env_pairs(entries: Sequence[str]) -> list[tuple[str, str]]:
    # An entry without '=' names no variable a process could read: Docker passes it on and
    # getenv never finds it, so dropping it changes nothing.
    return [(k, v) for k, sep, v in (e.partition("=") for e in entries) if sep and k]


def _check_env(key: str, value: str) -> None:
    if not isinstance(key, str) or not key or "=" in key or "\0" in key:
        raise ImageError(f"environment variable name {_show(key)} is invalid: it must be "
                         "non-empty without '=' or NUL")
    if not isinstance(value, str) or "\0" in value:
        raise ImageError(f"environment variable {key} has a value that is not a string "
                         "without NUL characters")


def _argv(args: Sequence[str], name: str) -> list[str]:
    if isinstance(args, str | bytes) or not all(isinstance(a, str) and "\0" not in a
                                                for a in args):
        raise ImageError(f"{name} must be a list of strings without NUL characters, "
                         f"not {_show(args)}")
    return list(args)


def _absolute(path: str, name: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ImageError(f"{name} {_show(path)} must be an absolute path such as '/app'")
    return posixpath.normpath(path).replace("//", "/")


@dataclass(frozen=True)
class RunDefaults:
    """`argv` is Entrypoint + Cmd; the two halves are kept because a run request that sets
    one of them treats the other differently."""

    argv: tuple[str, ...]
    env: dict[str, str] = field(hash=False)
    cwd: str
    user: str
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.entrypoint and not self.cmd:
            object.__setattr__(self, "cmd", tuple(self.argv))
        elif tuple(self.argv) != self.entrypoint + self.cmd:
            raise ImageError("RunDefaults.argv must be entrypoint + cmd")


def run_defaults(config: ImageConfig) -> RunDefaults:
    """What `docker run IMAGE` would run: Entrypoint + Cmd, Env (PATH defaulted), WorkingDir."""
    env = dict(_env_pairs(config.env))
    env.setdefault("PATH", DEFAULT_PATH)
    # Docker refuses a relative WorkingDir at run time; treating it as relative to / keeps
    # images built by lax tools runnable and still names a path inside the container.
    cwd = config.working_dir or "/"
    if not cwd.startswith("/"):
        cwd = "/" + cwd
    return RunDefaults(argv=config.entrypoint + config.cmd, env=env,
                       cwd=posixpath.normpath(cwd).replace("//", "/"), user=config.user,
                       entrypoint=config.entrypoint, cmd=config.cmd)


def apply_run(defaults: RunDefaults, *, cmd: Sequence[str] | None,
              env: Mapping[str, str] | None, cwd: str | None,
              entrypoint: Sequence[str] | None = None) -> tuple[list[str], dict[str, str], str]:
    """Merge a run request over the image defaults as Docker does (daemon/commit.go merge).

    A non-empty `entrypoint` replaces the image's and drops its Cmd; an empty one clears the
    Entrypoint but keeps the image's Cmd when no `cmd` is given. A non-empty `cmd` replaces
    the image's Cmd. Request env wins over image env.
    """
    if entrypoint is not None:
        entrypoint = _argv(entrypoint, "entrypoint")
    run_cmd = _argv(cmd, "cmd") if cmd is not None else []
    if not entrypoint:
        if not run_cmd:
            run_cmd = list(defaults.cmd)
        if entrypoint is None:
            entrypoint = list(defaults.entrypoint)
    argv = [*entrypoint, *run_cmd]
    if not argv:
        raise ImageError("nothing to run: the image sets no Entrypoint or Cmd and the request "
                         "gave no cmd; pass cmd (e.g. ['/bin/sh', '-c', '...'])")
    merged = dict(defaults.env)
    for key, value in (env or {}).items():
        _check_env(key, value)
        merged[key] = value
    return argv, merged, _absolute(cwd, "cwd") if cwd is not None else defaults.cwd


def resolve_user(user: str, read_file: Callable[[str], bytes | None]) -> tuple[int | None,
                                                                              int | None]:
    """Map a config User to (uid, gid) as runc does; ("", ...) -> (None, None): the default.

    Numeric ids need no lookup except a lone uid, whose primary group comes from /etc/passwd
    (0 if it has no entry). Names are looked up in the image's /etc/passwd and /etc/group,
    read through `read_file(path)` (None when the file is missing).
    """
    _check_user(user)
    if not user:
        return None, None
    name, _, group = user.partition(":")
    uid: int | None = _number(name, "user")
    gid: int | None = _number(group, "group") if group else None
    if uid is None or (gid is None and not group):
        entry = _find_passwd(name, uid, read_file)
        if entry is None and uid is None:
            raise ImageError(f"user {name!r} does not exist in the image (no /etc/passwd "
                             "entry); use a numeric uid such as '1000:1000' or add the user")
        if entry is not None:
            uid = entry[0]
            if not group:
                gid = entry[1]
    if group and gid is None:
        gid = _find_group(group, read_file)
    return uid, 0 if gid is None else gid


def _check_user(user: str) -> None:
    if (not isinstance(user, str) or len(user) > 256 or user.count(":") > 1
            or any(c in user for c in "\0\n/") or user.startswith(":") or user.endswith(":")):
        raise ImageError(f"user {_show(user)} is not 'user', 'uid', 'user:group' or 'uid:gid'")


def _number(text: str, what: str) -> int | None:
    if not text.isascii() or not text.isdigit():
        return None
    value = _row_id(text)
    if value is None:
        raise ImageError(f"{what} id {text} is out of range (0 to {_MAX_ID})")
    return value


def _row_id(text: str) -> int | None:
    """A decimal id in range, else None (no int() of a huge hostile digit string)."""
    if not 0 < len(text) <= 10 or not text.isascii() or not text.isdigit():
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


def _account_lines(path: str, read_file: Callable[[str], bytes | None]) -> list[list[str]]:
    data = read_file(path)
    if data is None:
        return []
    if len(data) > MAX_ACCOUNT_FILE_BYTES:
        raise ImageError(f"the image's {path} is {len(data)} bytes, over the "
                         f"{MAX_ACCOUNT_FILE_BYTES} byte limit; refusing to parse it. Use a "
                         "numeric 'uid:gid' user instead")
    rows = []
    for line in data.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _find_passwd(name: str, uid: int | None,
                 read_file: Callable[[str], bytes | None]) -> tuple[int, int] | None:
    for row in _account_lines("/etc/passwd", read_file):
        if len(row) < 4:
            continue
        row_uid, row_gid = _row_id(row[2]), _row_id(row[3])
        if row_uid is None or row_gid is None:
            continue
        if row_uid == uid if uid is not None else row[0] == name:
            return row_uid, row_gid
    return None


def _find_group(group: str, read_file: Callable[[str], bytes | None]) -> int:
    for row in _account_lines("/etc/group", read_file):
        if len(row) >= 3 and row[0] == group:
            gid = _row_id(row[2])
            if gid is not None:
                return gid
    raise ImageError(f"group {group!r} does not exist in the image (no /etc/group entry); use "
                     "a numeric gid such as '1000:1000' or add the group")
