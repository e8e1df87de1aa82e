"""The demo's Python image, made from Debian's packages, runs untrusted Python in a
container under the default policy."""

from __future__ import annotations

from pathlib import Path

from sandbox.images import ImageService
from sandbox.tenants import LOCAL
from testbed.demoimages import python_rootfs, write_tar
from tests.conftest import Session
from tests.integration.test_images import make_service


def test_python_image_from_debian_packages_runs_python(session: Session,
                                                       tmp_path: Path) -> None:
    root = python_rootfs(tmp_path / "rootfs")
    tar = write_tar(root, tmp_path / "python.tar.gz")
    svc: ImageService = make_service(tmp_path / "state")
    try:
        image = session.run(svc.import_tar(tar, "demo/python:3.11", tenant=LOCAL,
                                           cmd=["python3"], env={"PATH": "/usr/bin:/bin"}))
    finally:
        session.run(svc.close())
    c = session.container(list(image.layers))
    code = "import json, sqlite3, hashlib; print(json.dumps(sum(range(10))))"
    res = session.exec(c, ["python3", "-c", code], env=dict(image.defaults.env))
    assert res.stdout == b"45\n", (res.status, res.stderr[-2000:])
