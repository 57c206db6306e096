"""HF PEFT's on-disk adapter format: what every kind's ``PeftFormat`` shares.

A kind's ``PeftFormat`` (``AdapterKind.peft``) says how it meets one PEFT ``peft_type``:

- ``peft_type``: PEFT's ``"LORA"``; ``selector``: config fields that pick this kind among the
  kinds sharing a ``peft_type`` (DoRA is ``LORA`` with ``use_dora = true``).
- ``to_config(matches, program) -> dict``: the PEFT config fields (beyond the generic ones
  ``peft_type``, ``task_type``, ``modules_to_save``, ...) that select the same modules with the
  same hyper-parameters as the matched rules.
- ``to_rules(config, model, source) -> RuleSet``: PEFT config to fxpeft rules. It must raise
  ``PeftFormatError`` naming ``source`` and the field for anything it cannot honour.
- ``fields``: the config fields ``to_rules`` reads. Any other field must hold a neutral value
  (``None``, ``False``, ``{}``, ``[]``) or be PEFT metadata (``GENERIC_FIELDS``); else load fails.
- ``save_state`` / ``load_state`` (optional): for kinds whose files hold training state beyond
  the structure (AdaLoRA's ``rank_pattern`` and tensors pruned to it). ``save_state(gm, adapter,
  config, tensors) -> (config, tensors)`` and ``load_state(gm, adapter, config, tensors, source)
  -> tensors`` (the file's tensors as the graph holds them); ``state_fields`` are the config
  fields they own, which are not compared with the rules that rebuild the graph.
- ``graph_fields``: config fields that describe the captured graph rather than one adapter
  (LoRA's ``layer_replication``): ``to_config`` writes the graph's value, so each saved folder
  rebuilds the graph alone; a later adapter loaded into a graph (PEFT's second adapter saves
  ``None``) is checked against the graph by ``add_adapter``, not compared field by field.

Keys: the kind's ``components`` map our parameter names to PEFT's saved keys and back:
``model.layers.0.self_attn.q_proj.lora_A.weight`` <-> ``base_model.model.model.layers.0.
self_attn.q_proj.lora_A.weight``. An adapter not named ``"default"`` has components suffixed
with its name (``lora_A_other``); PEFT's keys never carry the adapter name.

>>> import fxpeft
>>> kind_for_config({"peft_type": "LORA"}).name, kind_for_rewrite("lora").peft.peft_type
('lora', 'LORA')
>>> to_peft_key("q_proj.lora_A_other.weight", "other", ("lora_A", "lora_B"))
'base_model.model.q_proj.lora_A.weight'
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from fxpeft.errors import FxpeftError
from fxpeft import registry
from fxpeft.names import MODULES_TO_SAVE, PEFT_PREFIX, adapter_component

if TYPE_CHECKING:
    from fxpeft.registry import AdapterKind
    from fxpeft.capture.program import Program

# PEFT metadata every config may carry; save/load handle these, not the formats.
GENERIC_FIELDS = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision",
                            "inference_mode", "auto_mapping", "peft_version", "modules_to_save"})
# Fields that only matter when another (checked) field is set, so any value is harmless.
INERT_FIELDS = frozenset({"megatron_core", "qalora_group_size", "init_lora_weights"})


class PeftFormatError(FxpeftError, ValueError):
    """A PEFT adapter config that fxpeft cannot honour exactly."""


@dataclass(frozen=True)
class PeftFormat:
    peft_type: str
    to_config: Callable[..., dict[str, Any]]
    to_rules: Callable[..., Any]
    fields: frozenset[str]
    selector: dict[str, Any] = field(default_factory=dict)
    save_state: Callable[..., tuple[dict[str, Any], dict[str, Any]]] | None = None
    load_state: Callable[..., dict[str, Any]] | None = None
    state_fields: frozenset[str] = frozenset()
    graph_fields: frozenset[str] = frozenset()
    key_prefix: str = PEFT_PREFIX  # prompt tuning's one key, "prompt_embeddings", has none

    def selects(self, config: dict[str, Any]) -> bool:
        """Whether ``config`` is this format's: its ``peft_type`` and every selector field."""
        return config.get("peft_type") == self.peft_type and all(
            selected(config.get(key), value) for key, value in self.selector.items())


def selected(value: Any, wanted: Any) -> bool:
    """Whether a config field's ``value`` is a selector's ``wanted``: ``True`` / ``False`` mean
    set / not set (aLoRA's token list is "set"), anything else must be equal.

    >>> selected([5], True), selected(None, False), selected("x", "y")
    (True, True, False)
    """
    return bool(value) == wanted if isinstance(wanted, bool) else (value or False) == wanted


def _peft_kinds() -> list[AdapterKind]:
    return [k for k in registry.all_kinds() if k.peft is not None]


