"""PEFT formats for adaption prompts (``ADAPTION_PROMPT``) and IA3 (``IA3``).

Both name their tensors as PEFT saves them (``...self_attn.adaption_prompt``,
``...k_proj.ia3_l``, same shapes), so the key mapping is the registry's generic one.

>>> from fxpeft.peft_format import format_for_type
>>> format_for_type("IA3").kind, format_for_type("ADAPTION_PROMPT").components
('ia3', ('adaption_prompt', 'adaption_gate'))
"""

from __future__ import annotations

from typing import Any

import torch

from fxpeft.match import Match
from fxpeft.peft_format import (PeftFormat, PeftFormatError, _exclude_regexes, _target_regex,
                                _targets, full_regex, names_regex, register_format)
from fxpeft.program import Program
from fxpeft.rules.schema import AdaptionPromptParams, IA3Params, Rule, RuleSet, Where

# --- adaption prompts ---------------------------------------------------------------------------

_PROMPT_FIELDS = frozenset({"target_modules", "adapter_len", "adapter_layers"})


def _top_layers(matches: list[Match], program: Program) -> int:
    """How many top layers ``matches`` cover; PEFT can only say "the top N"."""
    layers = sorted(m.candidate.layer for m in matches)
    top = list(range(program.layer_count - len(layers), program.layer_count))
    if layers != top:
        raise PeftFormatError(f"adaption prompts in layers {layers}: PEFT's format can only hold "
                              f"the top N layers ({top} for N={len(layers)})")
    return len(layers)


def prompt_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``AdaptionPromptConfig`` fields: the attention module name, prompt length, layer count."""
    params = {m.rule.params for m in matches}
    if len(params) != 1 or next(iter(params)).gate != "scale":
        raise PeftFormatError(f"PEFT's adaption prompts have one adapter_len and a plain gate; "
                              f"got {sorted(map(repr, params))}")
    names = {m.module_path.rsplit(".", 1)[-1] for m in matches}
    if len(names) != 1:
        raise PeftFormatError(f"adaption prompts on differently named modules {sorted(names)}")
    return {"target_modules": names.pop(), "adapter_len": next(iter(params)).adapter_len,
            "adapter_layers": _top_layers(matches, program)}


def prompt_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """The top ``adapter_layers`` attention blocks named ``target_modules`` get prompts."""
    layers, length = config.get("adapter_layers"), config.get("adapter_len")
    if not isinstance(layers, int) or layers < 1 or not isinstance(length, int) or length < 1:
        raise PeftFormatError(f"{source}: adapter_layers and adapter_len must be positive "
                              f"integers, got {layers!r} and {length!r}")
    target = config.get("target_modules") or "self_attn"
    where = Where(path=["^" + names_regex([target])], layer_range=[-layers, -1])
    rule = Rule(name="peft adaption prompt", match="attention", where=where,
                params=AdaptionPromptParams(adapter_len=length))
    return RuleSet((rule,), source=source)


# --- IA3 ----------------------------------------------------------------------------------------

_IA3_FIELDS = frozenset({"target_modules", "feedforward_modules", "exclude_modules",
                         "fan_in_fan_out", "init_ia3_weights"})


def _feedforward_regex(config: dict[str, Any], source: str) -> str | None:
    feedforward = config.get("feedforward_modules")
    if not feedforward:
        return None
    if isinstance(feedforward, str):
        return full_regex(feedforward)
    if isinstance(feedforward, (list, tuple)) and all(isinstance(f, str) for f in feedforward):
        return names_regex(list(feedforward))
    raise PeftFormatError(f"{source}: feedforward_modules must be names or a regex, got {feedforward!r}")


def ia3_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """Feed-forward targets scale their input (first rule, first match wins); the rest outputs."""
    target = _target_regex(config, model, source)
    exclude = _exclude_regexes(config)
    rules = [Rule(name="peft ia3", optional=True, params=IA3Params(),
                  where=Where(path=["^" + target], exclude=exclude))]
    feedforward = _feedforward_regex(config, source)
    if feedforward:
        rules.insert(0, Rule(name="peft ia3 feedforward", optional=True,
                             params=IA3Params(feedforward=True),
                             where=Where(path=[f"^(?={feedforward})" + target], exclude=exclude)))
    return RuleSet(tuple(rules), source=source)


def ia3_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``IA3Config`` fields selecting the matched linears, and which of them are feed-forward."""
    feedforward = sorted(m.module_path for m in matches if m.rule.params.feedforward)
    return {"target_modules": _targets(sorted(m.module_path for m in matches), program),
            "feedforward_modules": _targets(feedforward, program) if feedforward else [],
            "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches),
            "init_ia3_weights": True}


register_format(PeftFormat("ADAPTION_PROMPT", "adaption_prompt", ("adaption_prompt", "adaption_gate"),
                           prompt_config, prompt_rules, _PROMPT_FIELDS))
register_format(PeftFormat("IA3", "ia3", ("ia3_l",), ia3_config, ia3_rules, _IA3_FIELDS))
