"""From a quantisation request to a served variant: validate, key, build, store, load.

Both the admin jobs and start-up quantisation go through here, so a variant
built either way lands in the cache under the same key and is loaded back the
same way. Every variant starts from the unquantised base weights on disk,
never from the model being served, so quantising twice never compounds error.
"""

from __future__ import annotations

import copy
import gc
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantizers import ConfigError, QuantizationCancelled, get_method, quantize
from quantizers.artifacts import (
    Artifact,
    ArtifactStore,
    artifact_key,
    calibration_identity,
    key_inputs,
)
from quantizers.calibration import CalibrationConfig, calibration_batches
from quantizers.loading import (
    LoadedModel,
    content_hash,
    load_model,
    load_tokenizer,
    model_id_for,
    resolve_model_path,
)
from quantizers.serialization import PLAN_FORMAT, build_from_state, quantized_state

QUALITY_TOKENS = 512
TOKENIZER_MARKER = "tokenizer_config.json"
QUALITY_WINDOW = 256


@dataclass(frozen=True)
class BaseModelRef:
    """The unquantised model every variant is built from."""

    source: Path
    model_id: str
    source_hash: str
    device: str = "cpu"

    @classmethod
    def resolve(cls, model: str | None, model_id: str | None, device: str) -> BaseModelRef:
        source = resolve_model_path(model)
        return cls(source=source, model_id=model_id or model_id_for(source),
                   source_hash=content_hash(source), device=device)


@dataclass(frozen=True)
class VariantSpec:
    """A validated request: canonical config and the cache key it maps to."""

    method: str
    config: dict[str, Any]
    calibration: CalibrationConfig | None
    key: str

    def quantization_label(self) -> dict[str, Any]:
        """What `/v1/models` shows: the method and its scalar settings, e.g.
        `{"method": "int4", "group_size": 128}` (lists such as the skip
        patterns stay in the artifact listing)."""
        scalars = {k: v for k, v in self.config.items() if isinstance(v, str | int | float | bool)}
        return {"method": self.method, **scalars}


def resolve_spec(
    base: BaseModelRef,
    method: str,
    config: dict[str, Any] | None,
    calibration: CalibrationConfig | None,
) -> VariantSpec:
    """Validate method, config and calibration text up front (ConfigError naming
    the field) and key them. A calibrated method given no calibration gets the
    documented default (`CalibrationConfig()`), so the key says what was used."""
    entry = get_method(method)
    canonical = entry.make_config(config or {}).to_dict()
    if calibration is None and entry.calibrated:
        calibration = CalibrationConfig()
    calibration_part = _calibration_part(calibration)
    try:
        key = artifact_key(base.source_hash, method, canonical, calibration_part, PLAN_FORMAT)
    except ValueError as exc:
        raise ConfigError(f"config must be plain JSON (no NaN or Infinity): {exc}",
                          "config") from exc
    return VariantSpec(method=method, config=canonical, calibration=calibration, key=key)


@dataclass
class BuildHooks:
    """How a running build reports back; all optional so start-up can ignore them."""

    on_phase: Callable[[str], None] = lambda phase: None
    on_progress: Callable[..., None] = lambda done, total, detail=None: None
    should_cancel: Callable[[], bool] = lambda: False
    timings: dict[str, float] = field(default_factory=dict)

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise QuantizationCancelled("cancelled")

    def timed(self, phase: str) -> _Phase:
        return _Phase(self, phase)


class _Phase:
    def __init__(self, hooks: BuildHooks, name: str) -> None:
        self.hooks, self.name = hooks, name

    def __enter__(self) -> None:
        self.hooks.check_cancel()
        self.hooks.on_phase(self.name)
        self.started = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.hooks.timings[f"{self.name}_s"] = round(time.perf_counter() - self.started, 3)


def build_variant(
    spec: VariantSpec,
    base: BaseModelRef,
    store: ArtifactStore,
    hooks: BuildHooks,
    *,
    protected: frozenset[str] = frozenset(),
    quality_tokens: int = QUALITY_TOKENS,
) -> tuple[LoadedModel, Artifact]:
    """Quantise the base weights from disk, score, store, and return the variant.

    Raises whatever the quantizers raise (QuantizationError, QuantizationCancelled)
    and ArtifactWriteError when the artifact cannot be written; the caller's
    served model is never touched here.
    """
    with hooks.timed("load_base"):
        # On the serving device: GPTQ's and feedback's matrix work is GPU work.
        float_model = load_model(base.source, dtype="float32", device=base.device,
                                 model_id=base.model_id)
    with hooks.timed("calibrate"):
        batches = (calibration_batches(float_model.tokenizer, spec.calibration)
                   if spec.calibration is not None else None)
    with hooks.timed("quantize"):
        quant_model = copy.deepcopy(float_model.model)
        report = quantize(quant_model, spec.method, spec.config, calibration=batches,
                          progress=hooks.on_progress, should_cancel=hooks.should_cancel)
    quality = None
    if quality_tokens > 0:
        with hooks.timed("evaluate"):
            quality = _quality(float_model.model, quant_model, float_model.tokenizer,
                               quality_tokens)
    tokenizer = float_model.tokenizer
    del float_model
    gc.collect()
    with hooks.timed("store"):
        tensors, plan = quantized_state(quant_model)
        content = _manifest_content(spec, base, plan, quant_model.config.to_dict(),
                                    _json_safe(report.to_dict()), quality)
        artifact = store.put(spec.key, tensors, content, protected=protected,
                             extra_files=tokenizer_files(tokenizer))
    hooks.check_cancel()
    loaded = LoadedModel(
        model_id=base.model_id, model=quant_model.to(base.device), tokenizer=tokenizer,
        source=base.source, dtype=_dtype(plan), quantization=spec.quantization_label(),
        metadata={"artifact": spec.key, "quality": quality},
    )
    return loaded, artifact


