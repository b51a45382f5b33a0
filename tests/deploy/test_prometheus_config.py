"""promtool accepts the Prometheus config, the rules and a real scrape."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.promql_names import series_names

CONFIG = Path("deploy/prometheus/prometheus.yml")
RULES = Path("deploy/prometheus/rules/quantserve.yml")


def _promtool(promtool: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_promtool_checks_config_and_rules(repo: Path, promtool: str) -> None:
    result = _promtool(promtool, "check", "config", str(repo / CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_promtool_accepts_a_scrape(metrics_text: str, promtool: str) -> None:
    result = _promtool(promtool, "check", "metrics", stdin=metrics_text)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_target_is_the_compose_service(repo: Path) -> None:
    config = yaml.safe_load((repo / CONFIG).read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["quantserve:8000"]


def test_rules_use_exported_metrics(repo: Path, exported_names: set[str]) -> None:
    groups = yaml.safe_load((repo / RULES).read_text())["groups"]
    used = {name for group in groups for rule in group["rules"]
            for name in series_names(rule["expr"])}
    assert used and used - exported_names == set()
