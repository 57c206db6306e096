"""``modules_to_save`` (PEFT's, e.g. BERT's ``classifier``): a fully trainable copy of a module.

The copy is ``<path>.modules_to_save`` (``modules_to_save_<name>`` for other adapters). Each
read of an original parameter (or, in a symbolic_trace graph, each call of the module) becomes
``where(gate, copy, original)``, so the adapter's gate picks the copy; the ``where`` is the removable node (bypass to the original), and merge takes the
copy's values. It is applied by keyword (``modules_to_save=[...]``), not by rules, and PEFT saves
it inside every kind's config, so it has no PEFT format of its own.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx

from fxpeft.graph.params import attach_component, is_adapter_parameter
from fxpeft.graph.targets import fetch
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import gate_node
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.names import ADAPTER_META, MODULES_TO_SAVE, AdapterNode, is_fxpeft_node

aten = torch.ops.aten


@dataclass(frozen=True)
class ModuleSite:
    """A whole module, by path: what ``modules_to_save`` copies."""

    module_path: str


@dataclass(frozen=True)
class CopyDetail:
    """One parameter read: the original's target and the copy's."""

    base: str
    copy: str


def module_sites(gm: torch.nn.Module, names: Sequence[str]) -> list[ModuleSite]:
    """PEFT's rule: a module path equal to a name or ending in ``.name``; outermost only.

    >>> module_sites(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["0"])
    [ModuleSite(module_path='0')]
    """
    paths = [p for p, _ in gm.named_modules() if p and any(p == n or p.endswith(f".{n}") for n in names)]
    return [ModuleSite(p) for p in paths if not any(p.startswith(f"{q}.") for q in paths)]


def _trainable_copy(module: torch.nn.Module) -> torch.nn.Module:
    copied = copy.deepcopy(module)
    for child in [n for n, _ in copied.named_children() if is_adapter_parameter(n)]:
        delattr(copied, child)  # adapters' own submodules are not part of the copy
    return copied.requires_grad_(True)  # the base it copies may already be frozen


def _reads(gm: torch.fx.GraphModule, path: str) -> list[torch.fx.Node]:
    """The base graph's reads of the module at ``path``: its parameters (``get_attr``, exported
    graphs) or calls of it or its submodules (``call_module``, symbolic_trace graphs)."""
    return [n for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and not is_fxpeft_node(n)
            and (n.target == path or n.target.startswith(f"{path}."))]


def _copied(graph: torch.fx.Graph, node: torch.fx.Node, target: str) -> torch.fx.Node:
    """The same read, of the copy."""
    if node.op == "get_attr":
        return graph.get_attr(target)
    return graph.call_module(target, node.args, node.kwargs)


def _route_read(job: SpliceInput, node: torch.fx.Node, copy_path: str) -> list[torch.fx.Node]:
    """``where(gate > 0, copy, original)`` for one read (a parameter, or a module's output)."""
    graph, path = job.gm.graph, job.site.module_path
    with graph.inserting_before(node.next):  # keeps creation order
        copied = _copied(graph, node, copy_path + node.target[len(path):])
        on = graph.call_function(aten.gt.Scalar, (gate_node(job.gm, job.adapter,
                                                            fetch(job.gm, node.target)), 0))
        chosen = graph.call_function(aten.where.self, (on, copied, node))
    node.replace_all_uses_with(chosen, delete_user_cb=lambda user: user is not chosen)
    detail = CopyDetail(node.target, copied.target)
    for added, bypass in ((copied, None), (on, None), (chosen, 2)):
        added.meta[ADAPTER_META] = AdapterNode(MODULES_TO_SAVE, job.adapter, path, bypass, detail)
    return [copied, on, chosen]


def splice(job: SpliceInput) -> Spliced:
    """Give the adapter a trainable copy of the module; every read of its parameters picks it."""
    gm, path = job.gm, job.site.module_path
    copy_path = attach_component(gm, path, MODULES_TO_SAVE, job.adapter,
                                 _trainable_copy(gm.get_submodule(path)))
    reads = _reads(gm, path)
    if not reads:
        raise FxpeftError(f"modules_to_save: the graph never reads {path!r} (neither its "
                          f"parameters nor a call of it)")
    return Spliced([added for node in reads for added in _route_read(job, node, copy_path)],
                   [copy_path])


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """The copy's values replace the original's (outer ``where``s come later and win)."""
    copied = fetch(gm, record.detail.copy)
    if isinstance(copied, torch.nn.Module):  # a called module: each of its parameters
        for name, param in copied.named_parameters():
            weights[f"{record.detail.base}.{name}"] = param.detach().clone()
    else:
        weights[record.detail.base] = copied.detach().clone()


KIND = AdapterKind(name=MODULES_TO_SAVE, params=None, splice=splice, merge=merge,
                   components=(MODULES_TO_SAVE,), keyword_sites=module_sites,
                   no_weight_delta="modules_to_save trains whole copies of modules, which "
                                   "vLLM-style servers refuse (modules_to_save must be None)")
