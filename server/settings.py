"""Server settings, read from `QUANTSERVE_*` environment variables.

Every CLI flag of `quantserve serve` maps onto a field here, so a container is
configured through the environment alone and the CLI only overrides it.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

from platformdirs import user_cache_dir
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Everything an operator can set. Defaults suit a laptop or a 2-core CI box."""

    model_config = SettingsConfigDict(env_prefix="QUANTSERVE_", extra="ignore")

    model: str | None = Field(
        default=None,
        description="Local GGUF file or Hugging Face directory; empty = the embedded SmolLM2.",
    )
    model_id: str | None = Field(default=None, description="Id served in `model` fields.")
    gguf_weights: Literal["float", "quantized"] = Field(
        default="float",
        description="How a GGUF `model` is served: `float` dequantises it (the base that "
        "methods quantise from); `quantized` keeps its Q4_0/Q4_1/Q8_0 codes on our int4/int8 "
        "kernels. A compressed-tensors directory is always served quantised.",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    dtype: str = Field(
        default="bfloat16",
        description="Compute dtype of the float model. bf16 is the fast path on CPU too.",
    )
    device: str = Field(default="auto", description="`auto` (CUDA when present), `cpu`, `cuda`.")
    num_threads: int | None = Field(default=None, ge=1)
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0.0, le=1.0,
        description="Fraction of a CUDA device's memory the server may use; the KV cache "
        "gets what the weights and warm-up leave of it (vLLM's setting). Ignored on CPU.",
    )
    compile: Literal["off", "on", "auto"] = Field(
        default="auto",
        description="torch.compile of the decode step at start-up / swap: `auto` compiles "
        "on CUDA only (on CPU the prepared eager step is faster, and starts in seconds).",
    )

    runner: Literal["auto", "general"] = Field(
        default="auto",
        description="`auto`: the lean Llama runner for the families it implements, the "
        "general runner (transformers' modules) for the rest; `general` for every model.",
    )

    quantize: str | None = Field(default=None, description="Method to quantise with at start-up.")
    quantize_config: dict[str, Any] = Field(default_factory=dict)

    admin_token: SecretStr | None = None
    api_key: SecretStr | None = None
    cors_origins: list[str] = Field(default_factory=list)

    cache_dir: Path = Field(
        default_factory=lambda: Path(user_cache_dir("quantserve")) / "artifacts"
    )
    cache_max_bytes: int | None = Field(default=None, ge=0)

    max_model_len: int = Field(
        default=4096, ge=16, description="Tokens one sequence may hold (prompt + completion), "
        "capped by the model's context.")
    max_num_seqs: int = Field(default=8, ge=1, description="Sequences decoded together.")
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Tokens one step may process (prompt tokens of the "
        "sequences it admits plus one per running sequence); default: max_model_len.")
    kv_cache_bytes: int | None = Field(
        default=None, ge=1 << 20, description="Bytes of the paged KV cache pool; default "
        "512 MiB on CPU (pages are only resident once used); on CUDA what keeps the process "
        "within gpu_memory_utilization of the device's memory.")
    block_size: int = Field(default=16, ge=1, description="Tokens per KV cache block.")
    kv_cache_dtype: Literal["auto", "int8"] = Field(
        default="auto", description="How the KV cache stores keys and values: `auto` in the "
        "model's dtype; `int8` as int8 codes with a scale per token and head (about half the "
        "bytes, so twice the blocks in the same kv_cache_bytes).")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse the KV blocks of prompt prefixes across requests.")
    # Deprecated names, read for one release: max_batch is max_num_seqs, and
    # max_batch_tokens (which also capped one sequence) is max_model_len.
    max_batch: int | None = Field(default=None, ge=1, deprecated=True)
    max_batch_tokens: int | None = Field(default=None, ge=16, deprecated=True)
    max_queue: int = Field(default=64, ge=0)
    max_loras: int = Field(
        default=8, ge=1, description="LoRA adapters loaded at once; loading one more unloads "
        "the least recently used.")
    max_lora_rank: int = Field(default=64, ge=1, description="Largest LoRA rank accepted.")
    adapter_train_max_bytes: int = Field(
        default=4 << 30, ge=1 << 20, description="Memory bound of one LoRA training job "
        "(its estimated peak); larger requests are refused.")
    max_completion_tokens: int = Field(
        default=2048, ge=1, description="Upper bound on max_tokens for any request."
    )
    max_n: int = Field(default=8, ge=1)
    max_stop: int = Field(default=4, ge=0)
    max_prompts: int = Field(default=32, ge=1, description="Prompts in one /v1/completions call.")
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    request_timeout_s: float = Field(default=300.0, gt=0)
    drain_timeout_s: float = Field(default=30.0, ge=0)
    log_level: str = "info"

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        renamed = (("max_batch", "max_num_seqs"), ("max_batch_tokens", "max_model_len"))
        for old, new in renamed:
            value = self.__dict__[old]
            if value is None:
                continue
            warnings.warn(
                f"{old} (QUANTSERVE_{old.upper()}) is deprecated and will be removed in the "
                f"next release; use {new} (QUANTSERVE_{new.upper()})",
                FutureWarning, stacklevel=2,
            )
            if new not in self.model_fields_set:
                self.__dict__[new] = value
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = self.max_model_len
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "max_num_batched_tokens must be >= max_model_len: a prompt is prefilled in one step"
            )
        return self

    @field_validator("quantize_config", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        """Accept the config as a JSON string, as the env var and the CLI give it."""
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"quantize_config is not valid JSON: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise ValueError("quantize_config must be a JSON object")
        return value

    @field_validator("quantize", "model", "model_id", "admin_token", "api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

