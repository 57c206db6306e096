"""Fold adapters into base weights: ``merge`` (a new graph) and ``merge_into`` (the HF model).

Only active adapters fold in (an off gate contributes nothing). The merged graph has the base
graph's nodes, and new parameter objects wherever a weight changed: the weights it shares with
the original model are never written. A kind folds through ``register_merger(kind, fn)``; ``fn``
gets (gm, node, meta, gate, weights) for each of its nodes and updates ``weights`` (target ->
merged tensor).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.adapter_set import MODULES_TO_SAVE, fetch, strip_adapters
from fxpeft.adapters import is_adapter_parameter
from fxpeft.errors import FxpeftError
from fxpeft.gates import GATES, adapter_names
from fxpeft.graph_module import AdaptedModule
from fxpeft.hf import INPUTS_MODULE
from fxpeft.transforms.ia3 import merge_ia3
from fxpeft.transforms.lora import ADAPTER_META

aten = torch.ops.aten
Merger = Callable[[torch.fx.GraphModule, torch.fx.Node, dict, float, dict], None]


def _fold_lora(gm: torch.fx.GraphModule, node: torch.fx.Node, meta: dict, gate: float,
               weights: dict[str, torch.Tensor]) -> None:
    if node.target != aten.add.Tensor:
        return
    base = weights.get(meta["weight"], fetch(gm, meta["weight"]).detach())
    delta = fetch(gm, meta["lora_B"]).detach() @ fetch(gm, meta["lora_A"]).detach()
    delta = delta * (meta["scale"] * gate)
    weights[meta["weight"]] = base + (delta.T if meta["fan_in_fan_out"] else delta).to(base.dtype)


def _fold_modules_to_save(gm: torch.fx.GraphModule, node: torch.fx.Node, meta: dict, gate: float,
                          weights: dict[str, torch.Tensor]) -> None:
    if node.target == aten.where.self:  # outer wheres come later in the graph and win
        weights[meta["base"]] = fetch(gm, meta["copy"]).detach().clone()


MERGERS: dict[str, Merger] = {"lora": _fold_lora, MODULES_TO_SAVE: _fold_modules_to_save,
                              "ia3": merge_ia3}


def register_merger(kind: str, fn: Merger) -> None:
    """Teach ``merge`` to fold adapters of ``kind``."""
    MERGERS[kind] = fn


def merged_weights(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Base parameter target -> its value with every active adapter folded in (new tensors)."""
    gates = {name: float(getattr(getattr(gm, GATES), name)) for name in adapter_names(gm)}
    weights: dict[str, torch.Tensor] = {}
    for node in gm.graph.nodes:
        meta = node.meta.get(ADAPTER_META)
        if not meta or gates.get(meta.get("adapter"), 1.0) == 0:
            continue
        if meta["kind"] not in MERGERS:
            raise FxpeftError(f"merge: no merger for {meta['kind']!r} adapters (node {node.name}); "
                              f"known: {sorted(MERGERS)}")
        MERGERS[meta["kind"]](gm, node, meta, gates.get(meta.get("adapter"), 1.0), weights)
    return weights


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    output = new.graph_copy(graph, {})
    new.output(output)
    return new


def _place(root: torch.nn.Module, target: str, value: Any) -> None:
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


def _module_with(module: torch.nn.Module, target: str, weights: dict) -> torch.nn.Module:
    """A ``call_module`` target as the merged graph needs it: a shallow copy holding the merged
    weights and none of the adapters' own parameters or submodules (``lora_A``, ``ia3_l_b``)."""
    changed = {k[len(target) + 1:]: v for k, v in weights.items() if k.startswith(f"{target}.")}
    adapters = [k for k in (*module._parameters, *module._modules) if is_adapter_parameter(k)]
    if not changed and not adapters:
        return module
    clone = copy.copy(module)
    clone._parameters = {k: v for k, v in module._parameters.items() if k not in adapters}
    clone._modules = {k: v for k, v in module._modules.items() if k not in adapters}
    for name, value in changed.items():
        clone._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    return clone


def _mark_without_adapters(root: torch.nn.Module) -> None:
    """The merged graph's input adapter (a copy: ``gm`` keeps its own) refuses adapter_names."""
    inputs = getattr(root, INPUTS_MODULE, None)
    if inputs is not None:
        inputs = copy.copy(inputs)
        inputs.has_adapters = False
        setattr(root, INPUTS_MODULE, inputs)


def merge(gm: AdaptedModule) -> AdaptedModule:
    """A new graph with every active adapter folded into (new) base weights: the base graph's
    nodes, the adapted graph's outputs. ``gm`` and the original model are left as they were.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> merged = fxpeft.merge(gm)
    >>> fxpeft.trainable_parameters(merged), merged.get_submodule("0").weight is net[0].weight
    ((0, 20), False)
    """
    weights = merged_weights(gm)
    graph = _copy_graph(gm.graph)
    strip_adapters(graph, set(adapter_names(gm)) | {"default"})
    root = torch.nn.Module()
    for node in graph.nodes:
        if node.op == "get_attr" and node.target in weights:
            _place(root, node.target, torch.nn.Parameter(weights[node.target], requires_grad=False))
        elif node.op == "get_attr" and not hasattr_path(root, node.target):
            _place(root, node.target, fetch(gm, node.target))
        elif node.op == "call_module" and not hasattr_path(root, node.target):
            _place(root, node.target, _module_with(gm.get_submodule(node.target), node.target, weights))
    _mark_without_adapters(root)
    merged = AdaptedModule(root, graph, class_name=type(gm).__name__)
    merged.requires_grad_(False)
    return merged.train(gm.training)


def hasattr_path(root: torch.nn.Module, target: str) -> bool:
    try:
        fetch(root, target)
    except AttributeError:
        return False
    return True


def merge_into(model: torch.nn.Module, gm: AdaptedModule) -> torch.nn.Module:
    """Write ``gm``'s merged weights into ``model`` (new parameter objects, so ``gm`` stays
    valid); ``model.save_pretrained()`` then saves a plain checkpoint. Returns ``model``.

    >>> import torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> fxpeft.merge_into(net, gm) is net
    True
    """
    for target, value in merged_weights(gm).items():
        owner_path, _, name = target.rpartition(".")
        owner = model.get_submodule(owner_path)
        old = getattr(owner, name, None)
        if not isinstance(old, torch.nn.Parameter) or old.shape != value.shape:
            raise FxpeftError(f"merge_into: {type(model).__name__} has no parameter {target!r} "
                              f"of shape {list(value.shape)}; is it the model gm was built from?")
        owner._parameters[name] = torch.nn.Parameter(value.detach().clone(),
                                                     requires_grad=old.requires_grad)
    return model
