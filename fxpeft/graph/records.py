"""The named adapters of one graph: their records, and removing them.

``graph_state(gm).adapters`` (``fxpeft.graph.state``) maps each adapter name to an ``AdapterRecord`` (the rules and
matches that built it, its ``modules_to_save``, and the targets its splices attached), which
``fxpeft.save`` writes out and ``delete_adapter`` undoes. Removal reads only node records
(``fxpeft.names.AdapterNode``): each removable node is replaced by its ``args[bypass]``, and the
adapter's other nodes then have no users and go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from fxpeft.graph.targets import fetch
from fxpeft.errors import FxpeftError
from fxpeft.graph.state import graph_state
from fxpeft.graph.gates import GATES, drop_gate, drop_unused_per_sample, set_adapter
from fxpeft.names import adapter_node, owning_adapter


@dataclass
class AdapterRecord:
    rules: Any  # fxpeft.rules.RuleSet
    matches: list = field(default_factory=list)
    modules_to_save: tuple[str, ...] = ()
    attached: list[str] = field(default_factory=list)  # targets its splices added
    frozen: list[str] = field(default_factory=list)  # parameters among them that never train


def adapter_records(gm: torch.nn.Module) -> dict[str, AdapterRecord]:
    return graph_state(gm).adapters


def record(gm: torch.nn.Module, adapter: str) -> AdapterRecord:
    records = adapter_records(gm)
    if adapter not in records:
        raise FxpeftError(f"no adapter {adapter!r} in this graph; it has {sorted(records)}")
    return records[adapter]


def adapters_by_kind(gm: torch.nn.Module) -> dict[str, list[str]]:
    """Each adapter kind the graph's rules rewrite with, and its adapters (in the order added).

    >>> adapters_by_kind(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph()))
    {}
    """
    found: dict[str, list[str]] = {}
    for name, rec in adapter_records(gm).items():
        for kind in dict.fromkeys(rule.rewrite for rule in rec.rules.rules):
            found.setdefault(kind, []).append(name)
    return found


def adapter_parameters(gm: torch.nn.Module, adapter: str) -> list[torch.nn.Parameter]:
    """The parameters ``adapter``'s splices attached (shared call sites count once)."""
    found: dict[int, torch.nn.Parameter] = {}
    for target in record(gm, adapter).attached:
        value = fetch(gm, target)
        params = value.parameters() if isinstance(value, torch.nn.Module) else \
            [value] if isinstance(value, torch.nn.Parameter) else []  # a buffer never trains
        for param in params:
            found[id(param)] = param
    return list(found.values())


def set_trainable(gm: torch.nn.Module, adapters: "list[str] | set[str]", trainable: bool) -> None:
    """``requires_grad`` of every parameter of ``adapters`` (those a kind keeps frozen stay so)."""
    for adapter in adapters:
        frozen = {id(fetch(gm, target)) for target in record(gm, adapter).frozen}
        for param in adapter_parameters(gm, adapter):
            param.requires_grad_(trainable and id(param) not in frozen)


def _check_names(gm: torch.nn.Module, names: Any) -> None:
    """``names`` is one adapter's name or a list of names (not None, which PEFT refuses too)."""
    if isinstance(names, str) or (isinstance(names, (list, tuple))
                                  and all(isinstance(name, str) for name in names)):
        return
    raise FxpeftError(f"set_adapter takes an adapter name or a list of names, got "
                      f"{type(names).__name__} {names!r:.60}; this graph has "
                      f"{sorted(adapter_records(gm))} (gm.disable_adapters() runs the base model)")


def activate(gm: torch.nn.Module, names: "str | list[str]", inference_mode: bool = False) -> None:
    """PEFT's ``set_adapter``: ``names`` become the active adapters and train (unless
    ``inference_mode``); every other adapter is switched off and frozen, so an optimizer's weight
    decay cannot shrink an adapter that is not being trained."""
    _check_names(gm, names)
    set_adapter(gm, names)
    active = {names} if isinstance(names, str) else set(names)
    set_trainable(gm, set(adapter_records(gm)) - active, False)
    set_trainable(gm, active, not inference_mode)


def strip_adapters(graph: torch.fx.Graph, adapters: set[str]) -> list[str]:
    """Remove ``adapters``' nodes from ``graph`` (bypassing each removable one); returns the
    targets they read."""
    targets = []
    for node in reversed(list(graph.nodes)):
        if owning_adapter(node) not in adapters:
            continue
        entry = adapter_node(node)
        if entry is not None and entry.removable:
            node.replace_all_uses_with(node.args[entry.bypass])
        if not node.users:
            if node.op == "get_attr":
                targets.append(node.target)
            graph.erase_node(node)
    drop_unused_per_sample(graph)
    left = [n.name for n in graph.nodes if owning_adapter(n) in adapters]
    if left:
        raise FxpeftError(f"cannot remove adapter nodes {left[:3]}: base nodes still read them")
    return targets


def _detach(gm: torch.nn.Module, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path)
    if name in owner._modules:
        del owner._modules[name]
    elif hasattr(owner, name):
        delattr(owner, name)


def delete_adapter(gm: torch.fx.GraphModule, adapter: str) -> None:
    """Remove ``adapter`` from ``gm``: its nodes, parameters, gate and record."""
    attached = record(gm, adapter).attached
    strip_adapters(gm.graph, {adapter})
    for target in attached:
        _detach(gm, target)
    gates = getattr(gm, GATES, None)
    if gates is not None:
        drop_gate(gates, adapter)
    adapter_records(gm).pop(adapter, None)
    gm.graph.lint()
    gm.recompile()
