"""Dotted targets in a module tree (``model.layers.0.q_proj.weight``) and where a node came
from: the one attribute getter (``fetch``) every stage uses, its setter and test, and two node
helpers.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx


def fetch(root: torch.nn.Module, target: str) -> Any:
    """The attribute at dotted ``target`` (a parameter, buffer or submodule).

    >>> fetch(torch.nn.Sequential(torch.nn.Linear(2, 3)), "0.weight").shape
    torch.Size([3, 2])
    """
    return operator.attrgetter(target)(root) if target else root


def place(root: torch.nn.Module, target: str, value: Any) -> None:
    """Put ``value`` at dotted ``target`` under ``root``, creating plain parent modules."""
    *parents, name = target.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    if isinstance(value, torch.nn.Module):
        root.add_module(name, value)
    elif isinstance(value, torch.nn.Parameter):
        root.register_parameter(name, value)
    else:
        root.register_buffer(name, value)


def has_target(root: torch.nn.Module, target: str) -> bool:
    """Whether dotted ``target`` names an attribute under ``root``."""
    try:
        fetch(root, target)
    except AttributeError:
        return False
    return True


def nodes_between(first: torch.fx.Node, last: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes after ``first`` up to and including ``last``, in graph order."""
    nodes, node = [], first.next
    while node is not last:
        nodes.append(node)
        node = node.next
    return nodes + [last]


def owning_module(node: torch.fx.Node) -> tuple[str, str] | None:
    """(module path, qualified type name) of the innermost module that produced ``node``."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, kind = list(stack.values())[-1]
    kind = kind if isinstance(kind, str) else f"{kind.__module__}.{kind.__qualname__}"
    return path, kind
