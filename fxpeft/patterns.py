"""Recognisers for "a linear layer" in a captured graph. A linear is a pattern, not one op."""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx

from fxpeft.names import is_fxpeft_node
from fxpeft.program import LinearSite

aten = torch.ops.aten
_FUNCTIONAL_LINEAR = (torch.nn.functional.linear, torch._C._nn.linear, aten.linear.default)


def owning_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """(module path, qualified type name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return path, kind


def fetch_attr(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(gm)


def _weight(gm: torch.fx.GraphModule, node: object) -> tuple[str, torch.Tensor] | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = fetch_attr(gm, node.target)
        if isinstance(value, torch.Tensor) and value.dim() == 2:
            return node.target, value
    return None


def _from_functional(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    if node.op != "call_function" or node.target not in _FUNCTIONAL_LINEAR:
        return None
    found = _weight(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    if found is None:
        return None
    target, weight = found
    path, kind = owning_module(node) or (target.rsplit(".", 1)[0], "torch.nn.modules.linear.Linear")
    return LinearSite(node, "linear", path, kind, weight.shape[1], weight.shape[0], target)


def _from_addmm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    """GPT-2 ``Conv1D``: ``addmm(bias, x2d, W[in, out])`` or ``mm(x2d, W[in, out])``."""
    if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
        return None
    found = _weight(gm, node.args[-1])
    owner = owning_module(node)
    if found is None or owner is None:
        return None
    target, weight = found
    kind = "addmm" if node.target is aten.addmm.default else "mm"
    return LinearSite(node, kind, owner[0], owner[1], weight.shape[0], weight.shape[1], target)


def _from_call_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, torch.nn.Linear):
        return None
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return LinearSite(node, "module", node.target, kind, module.in_features,
                      module.out_features, f"{node.target}.weight")


LINEAR_RECOGNISERS: tuple[Callable[[torch.fx.GraphModule, torch.fx.Node], LinearSite | None], ...] = (
    _from_functional, _from_addmm, _from_call_module)


def find_linear_sites(gm: torch.fx.GraphModule) -> list[LinearSite]:
    """Every node in ``gm`` that computes a linear layer of the model (not of an adapter), in
    graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    >>> [(s.module_path, s.in_features, s.out_features) for s in find_linear_sites(gm)]
    [('0', 2, 3)]
    """
    sites = []
    for node in gm.graph.nodes:
        if is_fxpeft_node(node):
            continue
        for recognise in LINEAR_RECOGNISERS:
            if (site := recognise(gm, node)) is not None:
                sites.append(site)
                break
    return sites
