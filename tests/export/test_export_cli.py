"""`quantserve export`: builds the variant into the cache once, exports by method or key."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from server.cli import main


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QUANTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_export_builds_once_then_reuses_the_artifact(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["export", "--model", str(tiny_model_dir), "--method", "int4",
              "--config", '{"group_size": 32}']
    assert main([*common, "--format", "gguf", "--output", str(tmp_path / "a.gguf")]) == 0
    first = capsys.readouterr()
    summary = json.loads(first.out)
    assert "building artifact" in first.err and "quantize 15/15" in first.err
    assert summary["format"] == "gguf" and summary["bytes"] == (tmp_path / "a.gguf").stat().st_size
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "a.gguf").tensors} == {
        "Q4_1", "Q8_0", "F32"}

    assert main([*common, "--format", "compressed-tensors", "--output", str(tmp_path / "ct")]) == 0
    second = capsys.readouterr()
    assert "using cached artifact" in second.err and "building" not in second.err
    assert (tmp_path / "ct" / "config.json").is_file()

    key = summary["artifact"]
    assert main(["export", "--key", key, "--format", "gguf", "--output",
                 str(tmp_path / "b.gguf")]) == 0
    assert (tmp_path / "b.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    (["--key", "0" * 64], "no artifact"),
    (["--method", "int4", "--config", "{not json"], "not valid JSON"),
    (["--method", "int4", "--config", '{"group_size": 100}'], "group_size"),
    (["--method", "nope"], "unknown method"),
])
def test_bad_requests_exit_2_with_one_line(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    args: list[str], message: str,
) -> None:
    code = main(["export", "--model", str(tiny_model_dir), *args, "--format", "gguf",
                 "--output", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.gguf").exists()


def test_an_existing_output_is_never_overwritten(
    tiny_model_dir: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.gguf").write_bytes(b"mine")
    code = main(["export", "--model", str(tiny_model_dir), "--method", "int8", "--format", "gguf",
                 "--output", str(tmp_path / "x.gguf")])
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "x.gguf").read_bytes() == b"mine"
