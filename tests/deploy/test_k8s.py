"""The Kubernetes manifests fit together: probes, GPU, shared cache, HPA metric, scraping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path("deploy/k8s")


@pytest.fixture(scope="module")
def resources(repo: Path) -> dict[str, dict[str, Any]]:
    """Kind -> the resource of that kind; PersistentVolumeClaims by name."""
    kustomization = yaml.safe_load((repo / K8S / "kustomization.yaml").read_text())
    by_kind: dict[str, Any] = {"PersistentVolumeClaim": {}}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((repo / K8S / name).read_text()):
            if doc["kind"] == "PersistentVolumeClaim":
                by_kind["PersistentVolumeClaim"][doc["metadata"]["name"]] = doc
            else:
                by_kind[doc["kind"]] = doc
    return by_kind


def test_kustomization_lists_every_manifest(repo: Path) -> None:
    listed = set(yaml.safe_load((repo / K8S / "kustomization.yaml").read_text())["resources"])
    on_disk = {p.name for p in (repo / K8S).glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


def test_probes_gpu_and_non_root(resources: dict) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001


def _claim_mounts(resources: dict) -> dict[str, dict[str, Any]]:
    """Claim name -> its volumeMount in the quantserve container."""
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    return {v["persistentVolumeClaim"]["claimName"]: mounts[v["name"]]
            for v in pod["volumes"] if "persistentVolumeClaim" in v}


def test_replicas_share_the_artifact_cache(resources: dict) -> None:
    claims = resources["PersistentVolumeClaim"]
    mounts = _claim_mounts(resources)
    assert set(mounts) == set(claims)
    cache = mounts["quantserve-artifacts"]
    assert claims["quantserve-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert cache["mountPath"] == resources["ConfigMap"]["data"]["QUANTSERVE_CACHE_DIR"]
    assert not cache.get("readOnly", False)
    assert mounts["quantserve-data"] == {"name": "data", "mountPath": "/data", "readOnly": True}


def test_drain_fits_in_the_termination_grace_period(resources: dict) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    drain_s = float(resources["ConfigMap"]["data"]["QUANTSERVE_DRAIN_TIMEOUT_S"])
    pre_stop_s = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > drain_s + pre_stop_s


def test_hpa_metric_is_exported_and_adapted(
    repo: Path, resources: dict, exported_names: set[str]
) -> None:
    (metric,) = resources["HorizontalPodAutoscaler"]["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert name in exported_names
    adapter = yaml.safe_load((repo / K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert name in {rule["name"]["as"] for rule in adapter["rules"]["custom"]}


def test_service_monitor_selects_the_service_port(resources: dict) -> None:
    service, monitor = resources["Service"], resources["ServiceMonitor"]
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= (
        resources["Deployment"]["spec"]["template"]["metadata"]["labels"].items())
