"""Method registry, typed configs with per-layer overrides, and `quantize()`.

Every method registers a frozen config dataclass and an apply function. The
config's canonical `to_dict()` is what the artifact cache keys on, so two
requests that mean the same thing hash the same. `quantize()` owns what all
methods share: choosing the target layers, progress, cancellation, turning a
failure into an error that names the layer, the final cast to the compute
dtype and the report.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import torch
from torch import Tensor, nn

from quantizers.errors import (
    ConfigError,
    LayerQuantizationError,
    QuantizationCancelled,
    QuantizationError,
)
from quantizers.loading import weight_bytes
from quantizers.runtime.base import COMPUTE_DTYPE

# Module-name patterns left in float by default. Only nn.Linear layers are ever
# targets, so embeddings and norms are listed for clarity. Methods whose modules
# cannot also serve embedding row lookups keep lm_head out by default (an
# override naming it, or a skip list without it, opts it in): SmolLM2 ties it to
# the embeddings, and quantising it alone would untie and duplicate the matrix.
DEFAULT_SKIP: tuple[str, ...] = ("*embed_tokens*", "*norm*", "lm_head")

# The default skip list of the weight-only methods that store a tied lm_head as
# int8 codes shared with the embedding (`int8`, `int4`, and `gptq`, `feedback`
# and `mixed`, which build on them). That matrix is a fifth
# of SmolLM2: left in bfloat16 it alone keeps int8 above 0.27x and int4 g128
# above 0.16x of the float32 bytes. Opt out per call by putting "lm_head" back
# in the skip list.
HEAD_INCLUDED_SKIP: tuple[str, ...] = ("*embed_tokens*", "*norm*")

# Override values that mean "leave this layer in float".
_SKIP_OVERRIDE = {"skip": True}


def name_matches(pattern: str, name: str) -> bool:
    """fnmatch on the full module name, or a full regex match with a 're:' prefix."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(value[k]) for k in sorted(value)}
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config: skip list and per-layer overrides.

    `overrides` maps a module-name pattern to field values for the layers it
    matches (first matching pattern wins, in insertion order), or to None /
    {"skip": True} to keep those layers in float. An override beats the skip
    list, which is how lm_head is opted in where a method's default skip list
    leaves it out: ``overrides={"lm_head": {}}``.
    Subclasses add fields and extend `validate()`; construction validates, so an
    invalid config object cannot exist.
    """

    skip: tuple[str, ...] = DEFAULT_SKIP
    overrides: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)

    _base_fields: ClassVar[frozenset[str]] = frozenset({"skip", "overrides"})

    def __post_init__(self) -> None:
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise ConfigError("skip must be a list of module-name patterns", "skip")
        object.__setattr__(self, "skip", tuple(self.skip))
        if not isinstance(self.overrides, Mapping):
            raise ConfigError("overrides must map module-name patterns to settings", "overrides")
        object.__setattr__(self, "overrides", dict(self.overrides))
        self.validate()
        for pattern, override in self.overrides.items():
            self._check_override(pattern, override)

    def validate(self) -> None:
        """Check field values; subclasses extend it and raise ConfigError naming the field."""
        for pattern in (*self.skip, *self.overrides):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ConfigError(f"bad regex {pattern!r}: {exc}", "overrides") from None

    def _check_override(self, pattern: str, override: Mapping[str, Any] | None) -> None:
        if override is None or dict(override) == _SKIP_OVERRIDE:
            return
        if not isinstance(override, Mapping):
            raise ConfigError(f"override for {pattern!r} must be an object or null", "overrides")
        fields = {f.name for f in dataclasses.fields(self)} - self._base_fields
        for key in override:
            if key not in fields:
                raise ConfigError(
                    f"override for {pattern!r} sets unknown field '{key}'", f"overrides.{key}"
                )
        dataclasses.replace(self, skip=(), overrides={}, **override)

    def for_layer(self, name: str) -> Self | None:
        """The config that applies to module `name`, or None to leave it in float."""
        for pattern, override in self.overrides.items():
            if name_matches(pattern, name):
                if override is None or dict(override) == _SKIP_OVERRIDE:
                    return None
                return dataclasses.replace(self, skip=(), overrides={}, **override)
        if any(name_matches(pattern, name) for pattern in self.skip):
            return None
        return self

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able form: every field, sorted keys, lists for tuples."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Self:
        """Build and validate from a (JSON) dict; unknown keys are a ConfigError."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in names:
                raise ConfigError(f"unknown config field '{key}' for this method", key)
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"invalid config: {exc}") from None


