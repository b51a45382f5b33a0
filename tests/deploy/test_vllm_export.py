"""deploy/vllm: the export Job writes where vLLM reads, in the quantserve namespace,
with our cache and data volumes; and the Ollama Modelfile names the exported file."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser

VLLM = Path("deploy/vllm")


@pytest.fixture(scope="module")
def docs(repo: Path) -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((repo / VLLM / "kustomization.yaml").read_text())
    found = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((repo / VLLM / name).read_text()):
            found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in (repo / VLLM).glob("*.yaml")} - {"kustomization.yaml"}
    return found


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    return container


def test_vllm_serves_what_the_job_exports(docs: dict[str, dict[str, Any]]) -> None:
    job = _container(docs["Job/quantserve-export-gptq"])
    args = build_parser().parse_args([*job["command"][1:], *job["args"]])
    assert args.fmt == "compressed-tensors"
    vllm = _container(docs["Deployment/vllm"])
    model = next(a.split("=", 1)[1] for a in vllm["args"] if a.startswith("--model="))
    assert model == str(args.output)
    # No quantisation flag: vLLM reads the scheme from the checkpoint.
    assert not any(a.startswith("--quantization") for a in vllm["args"])
    claims = {
        name: {v["name"]: v["persistentVolumeClaim"]["claimName"]
               for v in doc["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
        for name, doc in docs.items() if doc["kind"] in ("Job", "Deployment")
    }
    assert claims["Job/quantserve-export-gptq"]["exports"] == "quantserve-exports"
    assert claims["Job/quantserve-export-gptq"]["artifacts"] == "quantserve-artifacts"
    assert claims["Deployment/vllm"]["exports"] == "quantserve-exports"
    assert {doc["metadata"]["namespace"] for doc in docs.values()} == {"quantserve"}
    assert docs["Service/vllm"]["spec"]["selector"] == {"app.kubernetes.io/name": "vllm"}


def test_ollama_modelfile_uses_the_documented_export(repo: Path) -> None:
    modelfile = (repo / "deploy/ollama/Modelfile").read_text()
    source = next(line.split(" ", 1)[1] for line in modelfile.splitlines()
                  if line.startswith("FROM "))
    lines = [line.removeprefix("#").strip() for line in modelfile.splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith("quantserve export"))
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\"))
        if not line.endswith("\\"):
            break
    args = build_parser().parse_args(shlex.split(" ".join(command))[1:])
    assert args.fmt == "gguf"
    assert args.output.name == Path(source).name
