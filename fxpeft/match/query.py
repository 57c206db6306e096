"""Matching is a pure query: it reads a ``Program`` and a ``RuleSet`` and returns records.

Nothing here mutates the graph. A failed candidate carries its reason, which is what makes
``explain`` and the "matched nothing" errors cheap.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx

from fxpeft.match.attention import find_attention_sites, find_sdpa_sites
from fxpeft.match.input_embedding import find_input_embeddings
from fxpeft.match.layer_sites import find_conv_sites, find_embedding_sites
from fxpeft.match.parameter_sites import find_parameter_sites
from fxpeft.match.residual import find_residual_sites
from fxpeft.capture.program import Program, layer_index
from fxpeft.rules.checks import compiled_regex
from fxpeft.rules.schema import Rule, RuleSet, Where


@dataclass(frozen=True)
class Candidate:
    """Something a rule can match: a linear site, an attention block, ... ``site`` is the
    pattern-specific record (e.g. ``LinearSite``) that the rewrite pass consumes."""

    module_path: str
    module_type: str
    node: torch.fx.Node
    site: Any

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)


@dataclass(frozen=True)
class Match:
    """A rule bound to a candidate."""

    rule_index: int
    rule: Rule
    candidate: Candidate

    @property
    def module_path(self) -> str:
        return self.candidate.module_path

    @property
    def site(self) -> Any:
        return self.candidate.site


@dataclass(frozen=True)
class Miss:
    """Why rule ``rule_index`` did not match ``module_path``."""

    rule_index: int
    module_path: str
    reason: str


@dataclass
class MatchResult:
    matches: list[Match] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)

    def for_rule(self, index: int) -> list[Match]:
        return [m for m in self.matches if m.rule_index == index]

    def paths(self, index: int | None = None) -> list[str]:
        """Matched module paths, for one rule or all.

        >>> MatchResult().paths()
        []
        """
        return [m.module_path for m in self.matches if index is None or m.rule_index == index]


def _linear_candidates(program: Program) -> list[Candidate]:
    return [Candidate(s.module_path, s.module_type, s.node, s) for s in program.sites]


def _attention_candidates(program: Program) -> list[Candidate]:
    return [Candidate(s.module_path, s.module_type, s.output, s) for s in find_attention_sites(program)]


def _layer_candidates(find: Callable[[torch.fx.GraphModule], list[Any]]) -> Callable[[Program], list[Candidate]]:
    """Candidates of a per-layer pattern (embedding, conv) found afresh in the graph."""
    return lambda program: [Candidate(s.module_path, s.module_type, s.node, s)
                            for s in find(program.graph_module)]


# match kind -> how to enumerate its candidates. Patterns for new kinds register here.
CANDIDATE_FINDERS: dict[str, Callable[[Program], list[Candidate]]] = {
    "linear": _linear_candidates, "attention": _attention_candidates}
CANDIDATE_FINDERS["embedding"] = _layer_candidates(find_embedding_sites)
CANDIDATE_FINDERS["conv"] = _layer_candidates(find_conv_sites)
CANDIDATE_FINDERS["input_embedding"] = _layer_candidates(find_input_embeddings)
CANDIDATE_FINDERS["residual"] = lambda program: [
    Candidate(s.module_path, s.module_type, s.node, s) for s in find_residual_sites(program)]
CANDIDATE_FINDERS["attention_op"] = _layer_candidates(find_sdpa_sites)
CANDIDATE_FINDERS["parameter"] = _layer_candidates(find_parameter_sites)


def candidates(program: Program, kind: str) -> list[Candidate]:
    return CANDIDATE_FINDERS[kind](program)


def _type_matches(wanted: tuple[str, ...], qualified: str) -> bool:
    return any(qualified == w or qualified.rsplit(".", 1)[-1] == w for w in wanted)


def _resolve_range(where: Where, layer_count: int) -> tuple[int, int] | None:
    if where.layer_range is None:
        return None
    return tuple(i + layer_count if i < 0 else i for i in where.layer_range)  # type: ignore[return-value]


def why_not(where: Where, candidate: Candidate, layer_count: int,
            regex: Callable[[str], "re.Pattern[str]"] = compiled_regex) -> str | None:
    """The first ``where`` constraint ``candidate`` fails, or None when it passes them all.
    ``regex`` compiles a path pattern (by default the rules' own cache, which validation filled).

    >>> c = Candidate("model.layers.3.mlp.up_proj", "Linear", None, None)
    >>> why_not(Where(path=["q_proj"]), c, 4)
    "path matches none of ['q_proj']"
    """
    path = candidate.module_path
    if where.path and not any(regex(p).search(path) for p in where.path):
        return f"path matches none of {list(where.path)}"
    excluded = next((p for p in where.exclude if regex(p).search(path)), None)
    if excluded:
        return f"excluded by {excluded!r}"
    if where.module_type and not _type_matches(where.module_type, candidate.module_type):
        return f"type {candidate.module_type.rsplit('.', 1)[-1]} not in {list(where.module_type)}"
    return _layer_problem(where, candidate.layer, layer_count)


def _layer_problem(where: Where, layer: int | None, layer_count: int) -> str | None:
    if where.layers is None and where.layer_range is None:
        return None
    if layer is None:
        return "not inside a numbered layer"
    if where.layers is not None and layer not in where.layers:
        return f"layer {layer} not in {list(where.layers)}"
    bounds = _resolve_range(where, layer_count)
    if bounds and not bounds[0] <= layer <= bounds[1]:
        return f"layer {layer} outside [{bounds[0]}, {bounds[1]}]"
    return None


def match(program: Program, rules: RuleSet) -> MatchResult:
    """Bind every rule to the candidates it selects. First match wins across rules.

    >>> import torch
    >>> from fxpeft.capture.export import capture
    >>> from fxpeft.rules import Rule, RuleSet, Where
    >>> program = capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)))
    >>> match(program, RuleSet([Rule(where=Where(path=["^1$"]))])).paths()
    ['1']
    """
    result, claimed, layer_count = MatchResult(), {}, program.layer_count
    found: dict[str, list[Candidate]] = {}  # per match kind, enumerated once for all rules
    for index, rule in enumerate(rules.rules):
        if rule.match not in found:
            found[rule.match] = candidates(program, rule.match)
        for candidate in found[rule.match]:
            reason = why_not(rule.where, candidate, layer_count)
            key = (rule.match, candidate.module_path)  # a module called twice is one target
            if reason is None and claimed.get(key, index) != index:
                reason = f"already claimed by {rules.rules[claimed[key]].name!r} (first match wins)"
            if reason is None:
                claimed[key] = index
                result.matches.append(Match(index, rule, candidate))
            else:
                result.misses.append(Miss(index, candidate.module_path, reason))
    return result
