"""The public entry points: ``rewrite``, ``explain``, ``trainable_parameters``."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from fxpeft.adapter_set import AdapterRecord, adapter_records, add_modules_to_save
from fxpeft.adapters import freeze_base
from fxpeft.capture import capture
from fxpeft.errors import FxpeftError, MatchError
from fxpeft.gates import active_adapters, adapter_names, check_adapter_name, set_adapter
from fxpeft.explain import Explanation, build_explanation
from fxpeft.graph_module import AdaptedModule
from fxpeft.match import MatchResult, match
from fxpeft.program import Program
from fxpeft.rollback import rollback_on_error
from fxpeft.rules import RuleSet, load_rules
from fxpeft.transforms import PassResult, default_passes, run_passes

log = logging.getLogger("fxpeft")
RulesLike = "str | Path | RuleSet | Rule | Iterable[Rule]"


def _matched(model: torch.nn.Module, rules: Any, example_inputs: Any, leaf_modules: Sequence[type],
             overrides: dict[str, Any]) -> tuple[Program, RuleSet, MatchResult]:
    ruleset = load_rules(rules).with_params(**overrides)
    program = capture(model, example_inputs, leaf_modules)
    return program, ruleset, match(program, ruleset)


def explain(model: torch.nn.Module, rules: RulesLike, *, example_inputs: Any = None,
            leaf_modules: Sequence[type] = (), **overrides: Any) -> Explanation:
    """Per rule, the module paths it matches; for a rule that matches nothing, the closest
    module names. ``print(fxpeft.explain(model, "lora_qv.toml"))`` shows the report.

    >>> import torch, fxpeft
    >>> class Attn(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.q_proj = torch.nn.Linear(4, 4); self.v_proj = torch.nn.Linear(4, 4)
    ...     def forward(self, x): return self.q_proj(x) + self.v_proj(x)
    >>> fxpeft.explain(Attn(), "lora_qv.toml").rules[0].matched
    ['q_proj', 'v_proj']
    """
    program, ruleset, result = _matched(model, rules, example_inputs, leaf_modules, overrides)
    return build_explanation(program, ruleset, result)


def _require_matches(program: Program, ruleset: RuleSet, result: MatchResult) -> None:
    report = build_explanation(program, ruleset, result)
    for index, rule in enumerate(ruleset.rules):
        if not rule.optional and not result.for_rule(index):
            raise MatchError(f"{ruleset.source}: rule {rule.name!r} matched nothing in "
                             f"{program.model_class}; closest module names: "
                             f"{', '.join(report.rules[index].closest) or 'none'} "
                             f"(set optional = true to allow this; fxpeft.explain shows why)")


def rewrite(model: torch.nn.Module, rules: RulesLike, *, example_inputs: Any = None,
            leaf_modules: Sequence[type] = (), adapter: str = "default",
            modules_to_save: Sequence[str] = (), **overrides: Any) -> AdaptedModule:
    """Capture ``model``, match ``rules``, and splice adapters: an adapted ``GraphModule``.

    ``rules`` is a path, a bundled name (``"lora_qv.toml"``) or rule objects; keyword
    ``overrides`` (``r=16``) replace those parameters in every rule that has them. The base
    parameters are shared with ``model`` and frozen; only adapter parameters train. ``adapter``
    names the adapter (see ``add_adapter``); ``modules_to_save`` (PEFT's, e.g. ``["classifier"]``)
    get fully trainable copies.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])), r=2)
    >>> fxpeft.trainable_parameters(gm)
    (16, 36)
    """
    program, ruleset, result = _matched(model, rules, example_inputs, leaf_modules, overrides)
    _require_matches(program, ruleset, result)
    gm = program.graph_module
    gm.meta["fxpeft"] = {"rules": ruleset, "matches": result.matches, "program": program}
    gm.meta["fxpeft"]["passes"] = _apply(program, ruleset, result, adapter, modules_to_save)
    return gm


def _apply(program: Program, ruleset: RuleSet, result: MatchResult, adapter: str,
           modules_to_save: Sequence[str]) -> list[PassResult]:
    program.info["adapter"] = check_adapter_name(adapter)
    gm = program.graph_module
    with rollback_on_error(gm):  # a pass failing part-way must not leave a half-adapted graph
        reports = run_passes(program, result.matches, default_passes())
        if modules_to_save:
            add_modules_to_save(gm, modules_to_save, adapter)
    freeze_base(gm)
    adapter_records(gm)[adapter] = AdapterRecord(ruleset, result.matches, tuple(modules_to_save))
    return reports


def add_adapter(gm: AdaptedModule, adapter: str, rules: RulesLike, *,
                modules_to_save: Sequence[str] = (), **overrides: Any) -> AdaptedModule:
    """Splice a second (third, ...) named adapter into ``gm``, without re-tracing. It starts
    inactive; ``gm.set_adapter(adapter)`` switches to it.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> _ = fxpeft.add_adapter(gm, "other", fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> gm.adapter_names, gm.active_adapters
    (['default', 'other'], ['default'])
    """
    if adapter in adapter_records(gm) or adapter in adapter_names(gm):
        raise FxpeftError(f"adapter {adapter!r} already exists in this graph")
    if modules_to_save and any(r.modules_to_save for r in adapter_records(gm).values()):
        raise FxpeftError("modules_to_save in more than one adapter of a graph is not supported")
    program = gm.meta["fxpeft"]["program"]
    ruleset = load_rules(rules).with_params(**overrides)
    result = match(program, ruleset)
    _require_matches(program, ruleset, result)
    active = active_adapters(gm)
    gm.meta["fxpeft"].setdefault("passes", []).extend(
        _apply(program, ruleset, result, adapter, modules_to_save))
    set_adapter(gm, active)
    return gm


def pass_report(gm: AdaptedModule) -> list[PassResult]:
    """What each pass did to ``gm``."""
    return list(gm.meta.get("fxpeft", {}).get("passes", []))


def trainable_parameters(gm: torch.nn.Module, print_line: bool = False) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's ``get_nb_trainable_parameters``; with
    ``print_line`` also prints PEFT's ``print_trainable_parameters`` line.

    >>> trainable_parameters(torch.nn.Linear(2, 2))
    (6, 6)
    """
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    if print_line:
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total
