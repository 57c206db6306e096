"""Splice one named adapter into an emitted graph: match its rules, run the kinds' passes, and
record what was added. ``fxpeft.rewrite`` and ``fxpeft.add_adapter`` both end here.

The adapted module keeps no capture ``Program``: ``program_of(gm)`` re-indexes its linear layers
(adapter nodes are never sites) from the graph as it is now.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx

from fxpeft.graph.records import AdapterRecord, adapter_records, set_trainable
from fxpeft.graph.params import freeze_base
from fxpeft.errors import FxpeftError, RuleError
from fxpeft.match.selection import check_selection
from fxpeft.graph.gates import active_adapters, adapter_names, check_adapter_name, set_adapter
from fxpeft import registry
from fxpeft.match.query import MatchResult, match
from fxpeft.names import MODULES_TO_SAVE
from fxpeft.capture.layer_copies import ranges_text
from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.capture.program import Program
from fxpeft.graph.rollback import rollback_on_error
from fxpeft.graph.state import graph_state
from fxpeft.rules.loader import load_rules
from fxpeft.rules.schema import RuleSet, check_replicable_kinds
from fxpeft.runtime.passes import PassResult, default_passes, run_passes


def program_of(gm: torch.fx.GraphModule) -> Program:
    """A ``Program`` view of an emitted graph, for matching more rules against it."""
    return Program(gm, gm.capture_info, find_linear_sites(gm))


def require_matches(program: Program, ruleset: RuleSet, result: MatchResult,
                    modules_to_save: Sequence[str] = (), allow_empty: bool = False) -> None:
    """Nothing selected is a ``MatchError`` with hints (``fxpeft.match.selection``): a rule that
    is not ``optional``, a name in ``modules_to_save``, the rules as a whole."""
    given = {MODULES_TO_SAVE: tuple(modules_to_save)}
    keywords = {kind.name: (given[kind.name], kind.keyword_sites) for kind in registry.all_kinds()
                if kind.keyword_sites is not None and kind.name in given}
    check_selection(program, ruleset, result, keywords, allow_empty)


def _work(gm: torch.nn.Module, result: MatchResult,
          keywords: dict[str, Sequence[str]]) -> dict[str, list]:
    """Per kind, its (site, params) items: the rules' matches, and the sites of the kinds applied
    by a keyword of their own name (``modules_to_save=[...]``: ``AdapterKind.keyword_sites``)."""
    work: dict[str, list] = {}
    for found in result.matches:
        work.setdefault(found.rule.rewrite, []).append((found.site, found.rule.params))
    for kind in registry.all_kinds():
        names = keywords.get(kind.name) if kind.keyword_sites is not None else None
        if names:
            work[kind.name] = [(site, None) for site in kind.keyword_sites(gm, names)]
    return work


def apply_adapter(program: Program, ruleset: RuleSet, result: MatchResult, adapter: str,
                  modules_to_save: Sequence[str] = ()) -> list[PassResult]:
    """Run every kind's pass for ``adapter`` over ``result``; all or nothing."""
    gm = program.graph_module
    with rollback_on_error(gm):  # a pass failing part-way must not leave a half-adapted graph
        reports, spliced = run_passes(gm, _work(gm, result, {MODULES_TO_SAVE: modules_to_save}),
                                      check_adapter_name(adapter), default_passes())
    freeze_base(gm)
    attached = [target for added in spliced for target in added.attached]
    frozen = [target for added in spliced for target in added.frozen]
    adapter_records(gm)[adapter] = AdapterRecord(ruleset, result.matches, tuple(modules_to_save),
                                                 attached, frozen)
    graph_state(gm).passes.extend(reports)
    return reports


def _check_replication(program: Program, ruleset: RuleSet, adapter: str) -> None:
    """Layers are replicated when the graph is captured: a later adapter's rules may repeat the
    graph's ``layer_replication`` (a second folder saved from it) or leave it out (the adapter
    sits on the replicated layers, as PEFT's does), never ask for other ranges; and on a
    replicated graph only kinds able to say so in their config (``AdapterKind.layer_replication``)
    may be added, since their saved folders must rebuild the same layers."""
    graph_ranges = program.info.layer_replication
    if ruleset.layer_replication and ruleset.layer_replication != graph_ranges:
        raise FxpeftError(f"add_adapter {adapter!r}: {ruleset.located('layer_replication')}: "
                          f"layer_replication = {ranges_text(ruleset.layer_replication)} "
                          f"differs from this graph's ({ranges_text(graph_ranges)}); layers "
                          f"are replicated when the model is captured: fxpeft.rewrite the "
                          f"original model with these rules")
    if graph_ranges:
        try:
            check_replicable_kinds(ruleset.rules)
        except RuleError as err:
            raise RuleError(f"add_adapter {adapter!r}: this graph's layers are replicated: "
                            f"{err.message}", file=ruleset.source, key=err.key) from None


def add_adapter(gm: torch.fx.GraphModule, adapter: str, rules: Any, *,
                modules_to_save: Sequence[str] = (), allow_empty: bool = False,
                **overrides: Any) -> torch.fx.GraphModule:
    """Splice a second (third, ...) named adapter into ``gm``, without re-tracing. It starts
    inactive and frozen; ``gm.set_adapter(adapter)`` switches to it and makes it trainable.
    Rules and ``modules_to_save`` that select nothing are errors unless ``allow_empty``
    (see ``fxpeft.rewrite``).

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> _ = fxpeft.add_adapter(gm, "other", fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> gm.adapter_names, gm.active_adapters
    (['default', 'other'], ['default'])
    """
    if graph_state(gm).role == "fused":
        raise FxpeftError("this is a fused copy (fxpeft.fuse); add adapters to the graph it was "
                          "fused from, then fuse again")
    if adapter in adapter_records(gm) or adapter in adapter_names(gm):
        raise FxpeftError(f"adapter {adapter!r} already exists in this graph")
    program = program_of(gm)
    ruleset = load_rules(rules).with_params(**overrides)
    _check_replication(program, ruleset, adapter)
    result = match(program, ruleset)
    require_matches(program, ruleset, result, modules_to_save, allow_empty)
    active = active_adapters(gm)
    apply_adapter(program, ruleset, result, adapter, modules_to_save)
    set_adapter(gm, active)
    set_trainable(gm, [adapter], False)  # inactive adapters are frozen until set_adapter
    return gm
