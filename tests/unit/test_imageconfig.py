"""Image config parsing, building, ChainIDs and Docker's run-default semantics."""

from __future__ import annotations

import copy
import hashlib
from typing import Any

import orjson
import pytest

from sandbox.errors import ImageError, ManifestError
from sandbox.images import digests
from sandbox.images import imageconfig as ic
from sandbox.images.imageconfig import ImageConfig, RunDefaults
from sandbox.images.manifest import Platform


def dg(n: int) -> str:
    return digests.of_bytes(str(n).encode())


# Shaped like python:3.12-slim's config as Docker Hub serves it.
PYTHON_CONFIG: dict[str, Any] = {
    "architecture": "amd64",
    "os": "linux",
    "created": "2024-06-01T00:00:00Z",
    "config": {
        "Env": ["PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8", "PYTHON_VERSION=3.12.4", "GPG_KEY=7169605F62C751356D054A26"],
        "Cmd": ["python3"],
        "WorkingDir": "",
        "Labels": None,
        "ArgsEscaped": True,
    },
    "rootfs": {"type": "layers", "diff_ids": [dg(1), dg(2), dg(3)]},
    "history": [{"created": "2024-06-01T00:00:00Z", "created_by": "ADD rootfs.tar.xz /"},
                {"created_by": "ENV LANG=C.UTF-8", "empty_layer": True},
                {"created_by": "RUN apt-get install"}, {"created_by": "RUN make install"}],
    "container_config": {"Cmd": ["/bin/sh"]},
    "docker_version": "20.10.7",
}

APP_CONFIG: dict[str, Any] = {
    "architecture": "arm64", "variant": "v8", "os": "linux",
    "config": {"Entrypoint": ["/entrypoint.sh"], "Cmd": ["serve", "--port", "80"],
               "Env": ["A=1", "B=x=y", "NOEQUALS"], "WorkingDir": "/srv/app",
               "User": "app:staff", "Labels": {"org.opencontainers.image.title": "app"}},
    "rootfs": {"type": "layers", "diff_ids": []},
}


def parse(doc: dict) -> ImageConfig:
    return ic.parse_config(orjson.dumps(doc))


def test_parse_python_like_config() -> None:
    cfg = parse(PYTHON_CONFIG)
    assert (cfg.os, cfg.architecture, cfg.variant) == ("linux", "amd64", None)
    assert cfg.cmd == ("python3",) and cfg.entrypoint == ()
    assert cfg.env[1] == "LANG=C.UTF-8"
    assert (cfg.working_dir, cfg.user) == ("", "")
    assert dict(cfg.labels) == {}
    assert cfg.diff_ids == (dg(1), dg(2), dg(3))
    assert cfg.raw["docker_version"] == "20.10.7"
    assert cfg.platform == Platform("linux", "amd64")


def test_parse_minimal_config_fills_empties() -> None:
    cfg = parse({"architecture": "amd64", "os": "linux",
                 "rootfs": {"type": "layers", "diff_ids": []}})
    assert (cfg.env, cfg.entrypoint, cfg.cmd, cfg.working_dir, cfg.user) == ((), (), (), "", "")
    assert cfg.diff_ids == () and dict(cfg.labels) == {}


