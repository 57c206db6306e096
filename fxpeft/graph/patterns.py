"""Fixed-shape rewrites as a pattern and a replacement, the shape of inductor's pattern matcher
(``CallFunction`` / ``KeywordArg`` patterns with a replacement), small enough to read.

A pattern is a tree of ``Op`` (a ``call_function`` node with that target, whose arguments match
the sub-patterns in order) and ``Var`` (any argument, bound by name; the same name twice must be
the same value). An ``Op`` with a ``name`` binds its node too; ``single_user`` asks that only its
parent reads it (so the rewrite may drop it); ``where`` filters on the node. Matching is a query
(``match``); ``replace_matches`` consumes the matches.

>>> import operator, torch
>>> graph = torch.fx.Graph()
>>> x = graph.placeholder("x")
>>> _ = graph.output(graph.call_function(operator.mul, (graph.call_function(operator.neg, (x,)), 1)))
>>> gm = torch.fx.GraphModule(torch.nn.Module(), graph)
>>> times_one = Op(operator.mul, (Op(operator.neg, (Var("x"),), single_user=True), 1))
>>> replace_matches(gm, times_one, lambda g, b: g.call_function(operator.neg, (b["x"],)))
1
>>> [n.target for n in gm.graph.nodes if n.op == "call_function"]
[<built-in function neg>]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx

Bindings = dict[str, Any]


@dataclass(frozen=True)
class Var:
    """Any argument, bound under ``name``."""

    name: str


@dataclass(frozen=True)
class Op:
    """A ``call_function`` node of ``target`` (None: any target) with exactly these arguments
    and no keyword arguments."""

    target: Any
    args: tuple[Any, ...]
    name: str | None = None
    single_user: bool = False
    where: Callable[[torch.fx.Node], bool] | None = None


def match(pattern: Any, value: Any, bindings: Bindings | None = None) -> Bindings | None:
    """The bindings under which ``value`` has the shape ``pattern``, or None. The matched
    ``Op`` nodes, anchor first, are under ``"_nodes"``."""
    bindings = {"_nodes": []} if bindings is None else bindings
    if isinstance(pattern, Var):
        if pattern.name in bindings and bindings[pattern.name] is not value:
            return None
        bindings[pattern.name] = value
        return bindings
    if not isinstance(pattern, Op):
        return bindings if pattern == value else None
    if not _node_fits(pattern, value):
        return None
    bindings["_nodes"].append(value)
    if pattern.name is not None:
        bindings[pattern.name] = value
    for sub, arg in zip(pattern.args, value.args):
        if match(sub, arg, bindings) is None:
            return None
    return bindings


def _node_fits(pattern: Op, value: Any) -> bool:
    return isinstance(value, torch.fx.Node) and value.op == "call_function" and \
        (pattern.target is None or value.target == pattern.target) and \
        len(value.args) == len(pattern.args) and not value.kwargs and \
        (not pattern.single_user or len(value.users) == 1) and \
        (pattern.where is None or pattern.where(value))


def replace_matches(gm: torch.fx.GraphModule, pattern: Op,
                    replacement: Callable[[torch.fx.Graph, Bindings], torch.fx.Node]) -> int:
    """Replace the anchor of every match of ``pattern`` with the node ``replacement(graph,
    bindings)`` builds just before it, then drop the matched nodes nothing reads any more.
    Returns the number of matches replaced."""
    replaced, gone = 0, set()
    for node in list(gm.graph.nodes):
        found = None if node in gone else match(pattern, node)
        if found is None:
            continue
        with gm.graph.inserting_before(node):
            new = replacement(gm.graph, found)
        node.replace_all_uses_with(new)
        for matched in found["_nodes"]:  # anchor first: each before what it reads
            if not matched.users:
                gm.graph.erase_node(matched)
                gone.add(matched)
        replaced += 1
    return replaced


def copy_node(graph: torch.fx.Graph, like: torch.fx.Node, args: tuple[Any, ...]) -> torch.fx.Node:
    """A node calling ``like``'s target on ``args``, with a copy of ``like``'s meta (records,
    values): for replacements that keep a matched node's role."""
    node = graph.call_function(like.target, args)
    node.meta = dict(like.meta)
    return node
