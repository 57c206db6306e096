"""The exceptions fxpeft raises. Every one says where the problem is."""

from __future__ import annotations


class FxpeftError(Exception):
    """Base class of every error fxpeft raises on purpose."""


class RuleError(FxpeftError, ValueError):
    """A rule file or rule object is malformed.

    Carries the file, the line (when known) and the dotted key, e.g.
    ``lora_qv.toml:12: rule[0].params.r: expected a positive integer, got "eight"``.

    >>> str(RuleError("expected a positive integer", file="x.toml", line=3, key="rule[0].params.r"))
    'x.toml:3: rule[0].params.r: expected a positive integer'
    """

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.message, self.file, self.line, self.key = message, file, line, key
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.file or "<rules>"
        if self.line is not None:
            where += f":{self.line}"
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class CaptureError(FxpeftError, RuntimeError):
    """The model could not be captured into a graph."""


class MatchError(FxpeftError, LookupError):
    """A rule matched nothing, or matched something it cannot rewrite."""


class InputError(FxpeftError, ValueError):
    """A call's input does not fit what the graph was captured for (dtype, shape, token ids);
    the message names the argument."""


class PassError(FxpeftError, RuntimeError):
    """A rewrite pass failed; the message names the pass and those that ran before it."""
