"""`quantserve export`: write a quantised variant as GGUF or compressed-tensors.

The variant is named like a quantisation request (method, config, calibration)
and taken from the artifact cache when it is there, built and cached otherwise;
or named directly by its cache key. Progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from quantizers.artifacts import Artifact, ArtifactStore


def add_arguments(p: argparse.ArgumentParser) -> None:
    from quantizers.export import FORMATS

    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--method", help="quantisation method, e.g. int4, gptq, int8")
    which.add_argument("--key", help="export this cached artifact (a key from "
                                     "GET /admin/artifacts)")
    p.add_argument("--config", default="{}", help="JSON config of the method, e.g. "
                                                  "'{\"group_size\": 32}'")
    p.add_argument("--calibration", default=None,
                   help="JSON calibration, e.g. '{\"dataset\": \"tinyshakespeare\", "
                        "\"samples\": 64, \"seq_len\": 256}'")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt")
    p.add_argument("--output", required=True, type=Path,
                   help="the .gguf file or compressed-tensors directory to create")
    p.add_argument("--float-type", default="bf16", choices=("bf16", "f16", "f32"),
                   help="type of the float tensors (and of compressed-tensors scales)")
    p.add_argument("--model", default=None, help="base model (as for `serve`) "
                                                  "[QUANTSERVE_MODEL]")
    p.add_argument("--model-id", default=None, help="[QUANTSERVE_MODEL_ID]")
    p.add_argument("--cache-dir", default=None, help="artifact cache [QUANTSERVE_CACHE_DIR]")


def _say(message: str) -> None:
    print(f"export: {message}", file=sys.stderr, flush=True)


def _variant(args: argparse.Namespace, store: ArtifactStore, settings: Any) -> Artifact:
    from quantizers.calibration import CalibrationConfig
    from server.variant_pipeline import BaseModelRef, BuildHooks, build_variant, resolve_spec

    base = BaseModelRef.resolve(settings.model, settings.model_id, "cpu")
    config = json.loads(args.config)
    calibration = (CalibrationConfig.from_dict(json.loads(args.calibration))
                   if args.calibration else None)
    spec = resolve_spec(base, args.method, config, calibration)
    cached = store.get(spec.key)
    if cached is not None:
        _say(f"using cached artifact {spec.key}")
        return cached
    _say(f"building artifact {spec.key} ({args.method})")

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            _say(f"  quantize {done}/{total}")

    hooks = BuildHooks(on_phase=lambda phase: _say(f"  {phase}"), on_progress=progress)
    return build_variant(spec, base, store, hooks)[1]


def run(args: argparse.Namespace) -> int:
    from quantizers import QuantizationError
    from quantizers.export import export_artifact
    from quantizers.loading import ModelLoadError
    from server.cli import settings_from_args

    if args.output.exists():  # before any model is loaded or variant built
        print(f"quantserve: {args.output} already exists", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args, ["model", "model_id", "cache_dir"])
        store = ArtifactStore(settings.cache_dir, settings.cache_max_bytes)
        if args.key is not None:
            artifact = store.get(args.key)
            if artifact is None:
                print(f"quantserve: no artifact {args.key!r} in {settings.cache_dir}",
                      file=sys.stderr)
                return 2
        else:
            artifact = _variant(args, store, settings)
        report = export_artifact(artifact, args.fmt, args.output, float_type=args.float_type,
                                 on_phase=lambda phase: _say(f"  {phase}"))
    except json.JSONDecodeError as exc:
        print(f"quantserve: --config / --calibration is not valid JSON: {exc}", file=sys.stderr)
        return 2
    except (QuantizationError, ModelLoadError, FileExistsError, ValueError) as exc:
        print(f"quantserve: {exc}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in report.items() if k not in ("tensors", "layers")}
    print(json.dumps({"artifact": artifact.key, **summary}))
    return 0
