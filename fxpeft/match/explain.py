"""``explain``: per rule, what matched, and for a rule that matched nothing, what it nearly hit."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from fxpeft.match.query import MatchResult, candidates
from fxpeft.capture.program import Program
from fxpeft.rules.schema import Rule, RuleSet

_REGEX_SYNTAX = re.compile(r"\\.|[\^\$\(\)\[\]\{\}\|\*\+\?]")


def _literal(pattern: str) -> str:
    """The plain words in a path regex: ``(^|\\.)q_prj$`` -> ``q_prj``."""
    return _REGEX_SYNTAX.sub(" ", pattern).replace(".", " ").strip().split(" ")[-1]


def closest_names(patterns: tuple[str, ...], paths: list[str], limit: int = 5) -> list[str]:
    """Module names in ``paths``, those closest to the literal parts of ``patterns`` first.

    >>> closest_names(("q_prj",), ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"])
    ['q_proj', 'up_proj']
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    found: list[str] = []
    for pattern in patterns:
        for name in difflib.get_close_matches(_literal(pattern), leaves, n=limit, cutoff=0.5):
            if name not in found:
                found.append(name)
    # then the rest, so a family with other names (GPT-2's c_attn) still shows what it has
    return (found + [leaf for leaf in leaves if leaf not in found])[:limit]


def _module_types(program: Program) -> dict[str, str]:
    """Every module path of the captured model -> its class name (``LlamaRMSNorm``).

    Exported graphs name their modules in each node's ``nn_module_stack``; symbolic_trace graphs
    keep the modules themselves.
    """
    found: dict[str, str] = {}
    for node in program.graph.nodes:
        for path, qualified in node.meta.get("nn_module_stack", {}).values():
            name = getattr(qualified, "__name__", None) or str(qualified).rsplit(".", 1)[-1]
            found.setdefault(path, name)  # a qualified name, or the class itself
    for path, module in program.graph_module.named_modules():
        found.setdefault(path, type(module).__name__)
    return {path: kind for path, kind in found.items() if path and not path.startswith("_")}


def _other_layers(program: Program, rule: Rule) -> list[tuple[str, str]]:
    """Modules whose path the rule's ``path`` selects but which are no candidate of its match kind:
    (path, class name), e.g. ``("model.layers.0.input_layernorm", "LlamaRMSNorm")``."""
    if not rule.where.path:
        return []
    sites = {c.module_path for c in candidates(program, rule.match)}
    return [(path, kind) for path, kind in _module_types(program).items()
            if path not in sites and any(re.search(p, path) for p in rule.where.path)]


def unadapted_targets(program: Program, ruleset: RuleSet, result: MatchResult) -> list[tuple[str, str]]:
    """Modules some rule's ``path`` selects (and its ``exclude`` does not) that are no candidate
    of its match kind and that no match adapted: ``(path, class name)``. For rules made from a PEFT config, each is a layer
    PEFT would adapt that this kind cannot (BOFT on a ``Conv2d``).

    >>> import torch
    >>> from fxpeft.capture.export import capture
    >>> from fxpeft.match.query import match
    >>> from fxpeft.rules import Rule, RuleSet, Where
    >>> program = capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    >>> rules = RuleSet((Rule(where=Where(path=["^(0|1)$"])),))
    >>> unadapted_targets(program, rules, match(program, rules))
    [('1', 'LayerNorm')]
    """
    adapted = {m.module_path for m in result.matches}
    found = {path: kind for rule in ruleset.rules for path, kind in _other_layers(program, rule)
             if path not in adapted and not any(re.search(p, path) for p in rule.where.exclude or ())}
    return sorted(found.items())


def other_layers_note(program: Program, rule: Rule) -> str:
    """``... input_layernorm exists (LlamaRMSNorm), but it is not a linear layer``, or "".

    >>> import torch
    >>> from fxpeft.capture.export import capture
    >>> from fxpeft.rules import Rule, Where
    >>> program = capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2)))
    >>> other_layers_note(program, Rule(where=Where(path=["^1$"])))
    '1 exists (LayerNorm), but it is not a linear layer'
    """
    found = _other_layers(program, rule)
    if not found:
        return ""
    path, kind = found[0]
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{path}{more} exists ({kind}), but it is not a {rule.match} layer"


@dataclass
class RuleReport:
    name: str
    rewrite: str
    matched: list[str]
    optional: bool
    closest: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    bound: dict[str, str] = field(default_factory=dict)  # path -> what a pattern bound there
    note: str = ""  # for a rule that matched nothing: a module it aims at that is another layer


@dataclass
class Explanation:
    """What ``fxpeft.explain`` returns; ``str()`` is the human report.

    ``rules[i].matched`` lists the module paths rule ``i`` matched; ``why(path)`` says, per rule,
    why ``path`` did or did not match.
    """

    model_class: str
    rules: list[RuleReport]

    def why(self, module_path: str) -> dict[str, str]:
        return {r.name: ("matched" if module_path in r.matched else
                         r.reasons.get(module_path, "not a candidate of this rule's match kind"))
                for r in self.rules}

    def __str__(self) -> str:
        lines = [f"{self.model_class}: {len(self.rules)} rule(s)"]
        for report in self.rules:
            lines.append(f"- {report.name} ({report.rewrite}): {len(report.matched)} match(es)")
            for path in report.matched:
                lines.append(f"    {path}")
                lines += [f"      bound: {report.bound[path]}"] if path in report.bound else []
            if not report.matched:
                lines.append(f"    nothing matched{' (optional)' if report.optional else ''}; "
                             f"closest module names: {', '.join(report.closest) or 'none'}")
                lines += [f"    {report.note}"] if report.note else []
        return "\n".join(lines)


def _by_rule(records: list) -> dict[int, list]:
    grouped: dict[int, list] = {}
    for record in records:
        grouped.setdefault(record.rule_index, []).append(record)
    return grouped


def build_explanation(program: Program, rules: RuleSet, result: MatchResult) -> Explanation:
    """Assemble the report from a match result; no graph access beyond its candidates."""
    reports = []
    hits, misses = _by_rule(result.matches), _by_rule(result.misses)  # one pass: linear in rules
    for index, rule in enumerate(rules.rules):
        matched = [m.module_path for m in hits.get(index, ())]
        reasons = {m.module_path: m.reason for m in misses.get(index, ())}
        closest = [] if matched else closest_names(rule.where.path or ("",), list(reasons))
        bound = {m.module_path: m.site.describe() for m in hits.get(index, ())
                 if hasattr(m.site, "describe")}
        note = "" if matched else other_layers_note(program, rule)
        reports.append(RuleReport(rule.name, rule.rewrite, matched, rule.optional, closest, reasons,
                                  bound, note))
    return Explanation(program.model_class, reports)
