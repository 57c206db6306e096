"""Find the line of a dotted key (``rule[0].params.r``) in TOML text.

tomllib returns plain dicts with no positions, so this scans the text once and records where
each table header and key appears. It only needs to be good enough to point a user at a line.
"""

from __future__ import annotations

import re

_ARRAY_HEADER = re.compile(r"^\s*\[\[\s*([\w.\"'-]+)\s*\]\]")
_TABLE_HEADER = re.compile(r"^\s*\[\s*([\w.\"'-]+)\s*\]")
_KEY = re.compile(r"^\s*([\w.\"'-]+)\s*=")
_INLINE_KEY = re.compile(r"([\w\"'-]+)\s*=")


def _clean(dotted: str) -> list[str]:
    return [part.strip().strip("\"'") for part in dotted.split(".")]


class KeyLocator:
    """Maps dotted keys to 1-based line numbers.

    >>> KeyLocator('version = 1\\n[[rule]]\\n[rule.params]\\nr = 8\\n').line_of("rule[0].params.r")
    4
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        self._arrays: dict[str, int] = {}
        table = ""
        for number, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0] if '"' not in line and "'" not in line else line
            table = self._scan(line, number, table)

    def _scan(self, line: str, number: int, table: str) -> str:
        if m := _ARRAY_HEADER.match(line):
            name = ".".join(_clean(m.group(1)))
            index = self._arrays[name] = self._arrays.get(name, -1) + 1
            table = f"{name}[{index}]"
        elif m := _TABLE_HEADER.match(line):
            table = self._resolve(_clean(m.group(1)))
        elif m := _KEY.match(line):
            key = f"{table}.{'.'.join(_clean(m.group(1)))}".lstrip(".")
            self.lines.setdefault(key, number)
            if "{" in line:
                for inner in _INLINE_KEY.findall(line.split("{", 1)[1]):
                    self.lines.setdefault(f"{key}.{inner.strip(chr(34) + chr(39))}", number)
            return table
        else:
            return table
        self.lines.setdefault(table, number)
        return table

    def _resolve(self, parts: list[str]) -> str:
        """``[rule.params]`` after ``[[rule]]`` belongs to the latest ``rule`` element."""
        head = parts[0]
        if head in self._arrays:
            return ".".join([f"{head}[{self._arrays[head]}]"] + parts[1:])
        return ".".join(parts)

    def line_of(self, key: str) -> int | None:
        """The line of ``key``, or of its nearest enclosing key that was seen."""
        while key:
            if key in self.lines:
                return self.lines[key]
            if key.endswith("]"):  # rule[0] of an inline array: the array's own line
                key = key[:key.rindex("[")]
            else:
                key = key.rsplit(".", 1)[0] if "." in key else ""
        return None


class LazyKeyLocator:
    """A ``KeyLocator`` built on first use: the lines of a file whose rules all apply are never
    scanned (a rule set keeps one, for errors found after matching).

    >>> LazyKeyLocator('version = 1\\n[[rule]]\\nname = "q"\\n').line_of("rule[0].name")
    3
    """

    def __init__(self, text: str) -> None:
        self._text: str | None = text
        self._built: KeyLocator | None = None

    def line_of(self, key: str) -> int | None:
        if self._built is None:
            self._built, self._text = KeyLocator(self._text or ""), None
        return self._built.line_of(key)
