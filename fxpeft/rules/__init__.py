"""Declarative rules: what to adapt (``match`` + ``where``) and how (``rewrite`` + ``params``)."""

from fxpeft.rules.loader import load_rules, parse_rules
from fxpeft.rules.schema import LoraParams, Rule, RuleSet, Where, rewrite_kinds

__all__ = ["LoraParams", "Rule", "RuleSet", "Where", "load_rules", "parse_rules", "rewrite_kinds"]
