"""All or nothing: a rewrite that fails part-way leaves the graph module as it was.

Passes only *add* (nodes, submodules, parameters, buffers) and re-point the arguments of
existing nodes, so undoing them is exact: restore every old node's arguments, erase the new
nodes, and remove every name added to a module that existed before. Old nodes stay the same
objects, so a ``Program``'s index of the graph stays valid.

>>> import torch
>>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
>>> try:
...     with rollback_on_error(gm):
...         gm.get_submodule("0").register_parameter("extra", torch.nn.Parameter(torch.ones(1)))
...         raise RuntimeError("pass failed")
... except RuntimeError:
...     pass
>>> [name for name, _ in gm.named_parameters()]
['0.weight', '0.bias']
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.fx

_SLOTS = ("_modules", "_parameters", "_buffers")


def _module_names(gm: torch.nn.Module) -> dict[int, tuple[torch.nn.Module, dict[str, set[str]]]]:
    """Per module (by identity): the names in each of its slots."""
    return {id(m): (m, {slot: set(getattr(m, slot)) for slot in _SLOTS})
            for m in gm.modules()}


def _restore_modules(saved: dict[int, tuple[torch.nn.Module, dict[str, set[str]]]]) -> None:
    for module, slots in saved.values():
        for slot, names in slots.items():
            table = getattr(module, slot)
            for name in [n for n in table if n not in names]:
                del table[name]
        module._non_persistent_buffers_set &= slots["_buffers"]


def _restore_graph(graph: torch.fx.Graph, saved: dict[torch.fx.Node, tuple[Any, Any]]) -> None:
    for node, (args, kwargs) in saved.items():  # first cut the new nodes out of the old ones
        node.args, node.kwargs = args, kwargs
    for node in reversed([n for n in graph.nodes if n not in saved]):
        graph.erase_node(node)


@contextlib.contextmanager
def rollback_on_error(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Run the ``with`` block; if it raises, undo what it added to ``gm`` and re-raise."""
    nodes = {n: (n.args, n.kwargs) for n in gm.graph.nodes}
    modules = _module_names(gm)
    try:
        yield
    except BaseException:
        _restore_graph(gm.graph, nodes)
        _restore_modules(modules)
        gm.recompile()
        raise
