"""Calibration data named in a quantisation request, and its part of the cache key.

The key covers the bytes of the calibration text, not only its name, so an
edited file can never serve an artifact calibrated on the old text.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from quantizers.artifacts import calibration_identity
from quantizers.errors import ConfigError

DATASET_FILES = {
    "tinyshakespeare": "calibration/tinyshakespeare.txt",
    "alice": "calibration/carroll-alice.txt",
}


@dataclass(frozen=True)
class CalibrationRequest:
    dataset: str = "tinyshakespeare"
    samples: int = 64
    seq_len: int = 256


def data_dir() -> Path:
    override = os.environ.get("QUANTSERVE_DATA_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "shared" / "data"


def dataset_file(dataset: str) -> Path:
    if dataset not in DATASET_FILES:
        raise ConfigError(f"unknown calibration dataset {dataset!r}; use one of "
                          f"{sorted(DATASET_FILES)}", "calibration.dataset")
    path = data_dir() / DATASET_FILES[dataset]
    if not path.is_file():
        raise ConfigError(f"calibration file missing: {path}", "calibration.dataset")
    return path


def calibration_key_part(request: CalibrationRequest) -> dict[str, Any]:
    return calibration_identity(asdict(request), dataset_file(request.dataset))


def load_batches(request: CalibrationRequest | None, tokenizer: Any) -> list[Tensor] | None:
    if request is None:
        return None
    from quantizers.calibration import CalibrationConfig, calibration_batches

    config = CalibrationConfig(dataset=request.dataset, samples=request.samples,
                               seq_len=request.seq_len)
    return calibration_batches(tokenizer, config)