def ensure_variant(
    spec: VariantSpec,
    base: BaseModelRef,
    store: ArtifactStore,
    hooks: BuildHooks,
    *,
    protected: frozenset[str] = frozenset(),
    quality_tokens: int = QUALITY_TOKENS,
    tokenizer: Any | None = None,
) -> tuple[LoadedModel, Artifact, bool]:
    """The one path from a spec to a servable variant, for start-up and jobs
    alike: the cached artifact loaded when the store holds it, else a fresh
    build that is stored first. Returns (model, artifact, cache_hit)."""
    artifact = store.get(spec.key)
    if artifact is not None:
        with hooks.timed("load_artifact"):
            return load_variant(artifact, base, tokenizer), artifact, True
    loaded, artifact = build_variant(spec, base, store, hooks, protected=protected,
                                     quality_tokens=quality_tokens)
    return loaded, artifact, False


def load_variant(
    artifact: Artifact, base: BaseModelRef, tokenizer: Any | None = None
) -> LoadedModel:
    """Rebuild a served model from a verified artifact, without the float weights.

    Without a tokenizer in hand, the one stored in the artifact is used (well
    under a second) rather than parsing it out of the base GGUF again (~6-9 s);
    an artifact without one falls back to the base model's."""
    if tokenizer is None:
        tokenizer = load_tokenizer(artifact.path if artifact.has_file(TOKENIZER_MARKER)
                                   else base.source)
    manifest = artifact.manifest
    model = build_from_state(manifest["hf_config"], artifact.load_tensors(), manifest["plan"])
    label = manifest.get("quantization") or {"method": manifest["method"]}
    return LoadedModel(
        model_id=base.model_id, model=model.to(base.device), tokenizer=tokenizer,
        source=base.source, dtype=_dtype(manifest["plan"]), quantization=label,
        metadata={"artifact": artifact.key, "quality": manifest.get("quality")},
    )


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The tokenizer as `save_pretrained` writes it (flat files), to store in
    the artifact."""
    with tempfile.TemporaryDirectory(prefix="quantserve-tokenizer-") as directory:
        tokenizer.save_pretrained(directory)
        return {path.name: path.read_bytes() for path in Path(directory).iterdir()
                if path.is_file()}


def _quality(base: Any, quant: Any, tokenizer: Any, tokens: int) -> dict[str, Any]:
    from quantizers.evaluation.report import quality_report

    with torch.inference_mode():
        report = quality_report(base, quant, tokenizer, limit_tokens=tokens,
                                window=min(QUALITY_WINDOW, tokens))
    return _json_safe(report)


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a diverged perplexity) become None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _calibration_part(calibration: CalibrationConfig | None) -> dict[str, Any] | None:
    """The calibration inputs of a key: parameters plus the text file's sha256,
    so an edited file never serves an artifact calibrated on the old text."""
    if calibration is None:
        return None
    return calibration_identity(calibration.to_dict(), calibration.path())


def _dtype(plan: dict[str, Any]) -> torch.dtype:
    return getattr(torch, str(plan.get("dtype", "bfloat16")))


def _manifest_content(
    spec: VariantSpec,
    base: BaseModelRef,
    plan: dict[str, Any],
    hf_config: dict[str, Any],
    report: dict[str, Any],
    quality: dict[str, Any] | None,
) -> dict[str, Any]:
    calibration_part = _calibration_part(spec.calibration)
    return {
        "method": spec.method,
        "config": spec.config,
        "quantization": spec.quantization_label(),
        "inputs": key_inputs(base.source_hash, spec.method, spec.config, calibration_part,
                             PLAN_FORMAT),
        "base_model": {"model_id": base.model_id, "source": str(base.source)},
        "plan": plan,
        "hf_config": hf_config,
        "report": report,
        "quality": quality,
    }
