"""An image's tree read from its unpacked layers as its containers see it (what a COPY looks
at before it writes): overlay's rules, and symlinks that resolve inside the image, never on
the host."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandbox.errors import ImageError
from sandbox.images.store.merged import MergedTree
from sandbox.images.store.unpack import Ownership


def layers(tmp_path: Path, n: int) -> list[Path]:
    out = []
    for i in range(n):
        (tmp_path / f"l{i}").mkdir()
        out.append(tmp_path / f"l{i}")
    return out


def tree(ls: list[Path]) -> MergedTree:
    return MergedTree(ls, Ownership("squash"))


def whiteout(path: Path) -> None:
    os.mknod(path, 0o600 | 0o020000, os.makedev(0, 0))


def test_the_topmost_layer_wins_and_a_whiteout_hides(tmp_path: Path) -> None:
    low, high = layers(tmp_path, 2)
    (low / "etc").mkdir()
    (low / "etc/passwd").write_text("low")
    (low / "etc/group").write_text("low")
    (high / "etc").mkdir()
    (high / "etc/passwd").write_text("higher")
    whiteout(high / "etc/group")
    t = tree([low, high])
    found = t.lookup("/etc/passwd")
    assert found is not None and found.layer == 1 and found.size == 6
    assert t.lookup("/etc/group") is None
    assert t.select("/etc", where="Dockerfile:2")[0].files[1].path == "passwd"


def test_an_opaque_directory_hides_the_lower_one(tmp_path: Path) -> None:
    low, high = layers(tmp_path, 2)
    (low / "d").mkdir()
    (low / "d/old").write_text("old")
    (high / "d").mkdir()
    (high / "d/new").write_text("new")
    os.setxattr(high / "d", "user.overlay.opaque", b"y")
    t = tree([low, high])
    assert t.lookup("/d/old") is None
    assert [f.path for f in t.select("/d", where="x")[0].files] == ["", "new"]


def test_symlinks_resolve_inside_the_image_never_on_the_host(tmp_path: Path) -> None:
    (layer,) = layers(tmp_path, 1)
    secret = tmp_path / "host-secret"
    secret.write_text("the host's")
    (layer / "etc").mkdir()
    (layer / "etc/secret").write_text("the image's")
    # Absolute and climbing targets: inside the image they stop at its root.
    (layer / "abs").symlink_to(str(tmp_path))
    (layer / "up").symlink_to("../../../../../../../../" + str(tmp_path)[1:])
    (layer / "app").symlink_to("/etc")
    t = tree([layer])
    assert t.lookup("/abs/host-secret") is None
    assert t.lookup("/up/host-secret") is None
    found = t.lookup("/app/secret")
    assert found is not None and found.path == "/etc/secret"
    with t.select("/app/secret", where="x")[0].files[0].open() as f:  # type: ignore[misc]
        assert f.read() == b"the image's"
    kept = t.lookup("/app", follow=False)
    assert kept is not None and (kept.kind, kept.linkname) == ("symlink", "/etc")


def test_a_symlink_loop_is_an_error_and_a_file_is_no_directory(tmp_path: Path) -> None:
    (layer,) = layers(tmp_path, 1)
    (layer / "a").symlink_to("b")
    (layer / "b").symlink_to("a")
    (layer / "f").write_text("x")
    t = tree([layer])
    with pytest.raises(ImageError, match="symbolic links"):
        t.lookup("/a")
    assert t.lookup("/f/below") is None
    with pytest.raises(ImageError, match="Dockerfile:4"):
        t.select("/missing", where="Dockerfile:4")


def test_wildcards_select_every_match_sorted(tmp_path: Path) -> None:
    (layer,) = layers(tmp_path, 1)
    (layer / "out").mkdir()
    for name in ("b.txt", "a.txt", "c.log"):
        (layer / "out" / name).write_text(name)
    got = tree([layer]).select("/out/*.txt", where="x")
    assert [s.name for s in got] == ["a.txt", "b.txt"]
