"""Which LoRA adapters the engine holds: names, use counts, least-recently-used order.

An adapter is *listed* (selectable by name) from its load until it is
unloaded or evicted; it stays *resident* (its factors in the stacks) while
sequences that started with it are still running, so an unload lets them
finish. At most `max_loras` are listed; loading one more evicts the least
recently used. Pure bookkeeping: the engine calls it under its lock and
rebuilds the stacks when `changed` says the resident set moved.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

from quantizers.lora import LoraAdapter

_uids = itertools.count(1)


class UnknownAdapter(LookupError):
    """No listed adapter has that name."""


class DuplicateAdapter(ValueError):
    """An adapter of that name is already loaded."""


@dataclass(eq=False)
class Resident:
    name: str
    adapter: LoraAdapter
    source: str  # where it was loaded from
    uid: int = field(default_factory=lambda: next(_uids))  # never reused: a prefix-cache namespace
    created: int = field(default_factory=lambda: int(time.time()))
    users: int = 0  # sequences holding it
    listed: bool = True


class AdapterRegistry:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 1:
            raise ValueError("max_loras must be at least 1")
        self.max_loras = max_loras
        self._listed: dict[str, Resident] = {}  # least recently used first
        self._draining: list[Resident] = []  # unlisted, still used by running sequences
        self.changed = False

    def listed(self) -> list[Resident]:
        return list(self._listed.values())

    def resident(self) -> list[Resident]:
        return [*self._listed.values(), *self._draining]

    def add(self, name: str, adapter: LoraAdapter, source: str) -> list[str]:
        """List a new adapter; returns the names evicted to make room."""
        if name in self._listed:
            raise DuplicateAdapter(f"an adapter named {name!r} is already loaded; unload it first")
        evicted = []
        while len(self._listed) >= self.max_loras:
            oldest = next(iter(self._listed))
            self.remove(oldest)
            evicted.append(oldest)
        self._listed[name] = Resident(name, adapter, source)
        self.changed = True
        return evicted

    def remove(self, name: str) -> None:
        resident = self._listed.pop(name, None)
        if resident is None:
            raise UnknownAdapter(f"no adapter named {name!r} is loaded")
        resident.listed = False
        if resident.users:
            self._draining.append(resident)
        self.changed = True

    def acquire(self, name: str) -> Resident:
        """The listed adapter `name` for a new sequence (now the most recently used)."""
        resident = self._listed.get(name)
        if resident is None:
            raise UnknownAdapter(f"no adapter named {name!r} is loaded")
        self._listed[name] = self._listed.pop(name)
        resident.users += 1
        return resident

    def release(self, resident: Resident) -> None:
        resident.users -= 1
        if not resident.listed and resident.users == 0:
            self._draining.remove(resident)
            self.changed = True
