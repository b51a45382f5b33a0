"""Export cached artifacts to the formats other engines load, and import them back.

`export_artifact` writes a GGUF file (llama.cpp, Ollama) or a compressed-tensors
directory (vLLM, SGLang, transformers) from a verified artifact, reusing its
integer codes and scales rather than re-quantising float weights.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch

from quantizers.artifacts import Artifact
from quantizers.artifacts.writing import is_shard
from quantizers.export.compressed_tensors_dir import write_compressed_tensors
from quantizers.export.gguf_file import FloatType, copy_gguf_tokenizer, hf_tokenizer, write_gguf
from quantizers.export.weights import ExportError, load_artifact_model

ExportFormat = Literal["gguf", "compressed-tensors"]
FORMATS: tuple[str, ...] = ("gguf", "compressed-tensors")
_CT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["FORMATS", "ExportError", "ExportFormat", "export_artifact", "export_file_name"]


def export_file_name(artifact: Artifact, fmt: str) -> str:
    """A descriptive default name: `<model>-<method>-<key prefix>` plus the extension."""
    manifest = artifact.manifest
    model = (manifest.get("base_model") or {}).get("model_id", "model")
    stem = f"{model}-{manifest.get('method', 'quantized')}-{artifact.key[:12]}"
    return f"{stem}.gguf" if fmt == "gguf" else stem


def export_artifact(
    artifact: Artifact,
    fmt: str,
    output: Path,
    *,
    float_type: FloatType = "bf16",
    on_phase: Callable[[str], None] = lambda phase: None,
) -> dict[str, Any]:
    """Write `artifact` to `output` in format `fmt`; returns the export report.

    Written beside `output` and renamed into place, so `output` is either
    complete or absent. Raises ExportError for a format, architecture or
    layer the target cannot express, and FileExistsError if `output` exists.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}",
                          "format")
    if output.exists():
        raise FileExistsError(f"{output} already exists")
    output.parent.mkdir(parents=True, exist_ok=True)
    partial_path = output.with_name(f".{output.name}.partial")
    _remove(partial_path)
    on_phase("load_artifact")
    model = load_artifact_model(artifact)
    hf_config = dict(artifact.manifest["hf_config"])
    on_phase("write")
    try:
        if fmt == "gguf":
            report = write_gguf(
                model, hf_config, partial_path, _gguf_tokenizer(artifact, hf_config),
                name=(artifact.manifest.get("base_model") or {}).get("model_id", "model"),
                float_type=float_type,
                extra={"artifact_key": artifact.key,
                       "method": str(artifact.manifest.get("method"))},
            ).to_dict()
        else:
            report = write_compressed_tensors(
                model, hf_config, partial_path, _tokenizer_files(artifact),
                float_dtype=_CT_DTYPES[float_type],
            ).to_dict()
        partial_path.rename(output)
    finally:
        _remove(partial_path)
    report["path"] = str(output)
    report["format"] = fmt
    return report


def _gguf_tokenizer(artifact: Artifact, hf_config: dict[str, Any]) -> Callable[[Any], None]:
    """The base GGUF's own tokenizer fields when the artifact came from a GGUF
    file still on disk; otherwise the tokenizer files stored in the artifact."""
    source = Path(str((artifact.manifest.get("base_model") or {}).get("source", "")))
    if source.suffix.lower() == ".gguf" and source.is_file():
        return partial(copy_gguf_tokenizer, source=source)
    if not artifact.has_file("tokenizer.json"):
        raise ExportError("the artifact holds no tokenizer and its base GGUF is not on disk")
    return partial(hf_tokenizer, directory=artifact.path,
                   vocab_size=int(hf_config["vocab_size"]))


def _tokenizer_files(artifact: Artifact) -> dict[str, Path]:
    return {name: artifact.path / name for name in artifact.manifest["files"]
            if not is_shard(name)}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
