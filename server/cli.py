"""The `quantserve` command (`serve`, `eval`, `export`).

`serve` starts the HTTP server. Every flag has a `QUANTSERVE_*` environment
variable twin; a flag given on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError
from pydantic_settings import SettingsError


def _add_serve(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="serve a model over the OpenAI-compatible API",
        description="Serve a model over an OpenAI-compatible API. Each flag can also be set "
        "with the environment variable named in brackets; tokens (QUANTSERVE_ADMIN_TOKEN, "
        "QUANTSERVE_API_KEY) are read from the environment only, never from the command line.",
    )
    flags: list[tuple[str, dict[str, Any]]] = [
        ("--model", {"help": "local .gguf file or Hugging Face directory; default: the "
                             "embedded SmolLM2-135M-Instruct [QUANTSERVE_MODEL]"}),
        ("--model-id", {"help": "id clients send as `model` (default: derived from the "
                                "file name) [QUANTSERVE_MODEL_ID]"}),
        ("--gguf-weights", {"choices": ("float", "quantized"),
                            "help": "serve a GGUF model dequantised (float, default) or on "
                                    "our int4/int8 kernels from its Q4_0/Q4_1/Q8_0 codes "
                                    "(quantized) [QUANTSERVE_GGUF_WEIGHTS]"}),
        ("--host", {"help": "address to bind (default 127.0.0.1) [QUANTSERVE_HOST]"}),
        ("--port", {"type": int, "help": "port (default 8000) [QUANTSERVE_PORT]"}),
        ("--quantize", {"help": "quantisation method applied at start-up, e.g. int8, int4 "
                                "[QUANTSERVE_QUANTIZE]"}),
        ("--quantize-config", {"help": "JSON config of that method, e.g. "
                                       "'{\"group_size\": 64}' [QUANTSERVE_QUANTIZE_CONFIG]"}),
        ("--dtype", {"help": "compute dtype of the float model: bfloat16 (default) or float32 "
                             "[QUANTSERVE_DTYPE]"}),
        ("--device", {"help": "auto (default), cpu or cuda [QUANTSERVE_DEVICE]"}),
        ("--gpu-memory-utilization", {"type": float,
                                      "help": "fraction of the CUDA device's memory to use, "
                                              "KV cache included (default 0.9) "
                                              "[QUANTSERVE_GPU_MEMORY_UTILIZATION]"}),
        ("--compile", {"choices": ("off", "on", "auto"),
                       "help": "torch.compile the decode step at start-up: auto (default: "
                               "on CUDA only), on, off [QUANTSERVE_COMPILE]"}),
        ("--runner", {"choices": ("auto", "general"),
                      "help": "auto (default: the lean runner for llama, mistral and qwen2) "
                              "or general (transformers' modules for every model) "
                              "[QUANTSERVE_RUNNER]"}),
        ("--cache-dir", {"help": "artifact cache directory [QUANTSERVE_CACHE_DIR]"}),
        ("--max-model-len", {"type": int, "help": "tokens one sequence may hold, prompt and "
                                                  "completion (default 4096) "
                                                  "[QUANTSERVE_MAX_MODEL_LEN]"}),
        ("--max-num-seqs", {"type": int, "help": "sequences decoded together (default 8) "
                                                 "[QUANTSERVE_MAX_NUM_SEQS]"}),
        ("--max-num-batched-tokens", {"type": int, "help": "tokens one step may process "
                                      "(default: max-model-len) "
                                      "[QUANTSERVE_MAX_NUM_BATCHED_TOKENS]"}),
        ("--kv-cache-bytes", {"type": int, "help": "bytes of the paged KV cache (default 512 "
                                                   "MiB on CPU, a share of free memory on "
                                                   "CUDA) [QUANTSERVE_KV_CACHE_BYTES]"}),
        ("--kv-cache-dtype", {"choices": ("auto", "int8"),
                              "help": "KV cache storage: auto (the model's dtype, default) "
                                      "or int8 (half the bytes per block) "
                                      "[QUANTSERVE_KV_CACHE_DTYPE]"}),
        ("--max-batch", {"type": int, "help": "deprecated: use --max-num-seqs "
                                              "[QUANTSERVE_MAX_BATCH]"}),
        ("--max-batch-tokens", {"type": int, "help": "deprecated: use --max-model-len "
                                                     "[QUANTSERVE_MAX_BATCH_TOKENS]"}),
        ("--max-queue", {"type": int, "help": "waiting requests before 429 (default 64) "
                                              "[QUANTSERVE_MAX_QUEUE]"}),
        ("--log-level", {"help": "debug, info (default), warning [QUANTSERVE_LOG_LEVEL]"}),
    ]
    for flag, options in flags:
        p.add_argument(flag, default=None, **options)
    p.set_defaults(handler=_serve)


def settings_from_args(args: argparse.Namespace, names: Sequence[str]) -> Any:
    """Settings from the environment, overridden by the flags that were given."""
    from server.settings import Settings

    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return Settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from quantizers.loading import ModelLoadError, resolve_model_path
    from server.app import create_app
    from server.shutdown import DrainingServer

    try:
        names = [a for a in vars(args) if a not in ("handler", "command")]
        settings = settings_from_args(args, names)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"quantserve: invalid setting {where}: {first['msg']}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"quantserve: invalid setting: {exc}", file=sys.stderr)
        return 2
    try:
        resolve_model_path(settings.model)
    except ModelLoadError as exc:
        print(f"quantserve: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port,
                            log_level=settings.log_level.lower(),
                            timeout_graceful_shutdown=int(settings.drain_timeout_s) or None)
    DrainingServer(config, app, settings.drain_timeout_s).run()
    if app.state.fatal_error:
        print(f"quantserve: {app.state.fatal_error}", file=sys.stderr)
        return 1
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from quantizers.evaluation import cli as eval_cli

    p = sub.add_parser(
        "eval",
        help="measure quality, size and speed of quantisation methods",
        description="Quantise the model with each method and report WikiText-2 perplexity, "
        "KL divergence and top-1 agreement against the float model, weight bytes, bits per "
        "weight, quantisation time, decode speed and peak memory, in one run.",
    )
    eval_cli.add_arguments(p)

    def handler(args: argparse.Namespace) -> int:
        args.command_line = shlex.join([".venv/bin/quantserve", *sys.argv[1:]])
        return eval_cli.run(args)

    p.set_defaults(handler=handler)


def _add_export(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from server import export_cli

    p = sub.add_parser(
        "export",
        help="write a quantised variant as GGUF (llama.cpp, Ollama) or compressed-tensors (vLLM)",
        description="Export a quantised variant, taken from the artifact cache (built and "
        "cached first when missing), as a GGUF file or a compressed-tensors directory.",
    )
    export_cli.add_arguments(p)
    p.set_defaults(handler=export_cli.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantserve",
        description="Serve quantised LLMs on demand over an OpenAI-compatible API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_eval(sub)
    _add_export(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
