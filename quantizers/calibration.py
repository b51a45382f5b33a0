"""Calibration data and activation statistics, shared by every calibrated method.

Calibration text is bundled with the package (`quantizers/data/calibration`;
never WikiText, which is the evaluation set). `calibration_batches` cuts
deterministic, evenly spaced token windows from it, so the same config always
gives the same batches (and the same artifact). `collect_activation_stats` runs
them through the model with hooks on linear inputs and keeps per-input-channel
statistics, plus an optional deterministic sample of input rows for methods
that score candidate settings.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Self

import torch
from torch import Tensor, nn

from quantizers.datasets import data_file
from quantizers.errors import ConfigError

DATASET_FILES = {
    "tinyshakespeare": Path("calibration") / "tinyshakespeare.txt",
    "alice": Path("calibration") / "carroll-alice.txt",
}
MAX_SAMPLES = 4096
MAX_SEQ_LEN = 8192


def _check_int(value: Any, low: int, high: int, param: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{param} must be an integer in {low}..{high}, got {value!r}", param)


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text to calibrate on and how much of it.

    dataset: "tinyshakespeare", "alice", or a path to a UTF-8 text file.
    """

    dataset: str = "tinyshakespeare"
    samples: int = 64
    seq_len: int = 256

    def __post_init__(self) -> None:
        if not isinstance(self.dataset, str) or not self.dataset.strip():
            raise ConfigError("calibration dataset must be a name or a path", "calibration.dataset")
        _check_int(self.samples, 1, MAX_SAMPLES, "calibration.samples")
        _check_int(self.seq_len, 8, MAX_SEQ_LEN, "calibration.seq_len")

    def path(self) -> Path:
        """The text file this config reads; a ConfigError if it is missing."""
        relative = DATASET_FILES.get(self.dataset)
        path = data_file(relative) if relative else Path(self.dataset).expanduser()
        if not path.is_file():
            raise ConfigError(f"calibration file not found: {path}", "calibration.dataset")
        return path

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Self:
        data = dict(data or {})
        unknown = set(data) - {"dataset", "samples", "seq_len"}
        if unknown:
            name = sorted(unknown)[0]
            raise ConfigError(f"unknown calibration field '{name}'", f"calibration.{name}")
        return cls(**data)


@lru_cache(maxsize=4)
def _token_ids(path: Path, mtime_ns: int, tokenizer: Any) -> Tensor:
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ConfigError(f"calibration file is empty: {path}", "calibration.dataset")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_batches(tokenizer: Any, cfg: CalibrationConfig) -> list[Tensor]:
    """`cfg.samples` windows of `cfg.seq_len` tokens, evenly spaced over the text.

    Windows overlap when the text is shorter than samples * seq_len; a text
    shorter than one window is a ConfigError naming seq_len.
    """
    path = cfg.path()
    ids = _token_ids(path, path.stat().st_mtime_ns, tokenizer)
    if ids.numel() < cfg.seq_len:
        raise ConfigError(
            f"calibration text {path.name} has {ids.numel()} tokens, fewer than "
            f"seq_len {cfg.seq_len}",
            "calibration.seq_len",
        )
    last_start = ids.numel() - cfg.seq_len
    starts = torch.linspace(0, last_start, cfg.samples).round().long().tolist()
    return [ids[s : s + cfg.seq_len].unsqueeze(0) for s in starts]


