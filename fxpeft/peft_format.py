"""HF PEFT's on-disk adapter format, per adapter kind: a small registry keyed by ``peft_type``.

A ``PeftFormat`` says how one fxpeft rewrite kind meets one PEFT ``peft_type``:

- ``peft_type`` / ``kind``: PEFT's ``"LORA"`` and fxpeft's rule ``rewrite = "lora"``.
- ``components``: the name components the kind's pass adds (``lora_A``, ``lora_B``; IA3 would say
  ``ia3_l``). With them ``to_peft_key`` maps our parameter names to PEFT's saved keys and back:
  ``model.layers.0.self_attn.q_proj.lora_A.weight`` <-> ``base_model.model.model.layers.0.
  self_attn.q_proj.lora_A.weight``. An adapter not named ``"default"`` has components suffixed
  with its name (``lora_A_other``, see ``fxpeft.adapters.adapter_component``); PEFT's keys never
  carry the adapter name.
- ``to_config(matches, program) -> dict``: the PEFT config fields (beyond the generic ones
  ``peft_type``, ``task_type``, ``modules_to_save``, ...) that select the same modules with the
  same hyper-parameters as the matched rules.
- ``to_rules(config, model, source) -> RuleSet``: PEFT config to fxpeft rules. It must raise
  ``FxpeftError`` naming ``source`` and the field for anything it cannot honour.
- ``fields``: the config fields ``to_rules`` reads. Any other field must hold a neutral value
  (``None``, ``False``, ``{}``, ``[]``) or be PEFT metadata (``GENERIC_FIELDS``); else load fails.

A new kind registers itself with ``register_format(PeftFormat(...))``; ``fxpeft.save`` /
``fxpeft.load`` look formats up with ``format_for_type`` and ``format_for_kind``.

>>> format_for_type("LORA").kind, format_for_kind("lora").peft_type
('lora', 'LORA')
>>> to_peft_key("q_proj.lora_A_other.weight", "other", ("lora_A", "lora_B"))
'base_model.model.q_proj.lora_A.weight'
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch

from fxpeft.adapters import adapter_component
from fxpeft.errors import FxpeftError
from fxpeft.match import Match
from fxpeft.program import Program
from fxpeft.rules.schema import LoraParams, Rule, RuleSet, Where

PEFT_PREFIX = "base_model.model."
MODULES_TO_SAVE = "modules_to_save"
# PEFT metadata every config may carry; save/load handle these, not the formats.
GENERIC_FIELDS = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision",
                            "inference_mode", "auto_mapping", "peft_version", "modules_to_save"})
# Fields that only matter when another (checked) field is set, so any value is harmless.
_INERT_FIELDS = frozenset({"megatron_core", "qalora_group_size", "init_lora_weights"})


class PeftFormatError(FxpeftError, ValueError):
    """A PEFT adapter config that fxpeft cannot honour exactly."""


@dataclass(frozen=True)
class PeftFormat:
    peft_type: str
    kind: str
    components: tuple[str, ...]
    to_config: Callable[[list[Match], Program], dict[str, Any]]
    to_rules: Callable[[dict[str, Any], torch.nn.Module, str], RuleSet]
    fields: frozenset[str]


_FORMATS: dict[str, PeftFormat] = {}


def register_format(fmt: PeftFormat) -> PeftFormat:
    """Make ``fmt`` available to ``fxpeft.save`` and ``fxpeft.load``."""
    _FORMATS[fmt.peft_type] = fmt
    return fmt


def format_for_type(peft_type: Any, source: str = "<config>") -> PeftFormat:
    if peft_type not in _FORMATS:
        raise PeftFormatError(f"{source}: peft_type {peft_type!r} is not supported; fxpeft reads "
                              f"{', '.join(sorted(_FORMATS))}")
    return _FORMATS[peft_type]


def format_for_kind(kind: str) -> PeftFormat:
    found = [f for f in _FORMATS.values() if f.kind == kind]
    if not found:
        raise PeftFormatError(f"rewrite kind {kind!r} has no PEFT format; PEFT formats exist for "
                              f"{', '.join(sorted(f.kind for f in _FORMATS.values()))}")
    return found[0]


def to_peft_key(name: str, adapter: str, components: tuple[str, ...]) -> str | None:
    """PEFT's saved key for our parameter ``name`` of ``adapter``, or None if it is not one."""
    parts = name.split(".")
    copy = adapter_component(MODULES_TO_SAVE, adapter)
    if copy in parts:  # PEFT saves a modules_to_save copy under the original module's name
        return PEFT_PREFIX + ".".join(p for p in parts if p != copy)
    ours = {adapter_component(c, adapter): c for c in components}
    if not any(p in ours for p in parts):
        return None
    return PEFT_PREFIX + ".".join(ours.get(p, p) for p in parts)


