"""Metric names used inside PromQL expressions."""

from __future__ import annotations

import re

# Series names of this server and the standard process collector. Recording
# rules (`quantserve:...`) use colons, so they never match.
_SERIES = re.compile(r"\b(?:quantserve|process)_[a-z0-9_]+\b")


def series_names(expr: str) -> set[str]:
    return set(_SERIES.findall(expr))
