"""The provisioned Grafana dashboard loads, uses the provisioned datasource and
queries only metrics the server exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.promql_names import series_names

DASHBOARD = Path("deploy/grafana/dashboards/quantserve.json")
DATASOURCES = Path("deploy/grafana/provisioning/datasources/prometheus.yml")
PROVIDERS = Path("deploy/grafana/provisioning/dashboards/quantserve.yml")


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    flat = []
    for panel in dashboard["panels"]:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return [p for p in flat if p["type"] != "row"]


@pytest.fixture(scope="module")
def dashboard(repo: Path) -> dict[str, Any]:
    return json.loads((repo / DASHBOARD).read_text())


def test_dashboard_uses_the_provisioned_datasource(repo: Path, dashboard: dict) -> None:
    provisioned = yaml.safe_load((repo / DATASOURCES).read_text())["datasources"]
    assert len(provisioned) == 1
    source = provisioned[0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == source["uid"]


def test_dashboard_provider_points_at_the_mounted_folder(repo: Path) -> None:
    provider = yaml.safe_load((repo / PROVIDERS).read_text())["providers"][0]
    compose = (repo / "docker-compose.yml").read_text()
    assert f"./{DASHBOARD.parent.as_posix()}:{provider['options']['path']}:ro" in compose


def test_every_query_names_exported_metrics(dashboard: dict, exported_names: set[str]) -> None:
    queried: set[str] = set()
    for panel in _panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = series_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            queried |= names
    for variable in dashboard["templating"]["list"]:
        queried |= series_names(variable["definition"])
    assert queried - exported_names == set()


def test_dashboard_covers_the_issue(dashboard: dict) -> None:
    """TTFT/ITL/e2e quantiles, tokens/s, memory breakdown, jobs and quality are all shown."""
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p["targets"])
    for needed in (
        "histogram_quantile(0.95, sum by (le) (rate(quantserve_time_to_first_token_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(quantserve_inter_token_latency_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(quantserve_e2e_request_latency_seconds_bucket",
        "rate(quantserve_generation_tokens_total",
        "quantserve_memory_breakdown_bytes",
        "quantserve_quantization_jobs_total",
        "quantserve_quality_perplexity_ratio",
    ):
        assert needed in exprs, needed


def test_panels_do_not_overlap(dashboard: dict) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not area & cells, panel["title"]
        cells |= area
