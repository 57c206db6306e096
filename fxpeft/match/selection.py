"""Nothing silently less than asked: a selector that selects nothing is an error.

After matching, ``check_selection`` refuses (``MatchError``, one line naming the selector, the
``file:line`` it came from and the closest names that exist):

- a rule that is not ``optional`` and matched nothing (saying so when the module it aims at
  exists but is another kind of layer: ``input_layernorm`` is a ``LlamaRMSNorm``, not a linear);
- a ``layers`` index the model does not have (``layers = [0, 7]`` on a 2-layer model);
- a name in a keyword selector (``modules_to_save=[...]``) that names no module;
- a rule set whose rules together adapt nothing (every rule optional, none matched).

``allow_empty`` (the rule file's top-level key, or ``rewrite(..., allow_empty=True)``) allows
the last three; ``optional = true`` keeps meaning "this one rule may match nothing".
"""

from __future__ import annotations

import difflib
from typing import Callable, Sequence

import torch

from fxpeft.errors import MatchError
from fxpeft.capture.program import Program
from fxpeft.match.explain import closest_names, other_layers_note
from fxpeft.match.query import MatchResult
from fxpeft.rules.schema import RuleSet

ALLOW = "set allow_empty = true at the top of the rule file (or pass allow_empty=True) to allow this"


def _rule_line(ruleset: RuleSet, index: int) -> str:
    return ruleset.located(f"rule[{index}]")


def _missing_rule(program: Program, ruleset: RuleSet, result: MatchResult, index: int) -> str:
    rule = ruleset.rules[index]
    reasons = [m.module_path for m in result.misses if m.rule_index == index]
    note = other_layers_note(program, rule)
    closest = ", ".join(closest_names(rule.where.path or ("",), reasons)) or "none"
    hint = f"; {note}" if note else ""
    return (f"{_rule_line(ruleset, index)}: rule {rule.name!r} (match = {rule.match!r}) matched "
            f"nothing in {program.model_class}{hint}; closest module names: {closest} (set "
            f"optional = true to allow this; fxpeft.explain shows why)")


def _absent_layer(program: Program, ruleset: RuleSet, index: int) -> str | None:
    layers = ruleset.rules[index].where.layers
    if not layers:
        return None
    count = program.layer_count
    absent = [i for i in layers if not -count <= i < count]
    if not absent:
        return None
    have = f"layers 0-{count - 1}" if count else "no numbered layers"
    return (f"{ruleset.located(f'rule[{index}].where.layers')}: rule "
            f"{ruleset.rules[index].name!r}: layers = {list(layers)}, but "
            f"{program.model_class} has {have}: no layer {absent[0]}; {ALLOW}")


def _absent_name(program: Program, keyword: str, names: Sequence[str],
                 sites: Callable[[torch.nn.Module, Sequence[str]], list]) -> str | None:
    gm = program.graph_module
    for name in names:
        if not sites(gm, [name]):
            leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in gm.named_modules() if p})
            close = difflib.get_close_matches(name, leaves, n=3, cutoff=0.5) or leaves[:3]
            return (f"{keyword}={list(names)}: {name!r} names no module of {program.model_class}; closest "
                    f"module names: {', '.join(close) or 'none'}; {ALLOW}")
    return None


def _adapts_nothing(program: Program, ruleset: RuleSet, result: MatchResult) -> str:
    reports = [f"{rule.name!r} ({_rule_line(ruleset, i)})" for i, rule in enumerate(ruleset.rules)]
    misses = [m.module_path for m in result.misses]
    patterns = tuple(p for rule in ruleset.rules for p in rule.where.path) or ("",)
    notes = [n for rule in ruleset.rules if (n := other_layers_note(program, rule))]
    hint = f"; {notes[0]}" if notes else ""
    return (f"{ruleset.source}: the rules adapt nothing in {program.model_class}: every rule is "
            f"optional and none matched ({', '.join(reports)}){hint}; closest module names: "
            f"{', '.join(closest_names(patterns, misses)) or 'none'}; {ALLOW}")


def check_selection(program: Program, ruleset: RuleSet, result: MatchResult,
                    keywords: dict[str, tuple[Sequence[str], Callable]] | None = None,
                    allow_empty: bool = False) -> None:
    """Refuse what selects nothing (see the module docstring); ``keywords`` maps a keyword
    selector (``modules_to_save``) to its names and the function that finds their sites.

    >>> from fxpeft.capture.export import capture
    >>> from fxpeft.match.query import match
    >>> from fxpeft.rules import Rule, RuleSet, Where
    >>> program = capture(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    >>> rules = RuleSet([Rule(where=Where(path=["^9$"]), optional=True)])
    >>> check_selection(program, rules, match(program, rules))
    Traceback (most recent call last):
    ...
    fxpeft.errors.MatchError: <python>: the rules adapt nothing in Sequential: every rule is optional and none matched ('rule[0]' (<python>)); closest module names: 0; set allow_empty = true at the top of the rule file (or pass allow_empty=True) to allow this
    """
    allow_empty = allow_empty or ruleset.allow_empty
    keywords = keywords or {}
    matched = {m.rule_index for m in result.matches}  # once: a rule file may hold 100k rules
    for index in range(len(ruleset.rules)):
        problem = None if allow_empty else _absent_layer(program, ruleset, index)
        if problem is None and not ruleset.rules[index].optional and index not in matched:
            problem = _missing_rule(program, ruleset, result, index)
        if problem:
            raise MatchError(problem)
    if allow_empty:
        return
    for keyword, (names, sites) in keywords.items():
        problem = _absent_name(program, keyword, names, sites)
        if problem:
            raise MatchError(problem)
    if not result.matches and not any(names for names, _ in keywords.values()):
        raise MatchError(_adapts_nothing(program, ruleset, result))
