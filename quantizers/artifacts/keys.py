"""Content-addressed keys for quantised artifacts.

A key must change whenever anything that shapes the quantised tensors changes
(the base weights, the method, its configuration, the calibration data and the
way it is sliced, the on-disk format) and must stay identical otherwise, so that
a restart finds the artifact an earlier run built. Hashing a canonical JSON
document of exactly those inputs gives both properties.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

KEY_PATTERN = re.compile(r"^[0-9a-f]{64}$")


def canonical_json(value: Any) -> str:
    """One byte-exact text per value: sorted keys, no whitespace, no NaN.

    Raises ValueError when the value holds something JSON cannot express, because
    a key built from `repr()` of such an object would silently differ between runs.
    """
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"key input is not canonical JSON: {exc}") from exc


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def calibration_identity(parameters: dict[str, Any], data_file: Path) -> dict[str, Any]:
    """The calibration part of a key: its parameters plus the hash of the text file.

    The dataset name alone is not enough: editing the file behind the name changes
    the activations the method sees, so the bytes take part in the key.
    """
    return {**parameters, "data_sha256": file_sha256(data_file)}


def key_inputs(
    base_hash: str,
    method: str,
    config: dict[str, Any],
    calibration: dict[str, Any] | None,
    format_version: int | str,
) -> dict[str, Any]:
    """The document that is hashed into a key; also stored in the manifest so an
    operator can see why two artifacts differ."""
    return {
        "base_model_sha256": base_hash,
        "method": method,
        "config": config,
        "calibration": calibration,
        "format_version": format_version,
    }


def artifact_key(
    base_hash: str,
    method: str,
    config: dict[str, Any],
    calibration: dict[str, Any] | None,
    format_version: int | str,
) -> str:
    """64 hex characters naming the artifact built from these inputs."""
    document = key_inputs(base_hash, method, config, calibration, format_version)
    return hashlib.sha256(canonical_json(document).encode()).hexdigest()


def is_valid_key(key: str) -> bool:
    """Whether `key` has the shape `artifact_key` produces.

    The store checks this before building any path from a key, so a key taken
    from a URL can never name a file outside the store.
    """
    return bool(KEY_PATTERN.fullmatch(key))
