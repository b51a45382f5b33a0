"""The load script refuses to load anything but loopback, or without bounds
(fast: no server)."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.helpers.server_process import REPO_ROOT


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("load_test", REPO_ROOT / "bench" /
                                                  "load_test.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv", [
    ["--base-url", "http://example.com:8000"],
    ["--base-url", "http://10.0.0.5:8000"],
    ["--base-url", "http://127.0.0.1.nip.io:8000"],
    ["--clients", "0"],
    ["--clients", "257"],
    ["--duration", "0"],
    ["--duration", "601"],
])
def test_refuses_remote_targets_and_unbounded_runs(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(argv)
    assert exit_info.value.code == 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:9", "http://[::1]:1"])
def test_accepts_loopback(url: str) -> None:
    args = load_script().parse_args(["--base-url", url, "--clients", "256", "--duration", "600"])
    assert args.base_url == url


def test_quantiles() -> None:
    quantile = load_script().quantile
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == pytest.approx(50.5, abs=0.5)
    assert quantile(values, 0.95) == pytest.approx(95.05, abs=0.5)
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.95) == 3.0
