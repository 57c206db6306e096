"""The pipeline from a model to an adapted graph: ``rewrite``, ``explain``, ``add_adapter``,
``trainable_parameters`` (re-exported by ``fxpeft.api``).

``rewrite`` is the whole pipeline: capture -> match -> emit -> the kinds' passes.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Sequence

import torch

from fxpeft.runtime.apply import add_adapter, apply_adapter, require_matches
from fxpeft.capture import layer_copies
from fxpeft.capture.export import capture, collector_paused
from fxpeft.runtime.emit import emit
from fxpeft.errors import FxpeftError
from fxpeft.match.explain import Explanation, build_explanation, unadapted_targets
from fxpeft.runtime.adapted_module import CHECKPOINTING_ADVICE, AdaptedModule
from fxpeft.match.query import MatchResult, match
from fxpeft.formats.peft_config import as_config, config_source, is_config, rules_from_config
from fxpeft.formats.peft_format import PeftFormatError
from fxpeft.capture.program import Program
from fxpeft.capture.quantized import packed_4bit_weights
from fxpeft.rules.loader import load_rules
from fxpeft.rules.schema import RuleSet
from fxpeft import registry
from fxpeft.capture.hf import example_inputs as example_inputs_of, is_hf_model
from fxpeft.registry import provide
from fxpeft.runtime.passes import PassResult
from fxpeft.graph.state import graph_state

__all__ = ["add_adapter", "explain", "pass_report", "rewrite", "trainable_parameters"]
log = logging.getLogger("fxpeft")
RulesLike = "str | Path | RuleSet | Rule | Iterable[Rule] | PEFT config"


def _from_config(model: torch.nn.Module, rules: Any,
                 modules_to_save: Sequence[str]) -> tuple[Any, tuple[str, ...]]:
    """A PEFT config (object or dict) becomes its rules and ``modules_to_save``, read as
    ``fxpeft.load`` reads ``adapter_config.json``; anything else passes through."""
    if not is_config(rules):
        return rules, tuple(modules_to_save)
    source = config_source(rules)
    found = rules_from_config(as_config(rules, source), model, source)
    if modules_to_save and tuple(modules_to_save) != found.modules_to_save:
        raise FxpeftError(f"{source}: modules_to_save is {list(found.modules_to_save)} in the "
                          f"config and {list(modules_to_save)} in the call; give it once")
    return found.rules, found.modules_to_save


def check_model(model: Any, caller: str) -> None:
    """A model that cannot be captured or trained is refused before any work: not a module, or
    parameters on the ``meta`` device (shapes without values: its logits and saves would be
    empty).

    >>> check_model("llama", "rewrite")
    Traceback (most recent call last):
    ...
    fxpeft.errors.FxpeftError: fxpeft.rewrite: the model must be a torch.nn.Module, got str 'llama'; load it first (e.g. AutoModelForCausalLM.from_pretrained(...))
    """
    if not isinstance(model, torch.nn.Module):
        raise FxpeftError(f"fxpeft.{caller}: the model must be a torch.nn.Module, got "
                          f"{type(model).__name__} {model!r:.60}; load it first (e.g. "
                          f"AutoModelForCausalLM.from_pretrained(...))")
    meta = next((name for name, t in _tensors(model) if t.is_meta), None)
    if meta is not None:
        raise FxpeftError(f"fxpeft.{caller}: {type(model).__name__}.{meta} is on the meta device "
                          f"(a shape without values); load the weights first (from_pretrained, or "
                          f"to_empty() and load_state_dict)")


def _tensors(model: torch.nn.Module) -> Any:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _matched(model: torch.nn.Module, rules: Any, example_inputs: Any, leaf_modules: Sequence[type],
             overrides: dict[str, Any]) -> tuple[Program, RuleSet, MatchResult]:
    ruleset = load_rules(rules).with_params(**overrides)
    model = _with_replicated_layers(model, ruleset)
    if example_inputs is None and _lengthens(ruleset) and is_hf_model(model):
        example_inputs = _without_positions(example_inputs_of(model))
    program = capture(model, example_inputs, leaf_modules, ruleset.allow_training_branches)
    if ruleset.layer_replication:
        program.info = dataclasses.replace(program.info, layer_replication=ruleset.layer_replication)
    return program, ruleset, match(program, ruleset)


def _with_replicated_layers(model: torch.nn.Module, ruleset: RuleSet) -> torch.nn.Module:
    """The model to capture: with a rule set's ``layer_replication``, a copy whose layer stack
    is rebuilt from its ranges (``fxpeft.capture.layer_copies``; ``model`` stays as it is)."""
    if not ruleset.layer_replication:
        return model
    return layer_copies.replicated_model(model, ruleset.layer_replication,
                                         ruleset.located(layer_copies.KEY))


def _lengthens(ruleset: RuleSet) -> bool:
    """A kind that puts tokens in front of the input (``AdapterKind.lengthens``): as PEFT drops
    a caller's ``position_ids`` for it, the graph is captured without that input."""
    return any(registry.get(rule.rewrite).lengthens is not None for rule in ruleset.rules)


