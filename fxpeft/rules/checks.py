"""Small value checks shared by the rule dataclasses. Each returns an error message or None."""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

Check = Callable[[Any], "str | None"]


def _show(value: Any) -> str:
    r"""A value as an error message quotes it; control characters stay visible.

    >>> print(_show("eight"), _show(chr(127)))
    "eight" '\x7f'
    """
    if isinstance(value, str) and value.isprintable():
        return f'"{value}"'
    return repr(value)


def positive_int(value: Any) -> str | None:
    """An error message unless ``value`` is a positive integer.

    >>> positive_int(8) is None and positive_int(0) is not None
    True
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return f"expected a positive integer, got {_show(value)}"
    return None


def positive_number(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return f"expected a positive number, got {_show(value)}"
    return None


def probability(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        return f"expected a number in [0, 1), got {_show(value)}"
    return None


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {_show(value)}"


def layer_ranges(value: Any) -> str | None:
    """An error message unless ``value`` is PEFT's ``layer_replication``: ``[start, end)`` pairs
    of integers, ``0 <= start < end`` (the model's layer count is checked at capture).

    >>> layer_ranges([[0, 4], [2, 5]]) is None, layer_ranges([[3, 1]])
    (True, 'expected [start, end] pairs of integers with 0 <= start < end, got [3, 1]')
    """
    if not isinstance(value, (list, tuple)) or not value:
        return f"expected a non-empty list of [start, end] layer ranges, got {_show(value)}"
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
                and 0 <= pair[0] < pair[1]):
            return (f"expected [start, end] pairs of integers with 0 <= start < end, got "
                    f"{_show(list(pair) if isinstance(pair, tuple) else pair)}")
    return None


def text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"expected a non-empty string, got {_show(value)}"


def one_of(*choices: str) -> Check:
    def check(value: Any) -> str | None:
        if value in choices:
            return None
        return f"expected one of {', '.join(map(repr, choices))}, got {_show(value)}"
    return check


def int_list(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, int) for v in value):
        return f"expected a non-empty list of integers, got {_show(value)}"
    return None


def int_pair(value: Any) -> str | None:
    if value is None:
        return None
    problem = int_list(value)
    if problem or len(value) != 2:
        return f"expected [first, last] (two integers), got {_show(value)}"
    lo, hi = value
    if (lo < 0) == (hi < 0) and lo > hi:
        return f"expected first <= last, got {_show(list(value))}"
    return None


# Rule patterns compiled once, for validation and matching alike: ``re``'s own cache holds 512,
# so a file of more rules compiled each again for every candidate (superlinear in practice).
compiled_regex = functools.lru_cache(maxsize=16384)(re.compile)


def regex_list(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, str) or not v for v in value):
        return f"expected a list of regular expressions (strings), got {_show(value)}"
    for pattern in value:
        try:
            compiled_regex(pattern)
        except re.error as err:
            return f"bad regular expression {pattern!r}: {err}"
    return None


def string_list(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or any(not isinstance(v, str) or not v for v in value):
        return f"expected a list of strings, got {_show(value)}"
    return None