def kind_for_config(config: dict[str, Any], source: str = "<config>") -> AdapterKind:
    """The adapter kind that reads a PEFT config."""
    for kind in _peft_kinds():
        if kind.peft.selects(config):
            return kind
    same_type = [k.peft for k in _peft_kinds() if k.peft.peft_type == config.get("peft_type")]
    if same_type:  # flags no kind of that type reads, alone or together (DoRA with aLoRA)
        keys = dict.fromkeys(k for fmt in same_type for k, v in fmt.selector.items()
                             if not selected(config.get(k), v) and config.get(k)) or dict.fromkeys(
            k for k, v in same_type[0].selector.items() if not selected(config.get(k), v))
        shown = ", ".join(f"{k} = {config.get(k)!r}" for k in keys)
        raise PeftFormatError(f"{source}: {shown} {'together are' if len(keys) > 1 else 'is'} not "
                              f"supported by fxpeft's {same_type[0].peft_type} loader (it cannot be "
                              f"honoured exactly)")
    known = sorted({k.peft.peft_type for k in _peft_kinds()})
    raise PeftFormatError(f"{source}: peft_type {config.get('peft_type')!r} is not supported; "
                          f"fxpeft reads {', '.join(known)}")


def kind_for_rewrite(rewrite: str) -> AdapterKind:
    """The adapter kind of a rule's ``rewrite``, which must have a PEFT format."""
    kind = registry.get(rewrite)
    if kind.peft is None:
        raise PeftFormatError(f"rewrite kind {rewrite!r} has no PEFT format; PEFT formats exist "
                              f"for {', '.join(k.name for k in _peft_kinds())}")
    return kind


def to_peft_key(name: str, adapter: str, components: tuple[str, ...],
               prefix: str = PEFT_PREFIX) -> str | None:
    """PEFT's saved key for our parameter ``name`` of ``adapter``, or None if it is not one;
    ``prefix`` is the kind's ``PeftFormat.key_prefix``.

    >>> to_peft_key("prompt_embeddings_sql", "sql", ("prompt_embeddings",), prefix="")
    'prompt_embeddings'
    """
    parts = name.split(".")
    copy = adapter_component(MODULES_TO_SAVE, adapter)
    if copy in parts:  # PEFT saves a modules_to_save copy under the original module's name
        return PEFT_PREFIX + ".".join(p for p in parts if p != copy)
    ours = {adapter_component(c, adapter): c for c in components}
    if not any(p in ours for p in parts):
        return None
    return prefix + ".".join(ours.get(p, p) for p in parts)


def neutral(value: Any) -> bool:
    """None, False, or an empty table, list or string (0 is a value, not a neutral False).

    >>> [neutral(v) for v in (None, False, [], 0, 0.0, "x")]
    [True, True, True, False, False, False]
    """
    return value is None or value is False or (isinstance(value, (dict, list, str)) and not value)


def check_fields(config: dict[str, Any], kind: AdapterKind, source: str) -> None:
    """Every field is read by the kind's format, generic, inert, neutral, or a selector: never
    silently ignored."""
    fmt = kind.peft
    for key, value in config.items():
        if key in fmt.fields or key in GENERIC_FIELDS or key in INERT_FIELDS or key in fmt.selector:
            continue
        if not neutral(value):
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


# --- target selection shared by LoRA-like and IA3 configs ------------------------------

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


def target_regex(config: dict[str, Any], model: torch.nn.Module, source: str) -> str:
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


def layers_prefix(config: dict[str, Any]) -> str:
    """PEFT applies ``layers_to_transform`` only with a list ``target_modules``."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == [] or not isinstance(config.get("target_modules"), (list, tuple)):
        return ""
    layers = [layers] if isinstance(layers, int) else list(layers)
    return _layers_lookahead(layers, config.get("layers_pattern"))


def exclude_regexes(config: dict[str, Any]) -> list[str]:
    exclude = config.get("exclude_modules")
    found = [] if not exclude else (["^" + full_regex(exclude)] if isinstance(exclude, str)
                                    else ["^" + names_regex(list(exclude))])
    # PEFT never puts an adapter inside a modules_to_save module.
    return found + [rf"^(?:.*\.)?(?:{m})(?:$|\.)" for m in config.get(MODULES_TO_SAVE) or []]


def targets_for(paths: list[str], program: Program, known: "list[str] | None" = None) -> list[str] | str:
    """Module names when they select exactly ``paths`` among the ``known`` module paths (by
    default the program's linears); else a regex of the exact paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    regex = re.compile(names_regex(names))
    known = [s.module_path for s in program.sites] if known is None else known
    if {path for path in known if regex.match(path)} == set(paths):
        return names
    return "|".join(re.escape(p) for p in paths)