def _without_positions(inputs: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in inputs.items() if name != "position_ids"}


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
    check_model(model, "explain")
    with collector_paused():
        rules, _ = _from_config(model, rules, ())
        program, ruleset, result = _matched(model, rules, example_inputs, leaf_modules, overrides)
        return build_explanation(program, ruleset, result)


def rewrite(model: torch.nn.Module, rules: RulesLike, *, example_inputs: Any = None,
            leaf_modules: Sequence[type] = (), adapter: str = "default",
            modules_to_save: Sequence[str] = (), allow_empty: bool = False,
            **overrides: Any) -> AdaptedModule:
    """Capture ``model``, match ``rules``, and splice adapters: an adapted ``GraphModule``.

    ``rules`` is a path, a bundled name (``"lora_qv.toml"``), rule objects, or a PEFT config
    (``LoraConfig(...)``, ``IA3Config``, ``AdaptionPromptConfig``, or its plain dict with a
    ``peft_type``), read as ``fxpeft.load`` reads ``adapter_config.json``; keyword
    ``overrides`` (``r=16``) replace those parameters in every rule that has them. The base
    parameters are shared with ``model`` and frozen; only adapter parameters train. ``adapter``
    names the adapter (see ``add_adapter``); ``modules_to_save`` (PEFT's, e.g. ``["classifier"]``)
    get fully trainable copies. Selecting nothing is an error (``fxpeft.MatchError``): a rule
    that is not ``optional`` and matches nothing, rules that together adapt nothing, a
    ``layers`` index or a ``modules_to_save`` name the model lacks; ``allow_empty=True`` (or
    the rule file's ``allow_empty = true``) allows the last three.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])), r=2)
    >>> fxpeft.trainable_parameters(gm)
    (16, 36)
    """
    check_model(model, "rewrite")
    _warn_hf_checkpointing(model)
    with collector_paused():
        return _rewritten(model, rules, example_inputs, leaf_modules, adapter, modules_to_save,
                          allow_empty, overrides)


def _rewritten(model: torch.nn.Module, rules: RulesLike, example_inputs: Any,
               leaf_modules: Sequence[type], adapter: str, modules_to_save: Sequence[str],
               allow_empty: bool, overrides: dict[str, Any]) -> AdaptedModule:
    from_config = is_config(rules)
    rules, modules_to_save = _from_config(model, rules, modules_to_save)
    program, ruleset, result = _matched(model, rules, example_inputs, leaf_modules, overrides)
    # a PEFT config keeps PEFT's meaning: its modules_to_save may name absent heads ("score")
    require_matches(program, ruleset, result, modules_to_save, allow_empty or from_config)
    if from_config:
        _check_config_targets(model, program, ruleset, result)
    gm = emit(program, generate_code=False)  # the passes change the graph: its code is made once
    apply_adapter(dataclasses.replace(program, graph_module=gm), ruleset, result, adapter,
                  modules_to_save)
    gm.ensure_code()
    return gm


def _check_config_targets(model: torch.nn.Module, program: Program, ruleset: RuleSet,
                          result: MatchResult) -> None:
    """A PEFT config's targets, refused as PEFT would not refuse them only where fxpeft cannot
    follow: a targeted layer with a weight that the kind has no site for (BOFT on a
    ``Conv2d``) names the feature, never the rule the config became; a config that adapts
    nothing is refused as PEFT refuses it."""
    for path, kind in unadapted_targets(program, ruleset, result):
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a path only the graph's module stacks name
            continue
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            rewrite_kind = ruleset.rules[0].rewrite
            sites = "/".join(registry.get(rewrite_kind).sites)
            raise PeftFormatError(f"{ruleset.source}: target_modules selects {path} ({kind}): "
                                  f"{rewrite_kind} on {kind} is not supported by fxpeft (its "
                                  f"{rewrite_kind} adapters apply to {sites} layers)")
    if not result.matches:  # PEFT, too, refuses a config that adapts nothing
        raise PeftFormatError(f"{ruleset.source}: the adapter it describes matches no module "
                              f"of {program.model_class}")


def _warn_hf_checkpointing(model: torch.nn.Module) -> None:
    """HF checkpointing wraps module calls, which capture flattens away: say so."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"  # transformers 5 renamed it
    if getattr(model, flag, False):
        warnings.warn(f"{type(model).__name__}.gradient_checkpointing_enable() does not survive "
                      f"capture: the graph would keep every activation; {CHECKPOINTING_ADVICE}",
                      stacklevel=3)


def pass_report(gm: AdaptedModule) -> list[PassResult]:
    """What each pass did to ``gm``."""
    return list(graph_state(gm).passes)


@provide("trainable_parameters")
def trainable_parameters(gm: torch.nn.Module, print_line: bool = False) -> tuple[int, int]:
    """(trainable, total) parameter counts, as PEFT's ``get_nb_trainable_parameters``; with
    ``print_line`` also prints PEFT's ``print_trainable_parameters`` line.

    >>> trainable_parameters(torch.nn.Linear(2, 2))
    (6, 6)
    """
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    packed = packed_4bit_weights(gm)  # two 4-bit weights a byte, as PEFT counts them
    total = sum(p.numel() * (2 if name in packed else 1) for name, p in gm.named_parameters())
    if print_line:
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
    return trainable, total
