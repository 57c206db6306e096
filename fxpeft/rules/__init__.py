"""Declarative rules: what to adapt (``match`` + ``where``) and how (``rewrite`` + ``params``).

Rules sit below the kinds: they know each kind's params class only through the registry
(``fxpeft.registry``), so ``fxpeft.rules.LoraParams`` is looked up there, not imported.

>>> import fxpeft
>>> fxpeft.rules.LoraParams(r=4).r
4
"""

from typing import Any

from fxpeft import registry
from fxpeft.registry import rewrite_kinds
from fxpeft.rules.loader import load_rules, parse_rules
from fxpeft.rules.schema import Params, Rule, RuleSet, Where

__all__ = ["LoraParams", "Params", "Rule", "RuleSet", "Where", "load_rules", "parse_rules",
           "rewrite_kinds"]


def __getattr__(name: str) -> Any:
    """``LoraParams``: the params class of the kind a rule without ``rewrite`` gets."""
    if name == "LoraParams":
        return registry.default_kind().params
    raise AttributeError(f"module 'fxpeft.rules' has no attribute {name!r}")