def mutate(doc: dict, path: tuple, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


HOSTILE: dict[str, tuple[bytes, str]] = {
    "too big": (b" " * (4 * 1024 * 1024 + 1), "byte limit"),
    "not json": (b"{", "not valid JSON"),
    "array": (b"[1]", "not a JSON object"),
    "no os": (orjson.dumps({k: v for k, v in APP_CONFIG.items() if k != "os"}), "os is None"),
    "empty architecture": (orjson.dumps(mutate(APP_CONFIG, ("architecture",), "")),
                           "non-empty string"),
    "variant not a string": (orjson.dumps(mutate(APP_CONFIG, ("variant",), 8)), "variant"),
    "no rootfs": (orjson.dumps({k: v for k, v in APP_CONFIG.items() if k != "rootfs"}),
                  "type 'layers'"),
    "rootfs type": (orjson.dumps(mutate(APP_CONFIG, ("rootfs", "type"), "squashfs")),
                    "type 'layers'"),
    "diff_ids missing": (orjson.dumps(mutate(APP_CONFIG, ("rootfs",), {"type": "layers"})),
                         "diff_ids is None"),
    "diff_id bad": (orjson.dumps(mutate(APP_CONFIG, ("rootfs", "diff_ids"), ["sha256:x"])),
                    "diff_ids[0]"),
    "diff_id traversal": (orjson.dumps(mutate(APP_CONFIG, ("rootfs", "diff_ids"),
                                              [dg(1), "../../x"])), "diff_ids[1]"),
    "config a list": (orjson.dumps(mutate(APP_CONFIG, ("config",), [])), "not an object"),
    "Cmd a string": (orjson.dumps(mutate(APP_CONFIG, ("config", "Cmd"), "sh -c x")),
                     "Cmd"),
    "Entrypoint of ints": (orjson.dumps(mutate(APP_CONFIG, ("config", "Entrypoint"), [1])),
                           "Entrypoint"),
    "Env a dict": (orjson.dumps(mutate(APP_CONFIG, ("config", "Env"), {"A": "1"})), "Env"),
    "NUL in Cmd": (orjson.dumps(mutate(APP_CONFIG, ("config", "Cmd"), ["a\0b"])), "NUL"),
    "NUL in Env": (orjson.dumps(mutate(APP_CONFIG, ("config", "Env"), ["A=\0"])), "NUL"),
    "NUL in WorkingDir": (orjson.dumps(mutate(APP_CONFIG, ("config", "WorkingDir"), "/\0")),
                          "NUL"),
    "User a number": (orjson.dumps(mutate(APP_CONFIG, ("config", "User"), 0)), "User"),
    "Labels of ints": (orjson.dumps(mutate(APP_CONFIG, ("config", "Labels"), {"a": 1})),
                       "Labels"),
}


@pytest.mark.parametrize(("data", "fragment"), HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_configs_are_refused(data: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        ic.parse_config(data)
    assert fragment in str(info.value)


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = dg(1), dg(2), dg(3)
    ab = "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    abc = "sha256:" + hashlib.sha256(f"{ab} {c}".encode()).hexdigest()
    assert ic.chain_ids([a, b, c]) == [a, ab, abc]
    assert ic.chain_ids([]) == []
    with pytest.raises(ImageError):
        ic.chain_ids(["sha256:nope"])


# --- run defaults -----------------------------------------------------------------------

def test_run_defaults_of_python_image() -> None:
    d = ic.run_defaults(parse(PYTHON_CONFIG))
    assert d.argv == ("python3",)
    assert d.env["LANG"] == "C.UTF-8"
    assert d.env["PATH"].startswith("/usr/local/bin")  # the image's PATH, not the default
    assert (d.cwd, d.user) == ("/", "")


def test_run_defaults_of_app_image() -> None:
    d = ic.run_defaults(parse(APP_CONFIG))
    assert d.argv == ("/entrypoint.sh", "serve", "--port", "80")
    assert d.env == {"A": "1", "B": "x=y", "PATH": ic.DEFAULT_PATH}
    assert (d.cwd, d.user) == ("/srv/app", "app:staff")


@pytest.mark.parametrize(("working_dir", "cwd"), [
    ("", "/"), ("/", "/"), ("/app/", "/app"), ("app", "/app"), ("//x/./y/../z", "/x/z"),
])
def test_run_defaults_cwd(working_dir: str, cwd: str) -> None:
    cfg = parse(mutate(APP_CONFIG, ("config", "WorkingDir"), working_dir))
    assert ic.run_defaults(cfg).cwd == cwd


IMAGE = RunDefaults(argv=("/ep", "default"), env={"PATH": "/bin", "A": "1"}, cwd="/srv",
                    user="", entrypoint=("/ep",), cmd=("default",))
CMD_ONLY = RunDefaults(argv=("python3",), env={}, cwd="/", user="")


@pytest.mark.parametrize(("defaults", "cmd", "entrypoint", "argv"), [
    (IMAGE, None, None, ["/ep", "default"]),
    (IMAGE, [], None, ["/ep", "default"]),               # empty cmd means "not given"
    (IMAGE, ["x", "y"], None, ["/ep", "x", "y"]),         # cmd replaces Cmd only
    (IMAGE, None, ["/other"], ["/other"]),                # entrypoint drops the image's Cmd
    (IMAGE, ["a"], ["/other"], ["/other", "a"]),
    (IMAGE, None, [], ["default"]),                       # --entrypoint "" keeps Cmd
    (IMAGE, ["sh"], [], ["sh"]),
    (CMD_ONLY, None, None, ["python3"]),
    (CMD_ONLY, ["python3", "-c", "1"], None, ["python3", "-c", "1"]),
])
def test_apply_run_argv_like_docker(defaults: RunDefaults, cmd: list | None,
                                    entrypoint: list | None, argv: list[str]) -> None:
    got, _, _ = ic.apply_run(defaults, cmd=cmd, env=None, cwd=None, entrypoint=entrypoint)
    assert got == argv


def test_apply_run_env_and_cwd() -> None:
    _, env, cwd = ic.apply_run(IMAGE, cmd=None, env={"A": "2", "B": "3"}, cwd="/tmp/../work")
    assert env == {"PATH": "/bin", "A": "2", "B": "3"}
    assert cwd == "/work"
    assert IMAGE.env == {"PATH": "/bin", "A": "1"}  # defaults are not mutated
    _, _, cwd = ic.apply_run(IMAGE, cmd=None, env=None, cwd=None)
    assert cwd == "/srv"


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"cmd": None, "entrypoint": None}, "nothing to run"),
    ({"cmd": [], "entrypoint": []}, "nothing to run"),
    ({"cmd": "ls -l"}, "list of strings"),
    ({"cmd": ["a\0"]}, "NUL"),
    ({"entrypoint": [1]}, "list of strings"),
    ({"env": {"A=B": "1"}}, "'A=B'"),
    ({"env": {"": "1"}}, "name"),
    ({"env": {"A": "\0"}}, "NUL"),
    ({"env": {"A": 1}}, "not a string"),
    ({"cwd": "relative"}, "absolute path"),
    ({"cwd": "/a\0"}, "absolute path"),
])
def test_apply_run_refuses_bad_requests(kwargs: dict, fragment: str) -> None:
    empty = RunDefaults(argv=(), env={}, cwd="/", user="")
    args: dict[str, Any] = {"cmd": ["x"], "env": None, "cwd": None, **kwargs}
    with pytest.raises(ImageError) as info:
        ic.apply_run(empty, **args)
    assert fragment in str(info.value)


