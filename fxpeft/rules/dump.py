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

from fxpeft.errors import RuleError
from fxpeft.rules.schema import Rule, RuleSet


def _basic_string(value: str) -> str:
    """A TOML basic string: TOML forbids raw control characters, DEL (U+007F) included."""
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise RuleError(f"{value!r} holds a lone surrogate, which TOML cannot represent")
    escaped = (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
               else "\\" + c if c in '"\\' else c for c in value)
    return '"' + "".join(escaped) + '"'


def _value(value: Any) -> str:
    """One TOML value.

    >>> _value("a\x7fb"), _value(["q_proj$", 2])
    ('"a\\\\u007fb"', "['q_proj$', 2]")
    """
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, str) and "'" not in value and value.isprintable():
        return f"'{value}'"  # a literal string keeps regex backslashes readable
    if isinstance(value, str):
        return _basic_string(value)
    return json.dumps(value)


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
    head = [f"version = {rules.version}", f"description = {_value(description or rules.source)}",
            f"allow_training_branches = {_value(rules.allow_training_branches)}",
            *(["allow_empty = true"] if rules.allow_empty else []),
            *([f"layer_replication = {_value(rules.layer_replication)}"] if rules.layer_replication else []), ""]
    return "\n".join(head + [line for rule in rules.rules for line in _rule(rule)])
