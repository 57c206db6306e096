"""The pass protocol and the pass manager.

A pass states the rewrite kind it consumes, changes the graph, and returns what it changed.
The manager runs passes in a fixed order, lints and recompiles after each, logs name / match
count / time, and names the failing pass (and those before it) in any error.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from fxpeft.errors import FxpeftError, PassError
from fxpeft.match import Match
from fxpeft.program import Program

log = logging.getLogger("fxpeft")


@dataclass(frozen=True)
class PassResult:
    """What one pass did: ``str(result)`` is its one-line report."""

    name: str
    matches: int
    nodes_added: int
    parameters_added: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.name}: {self.matches} matches, +{self.nodes_added} nodes, "
                f"+{self.parameters_added:,d} parameters ({self.seconds * 1000:.0f} ms)")


class RewritePass(Protocol):
    name: str
    kind: str  # the rule ``rewrite`` kind whose matches this pass consumes

    def run(self, program: Program, matches: list[Match]) -> None:
        """Splice the graph for ``matches``. Must leave the graph valid."""


@dataclass(frozen=True)
class SplicePass:
    """A rewrite pass that splices one branch per match with
    ``splice(graph_module, site, params, adapter)``; its ``kind`` is its name.

    >>> SplicePass("lora", print).kind
    'lora'
    """

    name: str
    splice: Callable[..., object]

    @property
    def kind(self) -> str:
        return self.name

    def run(self, program: Program, matches: list[Match]) -> None:
        adapter = program.info.get("adapter", "default")
        for found in matches:
            self.splice(program.graph_module, found.site, found.rule.params, adapter)


def _count_parameters(program: Program) -> int:
    return sum(p.numel() for p in program.graph_module.parameters())


def run_passes(program: Program, matches: list[Match], passes: list[RewritePass]) -> list[PassResult]:
    """Run ``passes`` in order over the matches of their kind; returns one result per pass run.

    >>> run_passes(None, [], [])
    []
    """
    results: list[PassResult] = []
    for rewrite_pass in passes:
        mine = [m for m in matches if m.rule.rewrite == rewrite_pass.kind]
        if mine:
            results.append(_run_one(program, mine, rewrite_pass, results))
    return results


def _run_one(program: Program, matches: list[Match], rewrite_pass: RewritePass,
             earlier: list[PassResult]) -> PassResult:
    nodes, params, start = len(program.graph.nodes), _count_parameters(program), time.perf_counter()
    try:
        rewrite_pass.run(program, matches)
        program.graph.lint()
        program.graph_module.recompile()
    except Exception as err:
        before = ", ".join(r.name for r in earlier) or "none"
        first_line = (str(err).strip().splitlines() or [""])[0][:500]
        detail = first_line if isinstance(err, FxpeftError) else f"{type(err).__name__}: {first_line}"
        raise PassError(f"pass {rewrite_pass.name!r} failed: {detail} (passes run before it: "
                        f"{before})") from err
    result = PassResult(rewrite_pass.name, len(matches), len(program.graph.nodes) - nodes,
                        _count_parameters(program) - params, time.perf_counter() - start)
    log.info("fxpeft pass %s", result)
    return result
