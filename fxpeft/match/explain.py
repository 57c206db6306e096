"""``explain``: per rule, what matched, and for a rule that matched nothing, what it nearly hit."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field

from fxpeft.match.query import MatchResult
from fxpeft.capture.program import Program
from fxpeft.rules.schema import RuleSet

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


@dataclass
class RuleReport:
    name: str
    rewrite: str
    matched: list[str]
    optional: bool
    closest: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    bound: dict[str, str] = field(default_factory=dict)  # path -> what a pattern bound there


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
        reports.append(RuleReport(rule.name, rule.rewrite, matched, rule.optional, closest, reasons,
                                  bound))
    return Explanation(program.model_class, reports)
