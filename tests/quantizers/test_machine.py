"""The machine line every benchmark prints names the CPU, its kernel flags and threads."""

from __future__ import annotations

from pathlib import Path

import pytest

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
