"""deploy/kubernetes: the kustomization renders (kubectl kustomize), every object it makes
is valid against the Kubernetes API's schemas (kubernetes-validate's strict JSON schemas,
generated from the API's OpenAPI definitions), and the parts agree with each other and with
the service: the TOML it mounts loads, the drain fits the grace period, the metrics the
autoscaler reads exist, the seccomp profile is the one deploy/seccomp_profile.py derives."""

from __future__ import annotations

import base64
import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service import app
from service.config import ConfigError, from_dict

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
# The oldest Kubernetes whose API has every field the pods use (hostUsers, procMount and
# appArmorProfile on by default, the preStop sleep action), and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
TOKEN = "a-token-of-the-operator-0123456789"


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, ("kubectl (with its kustomize) renders deploy/kubernetes; this machine "
                     "image ships it (package kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(BASE)], check=True, capture_output=True,
                         text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def base_name(o: dict[str, Any]) -> str:
    """The name as written: kustomize adds a hash of their content to generated ones."""
    return re.sub(r"-[a-z0-9]{10}$", "", o["metadata"]["name"]) if o["kind"] in (
        "ConfigMap", "Secret") else o["metadata"]["name"]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and base_name(o) == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} rendered"
    return found[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objects, "StatefulSet", "sandboxd")["spec"]["template"]["spec"]


def container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return pod_spec(objects)["containers"][0]


def config_text(objects: list[dict[str, Any]]) -> str:
    return one(objects, "ConfigMap", "sandboxd-config")["data"]["sandboxd.toml"]


def test_the_base_renders_every_part(objects: list[dict[str, Any]]) -> None:
    kinds = sorted((o["kind"], base_name(o)) for o in objects)
    assert kinds == [
        ("ConfigMap", "registry-cache-config"), ("ConfigMap", "sandboxd-config"),
        ("Deployment", "sandboxd-registry-cache"),
        ("HorizontalPodAutoscaler", "sandboxd"), ("PodDisruptionBudget", "sandboxd"),
        ("Secret", "sandboxd-tokens"),
        ("Service", "sandboxd"), ("Service", "sandboxd-nodes"),
        ("Service", "sandboxd-registry-cache"), ("StatefulSet", "sandboxd")]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(
        objects: list[dict[str, Any]], version: str) -> None:
    for o in objects:
        kubernetes_validate.validate(o, version, strict=True)


@pytest.mark.parametrize(("where", "value", "complaint"), [
    (("spec", "template", "spec", "containers", 0, "securityContext", "procMountType"),
     "Unmasked", "'procMountType' was unexpected"),
    (("spec", "template", "spec", "containers", 0, "lifecycle", "preStop", "sleep", "secs"),
     5, "'secs' was unexpected"),
    (("spec", "replicas"), "two", "'two' is not of type 'integer'"),
    (("spec", "template", "spec", "hostUsers"), "false", "'false' is not of type 'boolean'"),
])
def test_the_validation_refuses_unknown_fields_and_wrong_types(
        objects: list[dict[str, Any]], where: tuple[str | int, ...], value: object,
        complaint: str) -> None:
    broken = copy.deepcopy(one(objects, "StatefulSet", "sandboxd"))
    node: Any = broken
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError) as e:
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)
    assert complaint in e.value.message


def test_the_pod_is_rootless_and_unprivileged(objects: list[dict[str, Any]]) -> None:
    spec, c = pod_spec(objects), container(objects)
    assert spec["hostUsers"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"] == {
        "type": "Localhost", "localhostProfile": "profiles/sandboxd.json"}
    assert spec["securityContext"]["appArmorProfile"] == {
        "type": "Localhost", "localhostProfile": "sandboxd"}
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["procMount"] == "Unmasked"
    assert spec["automountServiceAccountToken"] is False
    aa = (BASE / "apparmor" / "sandboxd").read_text()
    assert re.search(r"^profile sandboxd\b", aa, re.M), "the profile's name is the pod's"