def subsample_batches(batches: Sequence[Tensor], max_tokens: int) -> list[Tensor]:
    """At most `max_tokens` tokens of the batches, as evenly spaced whole batches.

    Per-channel ranges and a few hundred sampled rows settle long before the
    64 x 256 tokens a server request calibrates on by default, while every
    token costs a full forward; evenly spaced batches keep the sample spread
    over the whole text. At least one batch is always kept.
    """
    if not batches:
        return []
    per_batch = max(int(batches[0].numel()), 1)
    keep = min(len(batches), max(max_tokens // per_batch, 1))
    picks = torch.linspace(0, len(batches) - 1, keep).round().long().tolist()
    return [batches[i] for i in picks]


@dataclass
class ActivationStats:
    """Statistics of one linear layer's input over all calibration tokens.

    Per input channel: absolute max, min, max and sum of squares; `rows` is a
    deterministic sample of input rows ([S, K], in the input's dtype or the
    forward's compute dtype) when requested.
    """

    abs_max: Tensor
    min: Tensor
    max: Tensor
    sq_sum: Tensor
    count: int
    rows: Tensor | None = None
    _row_buffer: Tensor | None = field(default=None, repr=False)
    _rows_filled: int = field(default=0, repr=False)

    @property
    def mean_square(self) -> Tensor:
        return self.sq_sum / max(self.count, 1)

    @classmethod
    def first(cls, x: Tensor) -> Self:
        low, high = x.aminmax(dim=0)
        return cls(torch.maximum(-low, high), low, high, x.square().sum(0), x.shape[0])

    def update(self, x: Tensor) -> None:
        low, high = x.aminmax(dim=0)
        self.min = torch.minimum(self.min, low)
        self.max = torch.maximum(self.max, high)
        self.abs_max = torch.maximum(-self.min, self.max)
        self.sq_sum += x.square().sum(0)
        self.count += x.shape[0]


class _StatsHooks:
    """Forward pre-hooks that fill one ActivationStats per distinct input tensor.

    Linears fed the very same tensor (q/k/v after one norm, gate/up after
    another) share one ActivationStats object, so their statistics are
    computed once instead of once per linear.
    """

    def __init__(
        self,
        keep_rows: int,
        per_batch_rows: int,
        rows_for: Collection[str] | None,
        row_dtype: torch.dtype | None,
    ) -> None:
        self.stats: dict[str, ActivationStats] = {}
        self.keep_rows = keep_rows
        self.per_batch_rows = per_batch_rows
        self.rows_for = rows_for
        self.row_dtype = row_dtype
        self._last_input: Tensor | None = None
        self._last_stats: ActivationStats | None = None
        self._rows_taken: set[int] = set()

    def start_batch(self) -> None:
        self._last_input = self._last_stats = None
        self._rows_taken.clear()

    def hook_for(self, name: str) -> Any:
        def hook(_: nn.Module, args: tuple[Tensor, ...]) -> None:
            raw = args[0]
            if raw is self._last_input and self._last_stats is not None:
                item = self._last_stats
                self.stats.setdefault(name, item)
                x = None
            else:
                x = raw.detach().reshape(-1, raw.shape[-1]).float()
                item = self.stats.get(name)
                if item is None:
                    item = self.stats[name] = ActivationStats.first(x)
                else:
                    item.update(x)
                self._last_input, self._last_stats = raw, item
            self._keep_rows(name, item, raw)

        return hook

    def _keep_rows(self, name: str, item: ActivationStats, x: Tensor) -> None:
        wanted = self.rows_for is None or name in self.rows_for
        if not self.per_batch_rows or not wanted or id(item) in self._rows_taken:
            return
        x = x.detach().reshape(-1, x.shape[-1])
        step = max(x.shape[0] // self.per_batch_rows, 1)
        rows = x[::step][: min(self.per_batch_rows, self.keep_rows - item._rows_filled)]
        if item._row_buffer is None:
            # One buffer per input, filled in place: row parts allocated batch
            # by batch between the forward's temporaries fragment the heap.
            item._row_buffer = torch.empty(
                self.keep_rows, x.shape[-1], dtype=self.row_dtype or x.dtype, device=x.device
            )
        item._row_buffer[item._rows_filled : item._rows_filled + rows.shape[0]] = rows
        item._rows_filled += rows.shape[0]
        self._rows_taken.add(id(item))


def _calibration_forward(
    model: nn.Module, hooked: Collection[nn.Module]
) -> tuple[nn.Module, dict[str, Any]]:
    """The module to run and its keyword arguments: a causal LM's body without its head.

    The head's logits are thrown away here, and under bfloat16 autocast its
    49k-row matrix (SmolLM2's tied embedding) would be cast afresh for every
    batch: a fifth of the forward's time and, through allocator fragmentation,
    over 100 MiB of resident memory. A transformers model's `base_model` is the
    body; it is run whenever every hooked module lives inside it.
    """
    body = getattr(model, "base_model", model)
    if body is model or not isinstance(body, nn.Module):
        return model, {}
    inside = set(body.modules())
    if any(module not in inside for module in hooked):
        return model, {}
    return body, {"use_cache": False}


def collect_activation_stats(
    model: nn.Module,
    batches: list[Tensor],
    module_names: list[str] | None = None,
    keep_rows: int = 0,
    rows_for: Collection[str] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> dict[str, ActivationStats]:
    """Run the batches through `model` and return input statistics per linear layer.

    module_names limits the hooked layers (default: every nn.Linear). With
    keep_rows > 0, about that many evenly spaced input rows are kept for the
    layers in rows_for (default: every hooked layer). Linears that receive the
    same input tensor share one ActivationStats object. compute_dtype (e.g.
    bfloat16) runs the forward under autocast: twice as fast on CPU and the
    activations a bfloat16 quantised model will actually see; sampled rows are
    then kept in that dtype too (the quantised layers round their inputs to it).
    """
    if not batches:
        raise ConfigError("no calibration batches", "calibration")
    wanted = set(module_names) if module_names is not None else None
    per_batch = -(-keep_rows // len(batches)) if keep_rows > 0 else 0
    hooks = _StatsHooks(keep_rows, per_batch, rows_for, compute_dtype)
    modules = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (wanted is None or name in wanted)
    }
    handles = [module.register_forward_pre_hook(hooks.hook_for(n)) for n, module in modules.items()]
    device = next(model.parameters()).device
    forward, kwargs = _calibration_forward(model, list(modules.values()))
    # No weight-cast cache: it would hold a low-precision copy of every weight
    # until the pass ends, which is most of the float model again.
    autocast = (
        torch.autocast(device.type, dtype=compute_dtype, cache_enabled=False)
        if compute_dtype is not None
        else nullcontext()
    )
    try:
        with torch.no_grad(), autocast:
            for batch in batches:
                hooks.start_batch()
                forward(batch.to(device), **kwargs)
    finally:
        hooks.start_batch()
        for handle in handles:
            handle.remove()
    for item in hooks.stats.values():
        if item._row_buffer is not None:
            item.rows = item._row_buffer[: item._rows_filled]
            item._row_buffer = None
    return hooks.stats