def test_run_defaults_argv_must_be_entrypoint_plus_cmd() -> None:
    with pytest.raises(ImageError, match="entrypoint \\+ cmd"):
        RunDefaults(argv=("a",), env={}, cwd="/", user="", entrypoint=("b",))


# --- users -------------------------------------------------------------------------------

PASSWD = b"""root:x:0:0:root:/root:/bin/bash
# a comment

daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
broken line
weird:x:\xc2\xb2:5:unicode digit uid:/:/bin/false
huge:x:99999999999999999999:1::/:/bin/false
app:x:1000:1001:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = b"""root:x:0:
staff:x:50:app
app:x:1001:
"""


def files(passwd: bytes | None = PASSWD, group: bytes | None = GROUP):
    reads: list[str] = []

    def read(path: str) -> bytes | None:
        reads.append(path)
        return {"/etc/passwd": passwd, "/etc/group": group}[path]
    return read, reads


@pytest.mark.parametrize(("user", "expected", "reads"), [
    ("", (None, None), []),
    ("0", (0, 0), ["/etc/passwd"]),
    ("1000", (1000, 1001), ["/etc/passwd"]),      # primary group from passwd
    ("4242", (4242, 0), ["/etc/passwd"]),         # unknown uid: gid 0, as runc
    ("1000:1000", (1000, 1000), []),
    ("4242:77", (4242, 77), []),
    ("app", (1000, 1001), ["/etc/passwd"]),
    ("nobody", (65534, 65534), ["/etc/passwd"]),
    ("app:staff", (1000, 50), ["/etc/passwd", "/etc/group"]),
    ("app:7", (1000, 7), ["/etc/passwd"]),
    ("1000:staff", (1000, 50), ["/etc/group"]),
    ("4294967294:4294967294", (4294967294, 4294967294), []),
])
def test_resolve_user(user: str, expected: tuple, reads: list[str]) -> None:
    read, done = files()
    assert ic.resolve_user(user, read) == expected
    assert done == reads


@pytest.mark.parametrize(("user", "passwd", "group", "fragment"), [
    ("ghost", PASSWD, GROUP, "user 'ghost' does not exist in the image"),
    ("app:ghosts", PASSWD, GROUP, "group 'ghosts' does not exist in the image"),
    ("app", None, GROUP, "does not exist"),                # no /etc/passwd at all
    ("1000:staff", PASSWD, None, "does not exist"),
    ("weird", PASSWD, GROUP, "does not exist"),            # non-ASCII digit uid is ignored
    ("huge", PASSWD, GROUP, "does not exist"),             # out-of-range uid is ignored
    ("app", b"x" * (1024 * 1024 + 1), GROUP, "byte limit"),
    ("app:staff", PASSWD, b"#" * (1024 * 1024 + 1), "byte limit"),
    ("4294967295", PASSWD, GROUP, "out of range"),
    ("1:" + "9" * 200, PASSWD, GROUP, "out of range"),
    ("a:b:c", PASSWD, GROUP, "not 'user'"),
    (":1", PASSWD, GROUP, "not 'user'"),
    ("1:", PASSWD, GROUP, "not 'user'"),
    ("a\0", PASSWD, GROUP, "not 'user'"),
    ("../etc", PASSWD, GROUP, "not 'user'"),
])
def test_resolve_user_errors(user: str, passwd: bytes | None, group: bytes | None,
                             fragment: str) -> None:
    read, _ = files(passwd, group)
    with pytest.raises(ImageError) as info:
        ic.resolve_user(user, read)
    assert fragment in str(info.value)


def test_resolve_user_numeric_uid_without_passwd_file() -> None:
    read, _ = files(None, None)
    assert ic.resolve_user("1000", read) == (1000, 0)


# --- building ----------------------------------------------------------------------------

def test_build_config_for_import() -> None:
    data = ic.build_config(diff_ids=[dg(1)], env={"PATH": "/bin"}, cmd=["/bin/sh"],
                           created="2024-01-01T00:00:00Z", history_comment="imported")
    cfg = ic.parse_config(data)
    assert (cfg.os, cfg.architecture) == ("linux", Platform.host().architecture)
    assert cfg.diff_ids == (dg(1),)
    assert cfg.env == ("PATH=/bin",) and cfg.cmd == ("/bin/sh",)
    assert cfg.raw["created"] == "2024-01-01T00:00:00Z"
    assert cfg.raw["history"] == [{"created": "2024-01-01T00:00:00Z", "created_by": "sandboxd",
                                   "comment": "imported"}]
    # deterministic: same inputs, same bytes, hence the same image ID
    assert data == ic.build_config(diff_ids=[dg(1)], env={"PATH": "/bin"}, cmd=["/bin/sh"],
                                   created="2024-01-01T00:00:00Z", history_comment="imported")


def test_build_config_without_created_has_no_timestamp() -> None:
    cfg = ic.parse_config(ic.build_config(diff_ids=[]))
    assert "created" not in cfg.raw and cfg.raw["history"] == []


def test_build_config_on_a_base_for_commit() -> None:
    base = parse(PYTHON_CONFIG)
    data = ic.build_config(diff_ids=[*base.diff_ids, dg(9)], base=base,
                           env={"LANG": "en_US.UTF-8", "NEW": "1"}, working_dir="/work/",
                           user="1000:1000")
    cfg = ic.parse_config(data)
    assert cfg.diff_ids == (*base.diff_ids, dg(9))
    assert cfg.env[0] == PYTHON_CONFIG["config"]["Env"][0]
    assert "LANG=en_US.UTF-8" in cfg.env and "NEW=1" in cfg.env and "LANG=C.UTF-8" not in cfg.env
    assert (cfg.cmd, cfg.working_dir, cfg.user) == (("python3",), "/work", "1000:1000")
    assert len(cfg.raw["history"]) == len(PYTHON_CONFIG["history"]) + 1
    assert "created" not in cfg.raw  # the base's timestamp would be a lie
    # Docker-only leftovers are not carried over
    assert "container_config" not in cfg.raw and "docker_version" not in cfg.raw
    assert cfg.raw["config"]["ArgsEscaped"] is True


def test_build_config_entrypoint_clears_inherited_cmd() -> None:
    base = parse(PYTHON_CONFIG)
    cfg = ic.parse_config(ic.build_config(diff_ids=base.diff_ids, base=base,
                                          entrypoint=["/init"]))
    assert (cfg.entrypoint, cfg.cmd) == (("/init",), ())
    cfg = ic.parse_config(ic.build_config(diff_ids=base.diff_ids, base=base,
                                          entrypoint=["/init"], cmd=["run"]))
    assert (cfg.entrypoint, cfg.cmd) == (("/init",), ("run",))


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"diff_ids": ["sha256:short"]}, "not a digest"),
    ({"diff_ids": [dg(5)], "base": "python"}, "start with the base"),
    ({"diff_ids": [], "env": {"A=B": "x"}}, "'A=B'"),
    ({"diff_ids": [], "cmd": "sh"}, "list of strings"),
    ({"diff_ids": [], "working_dir": "rel"}, "absolute path"),
    ({"diff_ids": [], "user": "a:b:c"}, "not 'user'"),
])
def test_build_config_refuses_bad_input(kwargs: dict, fragment: str) -> None:
    if kwargs.get("base") == "python":
        kwargs = {**kwargs, "base": parse(PYTHON_CONFIG)}
    with pytest.raises(ImageError) as info:
        ic.build_config(**kwargs)
    assert fragment in str(info.value)
