"""The `quantserve` command's own behaviour: help, and one-line start-up failures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import Settings
from tests.helpers.server_process import REPO_ROOT


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=120, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("command", ["serve", "eval"])
def test_help_documents_every_command(command: str) -> None:
    out = _cli(command, "--help")
    assert out.returncode == 0
    assert "usage: quantserve " + command in out.stdout


def test_serve_help_names_the_environment_variables() -> None:
    text = _cli("serve", "--help").stdout
    for var in ("QUANTSERVE_MODEL", "QUANTSERVE_PORT", "QUANTSERVE_QUANTIZE",
                "QUANTSERVE_QUANTIZE_CONFIG", "QUANTSERVE_ADMIN_TOKEN"):
        assert var in text


def test_missing_model_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    out = _cli("serve", "--model", str(missing), "--port", "0")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert str(missing) in lines[0]
    assert "Traceback" not in out.stderr


def test_unreadable_model_file_fails_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"not a model")
    out = _cli("serve", "--model", str(bad), "--port", "0")
    assert out.returncode == 2
    assert str(bad) in out.stderr and "Traceback" not in out.stderr


def test_bad_setting_fails_with_one_line() -> None:
    out = _cli("serve", "--port", "0", env={"QUANTSERVE_QUANTIZE_CONFIG": "{not json"})
    assert out.returncode == 2
    assert "quantize_config" in out.stderr and "Traceback" not in out.stderr


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import build_parser, settings_from_args

    monkeypatch.setenv("QUANTSERVE_PORT", "9001")
    monkeypatch.setenv("QUANTSERVE_MAX_NUM_SEQS", "3")
    args = build_parser().parse_args(["serve", "--port", "9002"])
    settings: Settings = settings_from_args(args, ["port", "max_num_seqs"])
    assert settings.port == 9002
    assert settings.max_num_seqs == 3
    assert settings.host == "127.0.0.1"  # binds loopback unless told otherwise


def test_old_limit_names_still_work_with_a_deprecation_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from server.cli import build_parser, settings_from_args

    monkeypatch.setenv("QUANTSERVE_MAX_BATCH", "3")
    args = build_parser().parse_args(["serve", "--max-batch-tokens", "1024"])
    with pytest.warns(FutureWarning) as caught:
        settings: Settings = settings_from_args(args, ["max_batch_tokens"])
    messages = sorted(str(w.message).split(" is ")[0] for w in caught)
    assert messages == ["max_batch (QUANTSERVE_MAX_BATCH)",
                        "max_batch_tokens (QUANTSERVE_MAX_BATCH_TOKENS)"]
    assert settings.max_num_seqs == 3
    assert settings.max_model_len == 1024
    assert settings.max_num_batched_tokens == 1024
    # The new name wins when both are given.
    monkeypatch.setenv("QUANTSERVE_MAX_NUM_SEQS", "5")
    with pytest.warns(FutureWarning, match="max_batch .*max_num_seqs"):
        assert Settings().max_num_seqs == 5


def test_a_step_must_fit_one_sequence() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_num_batched_tokens"):
        Settings(max_model_len=2048, max_num_batched_tokens=1024)


def test_a_bad_kv_cache_dtype_fails_with_one_line_naming_the_setting() -> None:
    out = _cli("serve", "--port", "0", env={"QUANTSERVE_KV_CACHE_DTYPE": "fp8"})
    assert out.returncode == 2
    assert out.stderr.startswith("quantserve: invalid setting kv_cache_dtype:")
    assert "'auto' or 'int8'" in out.stderr and "Traceback" not in out.stderr
    flag = _cli("serve", "--port", "0", "--kv-cache-dtype", "fp8")
    assert flag.returncode == 2 and "--kv-cache-dtype: invalid choice: 'fp8'" in flag.stderr
