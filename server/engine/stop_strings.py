"""Stop-string matching over streamed text.

A stop string may arrive split over several tokens, so text that could be the
start of one is held back until it is either completed (generation stops and
the stop string is never shown) or ruled out (the text is released).
"""

from __future__ import annotations


class StopMatcher:
    """Feeds on text pieces; releases text that can no longer be part of a stop."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Return the text that is safe to emit; sets `stopped` on a match."""
        if not self._stops:
            return text
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)]
        keep = self._pending_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Release held text when generation ends for another reason."""
        held, self._held = self._held, ""
        return held

    def _pending_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that begins some stop string."""
        best = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:size]):
                    best = size
                    break
        return best