def check_fields(config: dict[str, Any], fmt: PeftFormat, source: str) -> None:
    """Every field is read by ``fmt``, generic, inert, or neutral: never silently ignored."""
    for key, value in config.items():
        if key in fmt.fields or key in GENERIC_FIELDS or key in _INERT_FIELDS:
            continue
        if value not in (None, False, {}, [], ""):
            raise PeftFormatError(f"{source}: {key} = {value!r} is not supported by fxpeft's "
                                  f"{fmt.peft_type} loader (it cannot be honoured exactly)")


# --- PEFT's module-name matching, as regexes that Where.path (re.search) applies ---------------

def names_regex(names: list[str]) -> str:
    """PEFT's list form: the module path equals a name or ends with ``.name``."""
    return r"(?:.*\.)?(?:" + "|".join(re.escape(n) for n in names) + r")$"


def full_regex(pattern: str) -> str:
    """PEFT's string form: ``re.fullmatch``."""
    return rf"(?:{pattern})$"


def _layers_lookahead(layers: list[int], pattern: Any) -> str:
    """PEFT's ``layers_to_transform``: the first numbered segment (or the one after
    ``layers_pattern``) is one of ``layers``."""
    wanted = "|".join(str(i) for i in layers)
    if not pattern:
        return rf"(?=[^.]*\.[^.]*\.(?:(?!\d+\.)[^.]*\.)*(?:{wanted})\.)"
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return rf"(?=(?:.*?\.)?(?:{'|'.join(patterns)})\.(?:{wanted})\.)"


