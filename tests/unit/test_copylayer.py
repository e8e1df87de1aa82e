"""The layer a COPY or ADD makes: where sources land (Docker's rules), what the directories on
the way keep, owners and modes, and ADD's archives kept inside their destination."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from sandbox.errors import ImageError
from sandbox.images.buildfiles import Selected, SourceFile
from sandbox.images.copylayer import CopyTarget, copy_tar
from sandbox.images.store.merged import MergedTree
from sandbox.images.store.unpack import Ownership


def image(tmp_path: Path) -> MergedTree:
    """A one-layer image: /tmp (1777), /etc/ (0755), /etc/hosts, /srv -> /etc."""
    root = tmp_path / "layer"
    (root / "tmp").mkdir(parents=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc").mkdir()
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "srv").symlink_to("/etc")
    return MergedTree([root], Ownership("squash"))


def file(name: str, data: bytes, mode: int = 0o644) -> Selected:
    return Selected(name, "file", (SourceFile("", "file", mode, len(data), 1_700_000_000,
                                              open=lambda: io.BytesIO(data)),))


def directory(name: str, entries: dict[str, bytes]) -> Selected:
    files = [SourceFile("", "dir", 0o750, mtime=1), SourceFile("sub", "dir", 0o2700, mtime=1,
                                                               uid=7, gid=8)]
    for path, data in entries.items():
        files.append(SourceFile(path, "file", 0o600, len(data), 1,
                                open=lambda d=data: io.BytesIO(d)))  # type: ignore[misc]
    return Selected(name, "dir", tuple(files))


def layer(selected: list[Selected], target: CopyTarget, tree: MergedTree,
          archives: list[bool] | None = None) -> dict[str, tarfile.TarInfo]:
    data = b"".join(copy_tar(selected, target, tree, archives=archives or []))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {ti.name: ti for ti in tar.getmembers()}


def test_a_file_lands_in_a_directory_or_at_the_path(tmp_path: Path) -> None:
    t = image(tmp_path)
    got = layer([file("app.sh", b"#!/bin/sh\n")], CopyTarget("/app/"), t)
    assert set(got) == {"app", "app/app.sh"}
    assert got["app"].mode == 0o755 and got["app/app.sh"].mode == 0o644
    got = layer([file("app.sh", b"x")], CopyTarget("/bin/run"), t)
    assert set(got) == {"bin", "bin/run"}
    got = layer([file("app.sh", b"x")], CopyTarget("/etc"), t)  # an existing directory
    assert "etc/app.sh" in got


def test_existing_directories_keep_their_mode(tmp_path: Path) -> None:
    got = layer([file("x", b"x")], CopyTarget("/tmp/"), image(tmp_path))
    assert got["tmp"].mode == 0o1777  # an upper /tmp of 0755 would hide the image's 1777


def test_the_destination_follows_the_images_own_links(tmp_path: Path) -> None:
    got = layer([file("x", b"x")], CopyTarget("/srv/"), image(tmp_path))
    assert "etc/x" in got and "srv" not in got


def test_a_directory_source_copies_its_contents_owned_as_asked(tmp_path: Path) -> None:
    src = directory("conf", {"a": b"1", "sub/b": b"2"})
    t = image(tmp_path)
    got = layer([src], CopyTarget("/opt/conf", chown=(1000, 1001), chmod=0o640), t)
    assert {"opt", "opt/conf", "opt/conf/a", "opt/conf/sub/b"} <= set(got)
    assert (got["opt/conf/a"].uid, got["opt/conf/a"].gid, got["opt/conf/a"].mode) == (
        1000, 1001, 0o640)
    assert (got["opt/conf/sub"].uid, got["opt/conf/sub"].mode) == (1000, 0o640)
    # Without --chown/--chmod, a directory within keeps its own owner and mode.
    got = layer([src], CopyTarget("/opt/conf"), t)
    sub = got["opt/conf/sub"]
    assert (sub.uid, sub.gid, sub.mode) == (7, 8, 0o2700)
    assert got["opt/conf"].mode == 0o755  # made anew, as Docker makes a destination
    got = layer([src], CopyTarget("/tmp/"), t)
    assert got["tmp"].mode == 0o1777      # the image's own destination stays as it is


def test_several_sources_need_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"Dockerfile:3.*ends in '/'"):
        layer([file("a", b"a"), file("b", b"b")], CopyTarget("/x", where="Dockerfile:3"),
              image(tmp_path))


def test_copying_below_a_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a directory"):
        layer([file("a", b"a")], CopyTarget("/etc/hosts/a"), image(tmp_path))


def archive(*members: tuple[str, bytes, bytes]) -> Selected:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, kind, link in members:
            ti = tarfile.TarInfo(name)
            ti.type = kind
            ti.linkname = link.decode()
            tar.addfile(ti, io.BytesIO(b""))
    return file("a.tar.gz", buf.getvalue())


def test_add_unpacks_an_archive_inside_its_destination(tmp_path: Path) -> None:
    src = archive(("/abs/file", tarfile.REGTYPE, b""), ("./rel", tarfile.REGTYPE, b""),
                  ("hard", tarfile.LNKTYPE, b"rel"), ("dev", tarfile.CHRTYPE, b""))
    got = layer([src], CopyTarget("/opt/", keyword="ADD"), image(tmp_path), [True])
    assert {"opt/abs/file", "opt/rel", "opt/hard"} <= set(got)
    assert got["opt/hard"].linkname == "opt/rel" and "opt/dev" not in got


@pytest.mark.parametrize("members", [
    (("../../escape", tarfile.REGTYPE, b""),),
    (("a/../../escape", tarfile.REGTYPE, b""),),
    (("hard", tarfile.LNKTYPE, b"/etc/passwd"),),
    (("hard", tarfile.LNKTYPE, b"later"), ("later", tarfile.REGTYPE, b"")),
])
def test_add_refuses_an_archive_that_leaves_its_destination(
        tmp_path: Path, members: tuple[tuple[str, bytes, bytes], ...]) -> None:
    with pytest.raises(ImageError, match="Dockerfile:9: ADD"):
        layer([archive(*members)], CopyTarget("/opt/", where="Dockerfile:9", keyword="ADD"),
              image(tmp_path), [True])
