"""The pull-through cache's configuration (deploy/kubernetes/registry-cache/config.yml) as
Debian's docker-registry reads it: started with only its address, store and upstream
moved to this test's own (a loopback registry stands for Docker Hub), it serves the
upstream's images: manifests and blobs fetched through it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from testbed.ports import free_port
from testbed.registry import LocalRegistry
from tests.support.images import PushedImages

CONFIG = (Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "registry-cache"
          / "config.yml")


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return int(answer.status)
    except OSError:
        return 0


def test_the_shipped_cache_config_serves_the_upstream(registry: LocalRegistry,
                                                      images: PushedImages,
                                                      tmp_path: Path) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["proxy"]["remoteurl"] == "https://registry-1.docker.io"
    port = free_port()
    config["http"]["addr"] = f"127.0.0.1:{port}"
    config["storage"]["filesystem"]["rootdirectory"] = str(tmp_path / "store")
    config["proxy"]["remoteurl"] = registry.url
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "log").open("wb")
    cache = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "config.yml")],
                             stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        # Its start is a few ms; a loaded machine may take seconds.
        for _ in range(100):
            if status_of(f"http://127.0.0.1:{port}/v2/") or cache.poll() is not None:
                break
            time.sleep(0.1)
        assert status_of(f"http://127.0.0.1:{port}/v2/") == 200, \
            (tmp_path / "log").read_text()[-2000:]
        # The liveness probe's path.
        assert status_of(f"http://127.0.0.1:{port}/") == 200
        through = images.v2s2.replace(images.host, f"127.0.0.1:{port}")
        seen = json.loads(subprocess.run(
            ["skopeo", "inspect", "--tls-verify=false", f"docker://{through}"],
            check=True, capture_output=True, text=True).stdout)
        assert seen["Digest"] == images.digests["v2s2"]
        repo = through.split("/", 1)[1].rsplit(":", 1)[0]
        layer = images.layers["v2s2"][0]
        assert status_of(f"http://127.0.0.1:{port}/v2/{repo}/blobs/{layer}") == 200
        assert registry.blob_gets(layer) >= 1
    finally:
        cache.terminate()
        cache.wait(timeout=10)
        log.close()