def _key_lookahead(key: str | None) -> str:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` keys match as ``(.*\\.)?(KEY)$``."""
    return "" if key is None else rf"(?=(?:.*\.)?(?:{key})$)"


# --- LoRA ---------------------------------------------------------------------------------------

# init_lora_weights values that leave the base weights as they were (others rewrite them).
_PLAIN_INITS = (True, False, "gaussian", "orthogonal")
_LORA_FIELDS = frozenset({"target_modules", "exclude_modules", "layers_to_transform",
                          "layers_pattern", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                          "use_rslora", "fan_in_fan_out", "bias", "lora_dropout",
                          "init_lora_weights"})


def _linear_module_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"]


def _head_names(model: torch.nn.Module, config: dict[str, Any]) -> set[str]:
    """What PEFT's ``all-linear`` leaves out: the output embedding, or a classifier head."""
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    if head is None and config.get("task_type") == "SEQ_CLS":
        head = next((getattr(model, n) for n in ("score", "classifier") if hasattr(model, n)), None)
    return {name for name, module in model.named_modules() if head is not None and module is head}


def _target_regex(config: dict[str, Any], model: torch.nn.Module, source: str) -> str:
    target = config.get("target_modules")
    if isinstance(target, str) and target.lower() == "all-linear":
        heads = _head_names(model, config)
        names = [n for n in _linear_module_names(model) if n not in heads]
        return "(?:" + "|".join(re.escape(n) for n in names) + ")$"
    if isinstance(target, str):
        return full_regex(target)
    if isinstance(target, (list, tuple)) and target and all(isinstance(t, str) for t in target):
        return names_regex(list(target))
    raise PeftFormatError(f"{source}: target_modules must be a list of names, a regular expression "
                          f"or \"all-linear\", got {target!r}")


def _layers_prefix(config: dict[str, Any]) -> str:
    """PEFT applies ``layers_to_transform`` only with a list ``target_modules``."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == [] or not isinstance(config.get("target_modules"), (list, tuple)):
        return ""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return _layers_lookahead(layers, config.get("layers_pattern"))


def _exclude_regexes(config: dict[str, Any]) -> list[str]:
    exclude = config.get("exclude_modules")
    found = [] if not exclude else (["^" + full_regex(exclude)] if isinstance(exclude, str)
                                    else ["^" + names_regex(list(exclude))])
    # PEFT never puts an adapter inside a modules_to_save module.
    return found + [rf"^(?:.*\.)?(?:{m})(?:$|\.)" for m in config.get(MODULES_TO_SAVE) or []]


def _check_lora(config: dict[str, Any], source: str) -> None:
    if config.get("bias", "none") != "none":
        raise PeftFormatError(f"{source}: bias = {config['bias']!r} is not supported (only \"none\")")
    if config.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise PeftFormatError(f"{source}: init_lora_weights = {config['init_lora_weights']!r} "
                              f"changes the base weights; fxpeft cannot load such an adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise PeftFormatError(f"{source}: {key} must be a mapping, got {config[key]!r}")


def lora_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """PEFT ``LoraConfig`` fields to rules. ``rank_pattern`` x ``alpha_pattern`` keys become one
    rule per pair, in PEFT's key order, so first-match-wins picks PEFT's rank and alpha."""
    _check_lora(config, source)
    target = "^" + _layers_prefix(config) + "{keys}" + _target_regex(config, model, source)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rules = [_lora_rule(config, target.format(keys=_key_lookahead(rk) + _key_lookahead(ak)),
                        ranks.get(rk, config.get("r", 8)),
                        alphas.get(ak, config.get("lora_alpha", 8)), f"peft {rk or '*'}/{ak or '*'}")
             for rk in [*ranks, None] for ak in [*alphas, None]]
    return RuleSet(tuple(rules), source=source)


def _lora_rule(config: dict[str, Any], path: str, r: Any, alpha: Any, name: str) -> Rule:
    params = LoraParams(r=r, alpha=alpha, dropout=config.get("lora_dropout", 0.0),
                        use_rslora=bool(config.get("use_rslora", False)))
    return Rule(name=name, optional=True, params=params,
                where=Where(path=[path], exclude=_exclude_regexes(config)))


def _common_and_exceptions(values: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The most common value, and a PEFT pattern (``name`` or escaped path) for every other."""
    common = Counter(values.values()).most_common(1)[0][0]
    by_name: dict[str, set] = {}
    for path, value in values.items():
        by_name.setdefault(path.rsplit(".", 1)[-1], set()).add(value)
    exceptions = {}
    for path, value in values.items():
        name = path.rsplit(".", 1)[-1]
        if value != common:
            exceptions[name if len(by_name[name]) == 1 else re.escape(path)] = value
    return common, exceptions


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def _targets(paths: list[str], program: Program) -> list[str] | str:
    """Module names when they select exactly ``paths``; else a regex of the exact paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    regex = re.compile(names_regex(names))
    if {s.module_path for s in program.sites if regex.match(s.module_path)} == set(paths):
        return names
    return "|".join(re.escape(p) for p in paths)


def lora_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """The ``LoraConfig`` fields that select ``matches``' modules with their rank and scale."""
    params = {m.module_path: m.rule.params for m in matches}
    rslora = all(p.use_rslora for p in params.values())
    r, rank_pattern = _common_and_exceptions({k: p.r for k, p in params.items()})
    alpha, alpha_pattern = _common_and_exceptions(
        {k: _number(p.scale * (p.r ** 0.5 if rslora else p.r)) for k, p in params.items()})
    dropout = Counter(p.dropout for p in params.values()).most_common(1)[0][0]
    return {"target_modules": _targets(sorted(params), program), "r": r, "lora_alpha": alpha,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": rslora,
            "lora_dropout": dropout, "bias": "none", "init_lora_weights": True, "use_dora": False,
            "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches)}


register_format(PeftFormat("LORA", "lora", ("lora_A", "lora_B"), lora_config, lora_rules,
                           _LORA_FIELDS))
