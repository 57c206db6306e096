"""Write a ``RuleSet`` back as TOML rule-file text that ``parse_rules`` reads to the same rules.

>>> from fxpeft.rules import parse_rules, load_rules
>>> rules = load_rules("lora_qv")
>>> parse_rules(dump_rules(rules)).rules == rules.rules
True
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fxpeft.rules.schema import Rule, RuleSet


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str) and "'" not in value and value.isprintable():
        return f"'{value}'"  # a literal string keeps regex backslashes readable
    return json.dumps(value, ensure_ascii=False)  # TOML has no surrogate escapes


def _table(obj: Any) -> list[str]:
    return [f"{f.name} = {_value(getattr(obj, f.name))}" for f in dataclasses.fields(obj)
            if getattr(obj, f.name) is not None]


def _rule(rule: Rule) -> list[str]:
    lines = ["[[rule]]", f"name = {_value(rule.name)}", f"match = {_value(rule.match)}",
             f"rewrite = {_value(rule.rewrite)}", f"optional = {_value(rule.optional)}"]
    return lines + ["", "[rule.where]", *_table(rule.where), "", "[rule.params]",
                    *_table(rule.params), ""]


def dump_rules(rules: RuleSet, description: str = "") -> str:
    """TOML text for ``rules``."""
    head = [f"version = {rules.version}", f"description = {_value(description or rules.source)}", ""]
    return "\n".join(head + [line for rule in rules.rules for line in _rule(rule)])
