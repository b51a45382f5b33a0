"""Calibration batches from text files and activation statistics from hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import quantizers
from quantizers.calibration import (
    CalibrationConfig,
    calibration_batches,
    collect_activation_stats,
    subsample_batches,
)
from quantizers.datasets import BUNDLED_DATA_DIR
from quantizers.errors import ConfigError


class CharTokenizer:
    """A real (if simple) tokenizer: one id per character, no special tokens."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_named_datasets_resolve_to_the_bundled_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUANTSERVE_DATA_DIR", raising=False)
    path = CalibrationConfig().path()
    assert path == BUNDLED_DATA_DIR / "calibration" / "tinyshakespeare.txt"
    assert path.is_relative_to(Path(quantizers.__file__).parent)
    assert path.stat().st_size == 1_115_394
    assert CalibrationConfig(dataset="alice").path().stat().st_size == 144_396


def test_batches_are_deterministic_evenly_spaced_windows(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(65 + i % 26) for i in range(1000)))
    config = CalibrationConfig(dataset=str(text), samples=5, seq_len=100)
    batches = calibration_batches(CharTokenizer(), config)
    assert [tuple(b.shape) for b in batches] == [(1, 100)] * 5
    assert batches[0][0, 0] == 65 and batches[-1][0, -1] == ord(chr(65 + 999 % 26))
    again = calibration_batches(CharTokenizer(), config)
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))


def test_a_file_in_the_data_dir_overrides_the_bundled_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "calibration").mkdir()
    (tmp_path / "calibration" / "carroll-alice.txt").write_text("x" * 50)
    monkeypatch.setenv("QUANTSERVE_DATA_DIR", str(tmp_path))
    batches = calibration_batches(CharTokenizer(), CalibrationConfig("alice", 2, 16))
    assert len(batches) == 2 and int(batches[0][0, 0]) == ord("x")
    # a folder without the file falls back to the bundled text
    assert CalibrationConfig().path() == BUNDLED_DATA_DIR / "calibration" / "tinyshakespeare.txt"


def test_missing_empty_and_short_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        calibration_batches(CharTokenizer(), CalibrationConfig(dataset=str(tmp_path / "no.txt")))
    assert info.value.param == "calibration.dataset" and "no.txt" in info.value.message
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ConfigError, match="empty") as info:
        calibration_batches(CharTokenizer(), CalibrationConfig(dataset=str(empty)))
    assert info.value.param == "calibration.dataset"
    short = tmp_path / "short.txt"
    short.write_text("abc def")
    with pytest.raises(ConfigError) as info:
        calibration_batches(CharTokenizer(), CalibrationConfig(dataset=str(short), seq_len=16))
    assert info.value.param == "calibration.seq_len"


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"samples": 0}, "calibration.samples"),
        ({"seq_len": 4}, "calibration.seq_len"),
        ({"dataset": ""}, "calibration.dataset"),
        ({"rows": 3}, "calibration.rows"),
    ],
)
def test_invalid_config_names_the_field(data: dict, param: str) -> None:
    with pytest.raises(ConfigError) as info:
        CalibrationConfig.from_dict(data)
    assert info.value.param == param


def test_config_round_trips() -> None:
    config = CalibrationConfig("alice", 8, 64)
    assert CalibrationConfig.from_dict(config.to_dict()) == config


def test_stats_match_the_inputs_seen_by_each_linear() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    batches = [torch.tensor([[1.0, -2.0, 3.0, 0.0]]), torch.tensor([[-5.0, 1.0, 1.0, 2.0]])]
    stats = collect_activation_stats(model, batches, keep_rows=2, rows_for={"0"})
    first = stats["0"]
    assert first.count == 2
    assert first.abs_max.tolist() == [5.0, 2.0, 3.0, 2.0]
    assert first.min.tolist() == [-5.0, -2.0, 1.0, 0.0]
    assert torch.allclose(first.mean_square, torch.tensor([13.0, 2.5, 5.0, 2.0]))
    assert first.rows is not None and torch.equal(first.rows, torch.cat(batches))
    hidden = torch.relu(model[0](torch.cat(batches)))
    assert torch.allclose(stats["2"].max, hidden.amax(0).detach())
    assert stats["2"].rows is None
    assert not model[0]._forward_pre_hooks  # hooks are removed


def test_module_names_limit_the_hooks() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    stats = collect_activation_stats(model, [torch.randn(2, 4)], module_names=["1"])
    assert set(stats) == {"1"}


def test_subsample_keeps_evenly_spaced_whole_batches() -> None:
    batches = [torch.full((1, 100), i) for i in range(10)]
    picked = subsample_batches(batches, 400)
    assert [int(b[0, 0]) for b in picked] == [0, 3, 6, 9]
    assert subsample_batches(batches, 10_000) == batches
    assert [int(b[0, 0]) for b in subsample_batches(batches, 1)] == [0]


def test_a_shared_input_is_measured_once_and_the_head_is_skipped(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor
) -> None:
    """q/k/v read one tensor and share one stats object; the logits are not
    needed, so the head only runs when it is itself hooked."""
    batches = [tiny_tokens[:1], tiny_tokens[1:]]
    stats = collect_activation_stats(tiny_llama, batches, keep_rows=8)
    layer = "model.layers.0.self_attn"
    assert stats[f"{layer}.q_proj"] is stats[f"{layer}.k_proj"] is stats[f"{layer}.v_proj"]
    assert stats[f"{layer}.q_proj"] is not stats[f"{layer}.o_proj"]
    assert stats[f"{layer}.q_proj"].count == tiny_tokens.numel()
    assert stats[f"{layer}.q_proj"].rows is not None and stats[f"{layer}.q_proj"].rows.shape[0] == 8
    assert stats["lm_head"].count == tiny_tokens.numel()
    without_head = collect_activation_stats(tiny_llama, batches, [f"{layer}.q_proj"])
    assert torch.equal(without_head[f"{layer}.q_proj"].abs_max, stats[f"{layer}.q_proj"].abs_max)
    inputs: list[torch.Tensor] = []
    hook = tiny_llama.lm_head.register_forward_pre_hook(lambda _, args: inputs.append(args[0]))
    try:
        collect_activation_stats(tiny_llama, batches, [f"{layer}.q_proj"])
    finally:
        hook.remove()
    assert inputs == []


def test_bfloat16_forward_gives_close_statistics(
    tiny_llama: nn.Module, tiny_tokens: torch.Tensor
) -> None:
    exact = collect_activation_stats(tiny_llama, [tiny_tokens])
    fast = collect_activation_stats(tiny_llama, [tiny_tokens], compute_dtype=torch.bfloat16)
    assert set(fast) == set(exact)
    for name, item in exact.items():
        assert torch.allclose(fast[name].abs_max, item.abs_max, rtol=0.05, atol=0.02), name
    assert tiny_llama.lm_head.weight.dtype == torch.float32
