"""The machine line every benchmark prints names the CPU, its kernel flags and threads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantizers.evaluation import machine


def test_the_line_names_model_flags_cores_and_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\n"
                       "flags\t\t: fpu avx2 avx512f amx_int8 sse4_2\n\nprocessor\t: 1\n"
                       "model name\t: Other\n")
    monkeypatch.setattr(machine, "Path", lambda _: cpuinfo)
    line = machine.describe_machine(3)
    assert line.startswith("Test CPU 9000 (")
    assert "flags: avx2 avx512f amx_int8;" in line and "sse4_2" not in line
    assert "3 torch threads" in line


def test_memory_bandwidth_is_a_plausible_figure_and_restores_threads() -> None:
    threads = torch.get_num_threads()
    measured = machine.memory_bandwidth(1, megabytes=16, repeats=2)
    # a 16 MiB sum in well under a second and faster than any disk: 0.05-10000 GB/s
    assert 0.05 < measured < 10_000
    assert torch.get_num_threads() == threads