def test_the_mounted_config_loads_and_matches_the_pod(objects: list[dict[str, Any]]) -> None:
    c = container(objects)
    config = from_dict(tomllib.loads(config_text(objects)),
                       {"SANDBOXD_TOKENS": TOKEN, "SANDBOXD_NODE": "sandboxd-0"})
    config.check_bind()
    assert c["args"] == ["serve", "--config", "/etc/sandboxd/sandboxd.toml"]
    assert any(m["mountPath"] == "/etc/sandboxd" for m in c["volumeMounts"])
    assert config.port == c["ports"][0]["containerPort"]
    # The state directory is the service's own (0700), below the volume's root.
    state_mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "state")
    assert config.state_dir.parent == Path(state_mount)
    # Nodes reach each other by the headless service's per-pod names.
    headless = one(objects, "Service", "sandboxd-nodes")
    statefulset = one(objects, "StatefulSet", "sandboxd")
    assert headless["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "sandboxd-nodes"
    assert config.cluster.url_of("sandboxd-1") == "http://sandboxd-1.sandboxd-nodes:8643"
    env = {e["name"]: e["valueFrom"] for e in c["env"]}
    assert env["SANDBOXD_NODE"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["SANDBOXD_TOKENS"]["secretKeyRef"]["name"].startswith("sandboxd-tokens")
    # Every pod pulls Docker Hub's images through the cache.
    cache = one(objects, "Service", "sandboxd-registry-cache")
    mirror = f"http://{cache['metadata']['name']}:{cache['spec']['ports'][0]['port']}"
    assert mirror in config.registries["docker.io"]["mirrors"]


def test_the_placeholder_token_is_refused_at_start(objects: list[dict[str, Any]]) -> None:
    secret = one(objects, "Secret", "sandboxd-tokens")
    placeholder = base64.b64decode(secret["data"]["SANDBOXD_TOKENS"]).decode()
    with pytest.raises(ConfigError, match="at least 16 characters"):
        from_dict(tomllib.loads(config_text(objects)), {"SANDBOXD_TOKENS": placeholder})


def test_runs_under_way_may_finish_before_the_pod_is_killed(
        objects: list[dict[str, Any]]) -> None:
    spec, c = pod_spec(objects), container(objects)
    deadline = tomllib.loads(config_text(objects))["server"]["shutdown_deadline_s"]
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop + deadline + app.SHUTDOWN_GRACE_S < spec["terminationGracePeriodSeconds"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_autoscaler_reads_metrics_the_service_exports(
        objects: list[dict[str, Any]]) -> None:
    hpa = one(objects, "HorizontalPodAutoscaler", "sandboxd")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "sandboxd"
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    exported = set(re.findall(r'Gauge\("(sandboxd_\w+)"', (ROOT / "service" / "app.py")
                              .read_text()))
    assert names and names <= exported


def test_the_seccomp_profile_is_the_derived_one() -> None:
    printed = subprocess.run([sys.executable, str(ROOT / "deploy" / "seccomp_profile.py")],
                             check=True, capture_output=True, text=True).stdout
    shipped = (BASE / "seccomp" / "sandboxd.json").read_text()
    assert json.loads(printed) == json.loads(shipped), (
        "deploy/kubernetes/seccomp/sandboxd.json is stale: run "
        "`python deploy/seccomp_profile.py > deploy/kubernetes/seccomp/sandboxd.json`")



def test_services_budgets_and_probes_reach_the_pods(objects: list[dict[str, Any]]) -> None:
    """A selector or port name that matches nothing is valid YAML and a dead service."""
    workloads = [o for o in objects if o["kind"] in ("StatefulSet", "Deployment")]
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            ports = {p["name"] for p in c["ports"]}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe in c:
                    assert c[probe]["httpGet"]["port"] in ports, (base_name(w), probe)
    for o in objects:
        if o["kind"] not in ("Service", "PodDisruptionBudget"):
            continue
        selector = o["spec"]["selector"].get("matchLabels", o["spec"]["selector"])
        chosen = [w for w in workloads
                  if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(chosen) == 1, base_name(o)
        named = {p["name"] for c in chosen[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        for port in o["spec"].get("ports", ()):
            assert port["targetPort"] in named, (base_name(o), port)
