"""PEFT config objects as rules: ``fxpeft.rewrite(model, LoraConfig(...))``.

A PEFT config (any object with PEFT's ``to_dict()`` and ``peft_type``, or a plain dict with a
``peft_type``) is turned into the dict PEFT's ``save_pretrained`` would write, then translated by
the code that reads ``adapter_config.json`` (``kind_for_config``, ``check_fields`` and the kind's
``PeftFormat.to_rules``), so a config object and its saved folder build the same adapter and
fail with the same errors. ``peft`` itself is never imported.

>>> import fxpeft
>>> config = {"peft_type": "LORA", "target_modules": ["q_proj"], "r": 4, "lora_alpha": 8}
>>> found = rules_from_config(as_config(config), None, "<config>")
>>> found.kind.name, found.rules.rules[0].params.r
('lora', 4)
"""

from __future__ import annotations

import enum
import json
import re
import reprlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from fxpeft.errors import FxpeftError
from fxpeft.registry import AdapterKind
from fxpeft.names import MODULES_TO_SAVE
from fxpeft.formats.peft_format import PeftFormatError, check_fields, kind_for_config
from fxpeft.rules.schema import RuleSet

_MODULE_NAME = re.compile(r"[^./\\\x00]+(?:\.[^./\\\x00]+)*")  # dotted names; no path syntax


@dataclass(frozen=True)
class ConfigRules:
    """What a PEFT config says: its kind, the rules selecting its modules, its
    ``modules_to_save``."""

    kind: AdapterKind
    rules: RuleSet
    modules_to_save: tuple[str, ...]


def is_config(value: Any) -> bool:
    """Whether ``rules=`` is a PEFT config: a dict, or an object with ``to_dict`` and
    ``peft_type`` (a rule file name, ``Rule`` or ``RuleSet`` is not).

    >>> is_config({"peft_type": "LORA"}), is_config("lora_qv.toml")
    (True, False)
    """
    return isinstance(value, dict) or (callable(getattr(value, "to_dict", None))
                                       and hasattr(value, "peft_type"))


def config_source(value: Any) -> str:
    """How errors name a config object: its class, as a file name names a folder's config.

    >>> config_source({"peft_type": "IA3"})
    '<IA3 config dict>'
    """
    if isinstance(value, dict):
        peft_type = value.get("peft_type")
        return f"<{getattr(peft_type, 'value', peft_type)} config dict>"
    return type(value).__name__


def _plain(value: Any) -> Any:
    """JSON's form of a config value, as ``save_pretrained`` writes it (sets as sorted lists,
    enums as their values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    raise TypeError(f"{type(value).__name__} is not JSON")


def as_config(value: Any, source: str = "<config>") -> dict[str, Any]:
    """The dict ``adapter_config.json`` would hold for a PEFT config object or dict.

    >>> as_config({"peft_type": "LORA", "target_modules": {"v_proj", "q_proj"}})["target_modules"]
    ['q_proj', 'v_proj']
    """
    raw = value if isinstance(value, dict) else value.to_dict()
    if not isinstance(raw, dict) or "peft_type" not in raw:
        raise PeftFormatError(f"{source}: a PEFT config needs a peft_type (\"LORA\", \"IA3\", ...)")
    try:
        return json.loads(json.dumps(raw, default=_plain, allow_nan=False))
    except (TypeError, ValueError) as err:  # what adapter_config.json could not hold either
        raise PeftFormatError(f"{source}: not a PEFT config that JSON can hold: {err}") from None


def module_names(config: dict[str, Any], source: str) -> tuple[str, ...]:
    """PEFT's ``modules_to_save``: module names, never anything path-like.

    >>> module_names({"modules_to_save": ["classifier"]}, "<config>")
    ('classifier',)
    """
    names = config.get(MODULES_TO_SAVE)
    if names is None:
        return ()
    if not isinstance(names, list) or not all(
            isinstance(name, str) and _MODULE_NAME.fullmatch(name) for name in names):
        raise PeftFormatError(f"{source}: {MODULES_TO_SAVE} must be a list of module names, got "
                              f"{reprlib.repr(names)}")
    return tuple(names)


def optional_rules(rules: RuleSet) -> RuleSet:
    """Rules made from a PEFT config, each optional: its ``target_modules`` may name layers the
    kind has no site for (BOFT's ``Conv2d``), and then the caller names the missing feature
    (``fxpeft.load``: from the file's keys; ``fxpeft.rewrite``: from the targeted layer), never
    a ``MatchError`` about a rule the user did not write. An adapter that adapts nothing is
    still refused by both.

    >>> from fxpeft.rules import Rule
    >>> optional_rules(RuleSet((Rule(),))).rules[0].optional
    True
    """
    return dataclasses.replace(rules, rules=tuple(dataclasses.replace(rule, optional=True)
                                                  for rule in rules.rules))


def rules_from_config(config: dict[str, Any], model: "torch.nn.Module | None",
                      source: str) -> ConfigRules:
    """Translate a PEFT config dict as ``fxpeft.load`` translates ``adapter_config.json``.
    ``model`` resolves ``target_modules = "all-linear"``; it may be None otherwise."""
    kind = kind_for_config(config, source)
    check_fields(config, kind, source)
    keep = module_names(config, source)
    if model is None and str(config.get("target_modules")).lower() == "all-linear":
        raise FxpeftError(f"{source}: target_modules = \"all-linear\" depends on the model's "
                          f"layers; give a model to resolve it")
    return ConfigRules(kind, optional_rules(kind.peft.to_rules(config, model, source)), keep)