def check_choice(value: Any, choices: Sequence[Any], param: str) -> None:
    """ConfigError naming `param` unless value is one of choices (bools are not ints)."""
    if isinstance(value, bool) and not all(isinstance(c, bool) for c in choices):
        raise ConfigError(f"{param} must be one of {list(choices)}, got {value!r}", param)
    if value not in choices:
        raise ConfigError(f"{param} must be one of {list(choices)}, got {value!r}", param)


def check_range(value: Any, low: float, high: float, param: str) -> None:
    """ConfigError naming `param` unless low <= value <= high (a real number)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{param} must be a number in [{low}, {high}], got {value!r}", param)


@dataclass(frozen=True)
class LayerTarget:
    """One nn.Linear to quantise and the config that applies to it.

    `module` is the float layer until QuantContext.replace() installs its
    quantised form, and that form afterwards.
    """

    name: str
    module: nn.Module
    config: Any


@dataclass
class QuantReport:
    """What a quantisation did; `to_dict()` goes into the artifact manifest."""

    method: str
    config: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    weight_bytes_before: int
    weight_bytes_after: int
    bits_per_weight: float
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class QuantContext:
    """What an apply function gets besides the model and config.

    Methods that quantise layer by layer call `quantize_layers(fn)`; methods
    with their own order (GPTQ block by block) use `targets`, `check_cancel()`
    and `replace()` directly, inside `layer_errors(name)`. `replace()` points
    the layer's entry in `targets` at the installed module, so the context does
    not keep a replaced float layer alive (its memory is freed as soon as the
    method drops its own references).
    """

    def __init__(
        self,
        model: nn.Module,
        config: MethodConfig,
        calibration: Sequence[Tensor] | None,
        progress: Callable[..., None] | None,
        should_cancel: Callable[[], bool] | None,
    ) -> None:
        self.model = model
        self.config = config
        # Token ids on the model's device, where every calibration pass runs.
        device = next(model.parameters()).device
        self.calibration = (
            [batch.to(device) for batch in calibration] if calibration is not None else None
        )
        self.layers: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self._progress = progress
        self._should_cancel = should_cancel
        self.targets = self._find_targets()
        self._target_index = {target.name: i for i, target in enumerate(self.targets)}
        self.output_head, self.tied_head = self._head_names()
        self.done = 0

    def _head_names(self) -> tuple[str | None, str | None]:
        """(name of the nn.Linear output projection, that name again when it
        shares the input embedding's weight); None where there is none."""
        get_in = getattr(self.model, "get_input_embeddings", None)
        get_out = getattr(self.model, "get_output_embeddings", None)
        if not callable(get_in) or not callable(get_out):
            return None, None
        head, embedding = get_out(), get_in()
        if not isinstance(head, nn.Linear):
            return None, None
        name = next(name for name, module in self.model.named_modules() if module is head)
        tied = embedding is not None and head.weight is getattr(embedding, "weight", None)
        return name, name if tied else None

    def share_tied_embedding(self) -> None:
        """Re-tie a quantised lm_head to the embeddings by sharing its int8 codes.

        Replacing a tied lm_head unties it; runtime modules that can serve row
        lookups (`as_embedding`) then replace the float embedding, so the matrix
        is stored once, quantised. Others leave the float embedding in place, as
        does an embedding that computes more than a (constantly scaled) lookup.
        """
        if self.tied_head is None or self.tied_head not in self.layers:
            return
        head = self.model.get_submodule(self.tied_head)
        as_embedding = getattr(head, "as_embedding", None)
        if not callable(as_embedding):
            return
        old = self.model.get_input_embeddings()
        multiplier = _row_multiplier(old)
        if multiplier is None:
            self.layers[self.tied_head]["tied_embedding"] = False
            self.layers[self.tied_head]["embedding_kept"] = (
                f"{type(old).__name__} is not a plain row lookup; it stays in float"
            )
            return
        self.model.set_input_embeddings(as_embedding(getattr(old, "padding_idx", None), multiplier))
        self.layers[self.tied_head]["tied_embedding"] = True

    def _find_targets(self) -> list[LayerTarget]:
        targets = []
        for name, module in self.model.named_modules():
            if type(module) is nn.Linear:
                layer_config = self.config.for_layer(name)
                if layer_config is not None:
                    targets.append(LayerTarget(name, module, layer_config))
        return targets

    def cancelled(self) -> bool:
        """Whether the caller asked to stop; a nested start method's context
        takes this as its own `should_cancel`."""
        return self._should_cancel is not None and self._should_cancel()

    def check_cancel(self) -> None:
        if self.cancelled():
            raise QuantizationCancelled(
                f"cancelled after {self.done} of {len(self.targets)} layers"
            )

    def require_calibration(self) -> list[Tensor]:
        """The calibration batches, or a ConfigError when the method needs them."""
        if not self.calibration:
            raise ConfigError("this method needs calibration batches", "calibration")
        return self.calibration

    def replace(self, name: str, module: nn.Module, **info: Any) -> None:
        """Swap module `name` for its quantised version and record it in the report."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        module.train(getattr(parent, child).training)
        setattr(parent, child, module)
        index = self._target_index.get(name)
        if index is not None:
            self.targets[index] = dataclasses.replace(self.targets[index], module=module)
        describe = getattr(module, "describe", None)
        details = describe() if callable(describe) else {}
        self.layers[name] = {"kind": type(module).__name__, **details, **info}
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, len(self.targets))

    def report_progress(
        self, done: int, total: int, detail: Mapping[str, Any] | None = None
    ) -> None:
        """Report `done` of `total` steps of a stage that runs before the swaps
        (GPTQ's solves, sensitivity measurement, refinement rounds), so a job
        shows movement while the slow part works, not only at the end.

        `detail` (e.g. a training step, its loss and the time left) is passed
        on as a third argument when given, so callbacks that take two still work.
        """
        if self._progress is None:
            return
        if detail is None:
            self._progress(done, total)
        else:
            self._progress(done, total, dict(detail))

    def layer_errors(self, name: str) -> _LayerErrors:
        """Context manager turning any failure into LayerQuantizationError(name)."""
        return _LayerErrors(name)

    def quantize_layers(self, build: Callable[[LayerTarget], nn.Module]) -> None:
        """Replace every target by build(target), one at a time, so the float
        weight of a layer is released as soon as its quantised form is
        installed (no reference to the float target outlives its build)."""
        for name in [target.name for target in self.targets]:
            self.check_cancel()
            with self.layer_errors(name):
                module = build(self.targets[self._target_index[name]])
            self.replace(name, module)


def _row_multiplier(embedding: nn.Module) -> float | None:
    """The constant an embedding multiplies its rows by (1 for nn.Embedding,
    `embed_scale` for transformers' scaled embeddings such as Gemma's), or None
    when it is something else."""
    if type(embedding) is nn.Embedding:
        return 1.0
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(embedding, nn.Embedding) and isinstance(scale, Tensor | float | int):
        return float(scale)
    return None


class _LayerErrors:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, LayerQuantizationError | QuantizationCancelled):
            return False
        if isinstance(exc, QuantizationError):
            raise LayerQuantizationError(self.name, exc.message, exc.param) from exc
        if isinstance(exc, Exception):
            raise LayerQuantizationError(self.name, f"{type(exc).__name__}: {exc}") from exc
        return False


ApplyFn = Callable[[nn.Module, Any, QuantContext], None]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, config class and apply function.

    `calibrated`: the method reads calibration batches; callers that give none
    use the documented default (`CalibrationConfig()`).
    """

    name: str
    config_cls: type[MethodConfig]
    apply: ApplyFn
    calibrated: bool = False

    def make_config(self, config: Mapping[str, Any] | MethodConfig | None) -> MethodConfig:
        if isinstance(config, self.config_cls):
            return config
        if isinstance(config, MethodConfig):
            raise ConfigError(
                f"config is a {type(config).__name__}, method '{self.name}' needs "
                f"{self.config_cls.__name__}",
                "config",
            )
        if config is not None and not isinstance(config, Mapping):
            raise ConfigError("config must be an object", "config")
        return self.config_cls.from_dict(config)


_METHODS: dict[str, Method] = {}


def register_method(
    name: str, config_cls: type[MethodConfig], *, calibrated: bool = False
) -> Callable[[ApplyFn], ApplyFn]:
    """Decorator registering apply(model, config, ctx) under `name`."""

    def decorator(apply: ApplyFn) -> ApplyFn:
        if name in _METHODS:
            raise ValueError(f"method '{name}' is registered twice")
        _METHODS[name] = Method(name, config_cls, apply, calibrated)
        return apply

    return decorator


def _load_methods() -> None:
    importlib.import_module("quantizers.methods")


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_methods()
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method, or ConfigError naming the field 'method'."""
    _load_methods()
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}", "method"
        ) from None


def _quantised_bits(model: nn.Module, layers: Mapping[str, Any]) -> float:
    """Average stored bits per weight of the quantised layers, scales included."""
    stored = 0
    count = 0
    for name in layers:
        module = model.get_submodule(name)
        stored += weight_bytes(module)
        count += int(getattr(module, "in_features", 0)) * int(getattr(module, "out_features", 0))
    return 8.0 * stored / count if count else 0.0


def _kept_in_float(model: nn.Module, config: MethodConfig, tied_head: str | None) -> dict[str, str]:
    """Every linear layer the method left in float, with why: what a method did
    not quantise (a 262k-row tied head, a layer the plan keeps) is reported
    as plainly as what it did."""
    kept = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:
            continue
        reason = (
            "the config's skip list or overrides leave it in float"
            if config.for_layer(name) is None
            else "the method left it in float"
        )
        if name == tied_head:
            reason += "; it is tied to the input embedding, which stays in float with it"
        kept[name] = reason
    return kept


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast float parameters (embeddings, norms, skipped linears) to `dtype`.

    Buffers keep their dtype: rotary inverse frequencies rounded to bfloat16
    would shift the phase of every position, and the runtime modules' buffers
    are already in the dtype their kernel needs. Tied parameters stay tied
    because the Parameter objects are kept.
    """
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype)


def quantize(
    model: nn.Module,
    method: str,
    config: Mapping[str, Any] | MethodConfig | None = None,
    *,
    calibration: Sequence[Tensor] | None = None,
    progress: Callable[..., None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> QuantReport:
    """Quantise `model` in place with `method` and return the report.

    Layers are replaced one at a time and each float layer is freed once its
    quantised form is installed (peak memory ~ the float model plus one float
    layer's temporaries plus the quantised result); the model ends in the
    compute dtype (bfloat16) because the low-bit kernels are fast only with
    bfloat16 activations. On any error the model is left partially quantised
    and must be discarded.
    """
    entry = get_method(method)
    cfg = entry.make_config(config)
    started = time.perf_counter()
    before = weight_bytes(model)
    ctx = QuantContext(model, cfg, calibration, progress, should_cancel)
    ctx.check_cancel()
    with torch.no_grad():
        entry.apply(model, cfg, ctx)
    ctx.share_tied_embedding()
    ctx.extra["float_layers"] = _kept_in_float(model, cfg, ctx.tied_head)
    _cast_parameters(model, COMPUTE_DTYPE)
    return QuantReport(
        method=method,
        config=cfg.to_dict(),
        layers=ctx.layers,
        weight_bytes_before=before,
        weight_bytes_after=weight_bytes(model),
        bits_per_weight=_quantised_bits(model, ctx.layers),
        seconds=time.perf_counter() - started,
        extra=ctx.extra,
    )
