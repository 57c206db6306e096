"""The one bounded cache: a mapping that keeps its ``size`` most recently used entries. The
capture cache, the decode graphs and the fused copies each hold one.

>>> cache = BoundedCache(2)
>>> cache.get_or_build("a", lambda: 1), cache.get_or_build("b", lambda: 2)
(1, 2)
>>> cache.get_or_build("a", lambda: 0)  # a hit: the old value, now the most recent
1
>>> cache.keep("c", 3); list(cache)  # "b" was the least recently used
['a', 'c']
>>> cache.recall("b") is None, cache.recall("a")
(True, 1)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, TypeVar

Value = TypeVar("Value")


class BoundedCache(OrderedDict):
    """Least recently used entries go first once more than ``size`` are kept."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def keep(self, key: Hashable, value: object) -> None:
        """Store ``value`` as the most recent entry, dropping the oldest past ``size``."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)

    def recall(self, key: Hashable) -> object:
        """The value under ``key`` (now the most recent), or None."""
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def get_or_build(self, key: Hashable, build: Callable[[], Value]) -> Value:
        """The value under ``key``, built and kept on a miss."""
        if key not in self:
            self.keep(key, build())
        return self.recall(key)  # type: ignore[return-value]

    def __reduce__(self) -> tuple:
        return type(self), (self.size,)  # a pickled cache starts empty
