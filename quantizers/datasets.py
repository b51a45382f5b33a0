"""Where the bundled texts live: `quantizers/data/`, shipped inside the package.

`QUANTSERVE_DATA_DIR` is an optional extra location: a file there with the same
relative path (e.g. `calibration/tinyshakespeare.txt`) is read instead of the
bundled copy, so an operator can swap a text without rebuilding the image.
"""

from __future__ import annotations

import os
from pathlib import Path

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"


def data_file(relative: Path) -> Path:
    """The override in `QUANTSERVE_DATA_DIR` when it exists, else the bundled file."""
    override = os.environ.get("QUANTSERVE_DATA_DIR")
    if override:
        candidate = Path(override).expanduser() / relative
        if candidate.is_file():
            return candidate
    return BUNDLED_DATA_DIR / relative
