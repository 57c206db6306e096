"""Layers as called modules that own their parameters (``fxpeft.layer_units``), so FSDP2's
``fully_shard`` can shard a graph layer by layer.

An adapted graph is flat: it reads every layer's weights with ``get_attr`` and calls no layer
module. FSDP2 gathers a unit's parameters in the unit's forward pre-hook and frees them in its
post-hook (and again around its backward), so on the flat graph the only unit is the whole
graph, and a step holds every layer's weights at once. This pass gives each layer's span of
nodes (``checkpoint.layer_spans``) back a module: ``model.layers.3`` becomes a ``GraphModule``
whose graph is that span, which reads the layer's weights (base and adapter) as its own
attributes, and which the outer graph calls. Parameter names do not change
(``model.layers.3.self_attn.q_proj.lora_A.weight``), so ``save`` / ``load`` and
``adapter_state_dict`` see the same adapter.

Why modules and not gather/free nodes in the graph (SimpleFSDP's way): ``fully_shard`` on
modules is what users, accelerate and the Trainer already do, and FSDP2 then brings its own
prefetching, mixed precision, gradient reduce-scatter and checkpoint gathering; gather nodes
would re-implement each of those, and every route would need to know about them.

The pass runs on a copy (the flat graph stays the default: the fuse passes and the kinds read
it); the copy shares every parameter and buffer with the original.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.fx

from fxpeft.capture.linear_sites import LinearSite, find_linear_sites
from fxpeft.errors import PassError
from fxpeft.transforms.checkpoint import call_region, layer_spans, region_of
from fxpeft.transforms.fuse import _copy

_OWNED_OPS = ("get_attr", "call_module")
LAYER_UNIT = "LayerUnit"  # every layer module's class name, and its mark in ``meta``


def _owned_reads(graph: torch.fx.Graph, layer: str, span: list[torch.fx.Node]) -> list[torch.fx.Node]:
    """The ``get_attr`` nodes of ``layer``'s own tensors; each must be read only inside ``span``."""
    prefix, inside = layer + ".", set(span)
    reads = [n for n in graph.find_nodes(op="get_attr") if str(n.target).startswith(prefix)]
    for read in reads:
        outside = [u for u in read.users if u not in inside]
        if outside:
            raise PassError(f"layer_units: {read.target} is read outside {layer}'s nodes (by "
                            f"{outside[0].name}); this layer cannot own its parameters")
    return reads


def _attribute(gm: torch.nn.Module, target: str) -> object:
    return functools.reduce(getattr, target.split("."), gm)


def _outline(gm: torch.fx.GraphModule, layer: str, span: list[torch.fx.Node]) -> None:
    """Replace ``layer``'s module by a ``GraphModule`` running ``span`` on its own tensors."""
    region = region_of(_owned_reads(gm.graph, layer, span) + span)
    prefix, attributes = layer + ".", {}
    for node in (n for n in region.graph.nodes if n.op in _OWNED_OPS):
        # the layer's own tensors under their names in the layer; shared modules the layer
        # calls (the graph's dropout) under their names in the graph
        attributes[str(node.target).removeprefix(prefix)] = _attribute(gm, str(node.target))
        node.target = str(node.target).removeprefix(prefix)
    old = gm.get_submodule(layer)
    unit = torch.fx.GraphModule(attributes, region.graph, class_name=LAYER_UNIT)
    unit.meta[LAYER_UNIT] = layer  # fully_shard swaps the class; the mark stays
    lost = {id(p) for p in old.parameters()} - {id(p) for p in unit.parameters()}
    if lost:
        raise PassError(f"layer_units: {layer} holds {len(lost)} parameter(s) its nodes never read")
    parent, _, name = layer.rpartition(".")
    setattr(gm.get_submodule(parent), name, unit.train(old.training))
    call_region(gm, region, layer)


def layer_modules(gm: torch.nn.Module) -> list[torch.nn.Module]:
    """The layer modules of a ``layer_units`` copy, in order (sharded or not).

    >>> layer_modules(torch.nn.Linear(2, 2))
    []
    """
    return [m for m in gm.modules() if LAYER_UNIT in getattr(m, "meta", {})]


def unit_sites(gm: torch.nn.Module) -> list[LinearSite]:
    """The linear layers of a ``layer_units`` copy (sharded or not) as the flat graph indexes
    them: each layer's (weights named from the graph's root), then the root's own. Saving
    reads them: PEFT's ``target_modules`` is written from every layer there is.

    >>> unit_sites(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))[0].module_path
    ''
    """
    sites = []
    for layer in layer_modules(gm):
        prefix = layer.meta[LAYER_UNIT] + "."
        sites += [dataclasses.replace(site, weight_target=prefix + site.weight_target)
                  for site in find_linear_sites(layer)]
    return sites + find_linear_sites(gm)


def unit_layers(gm: torch.fx.GraphModule) -> int:
    """Make each layer of ``gm`` (in place) a called module owning its tensors; returns how many."""
    spans = layer_spans(gm.graph)
    for layer, span in spans.items():
        _outline(gm, layer, span)
    gm.graph.lint()
    gm.recompile()
    return len(spans)


def layer_units(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` whose layers (``model.layers.0``, ...) are called modules that own their
    parameters, sharing them with ``gm``: ``fully_shard`` each of them, then the copy, and FSDP2
    gathers one layer's weights at a time. Same outputs, same parameter names.

    >>> import fxpeft, transformers
    >>> config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                                   num_hidden_layers=2, num_attention_heads=2)
    >>> units = fxpeft.layer_units(fxpeft.rewrite(transformers.LlamaForCausalLM(config), "lora_qv"))
    >>> [type(m).__name__ for m in units.model.layers.children()]
    ['LayerUnit', 'LayerUnit']
    """
    copy = _copy(gm)  # a derived copy, as fuse's: adapters are added to the graph it came from
    if unit_layers(copy) == 0:
        raise PassError("layer_units: the graph has no layers (model.layers.N, ...) to make units of")
    return copy.train(gm.training)
