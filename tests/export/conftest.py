"""Artifacts of a tiny random Llama (byte-level tokenizer), built like the server builds them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from quantizers import quantize
from quantizers.artifacts import Artifact, ArtifactStore, artifact_key
from quantizers.calibration import calibration_batches
from quantizers.loading import load_model
from quantizers.serialization import PLAN_FORMAT, quantized_state
from server.variant_pipeline import tokenizer_files
from tests.helpers.tiny_model_dir import write_tiny_model

MakeArtifact = Callable[..., Artifact]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-export") / "tiny-llama")


@pytest.fixture(scope="session")
def make_artifact(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> MakeArtifact:
    """make_artifact(method, config) -> a stored artifact of the tiny model (cached)."""
    store = ArtifactStore(tmp_path_factory.mktemp("export-store"))
    base = load_model(tiny_model_dir, dtype="float32")
    built: dict[str, Artifact] = {}

    def make(method: str, config: dict[str, Any] | None = None,
             calibrate: bool = False) -> Artifact:
        config = dict(config or {})
        key = artifact_key("tiny", method, config, {"calibrate": calibrate}, PLAN_FORMAT)
        if key in built:
            return built[key]
        model = _copy(base.model)
        batches = None
        if calibrate:
            from quantizers.calibration import CalibrationConfig

            batches = calibration_batches(
                base.tokenizer, CalibrationConfig(samples=4, seq_len=32))
        quantize(model, method, config, calibration=batches)
        tensors, plan = quantized_state(model)
        content = {"method": method, "config": config, "plan": plan,
                   "hf_config": model.config.to_dict(),
                   "base_model": {"model_id": "tiny-llama", "source": str(tiny_model_dir)}}
        built[key] = store.put(key, tensors, content,
                               extra_files=tokenizer_files(base.tokenizer))
        return built[key]

    return make


def _copy(model: nn.Module) -> nn.Module:
    import copy

    with torch.no_grad():
        return copy.deepcopy(model)
