"""Declarative rules: what to adapt (``match`` + ``where``) and how (``rewrite`` + ``params``)."""

from fxpeft.kinds.lora import LoraParams
from fxpeft.kinds.registry import rewrite_kinds
from fxpeft.rules.loader import load_rules, parse_rules
from fxpeft.rules.schema import Params, Rule, RuleSet, Where

__all__ = ["LoraParams", "Params", "Rule", "RuleSet", "Where", "load_rules", "parse_rules",
           "rewrite_kinds"]
