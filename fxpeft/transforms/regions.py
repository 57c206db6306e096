"""Regional compilation as a graph pass (``fxpeft.fuse(gm, regions="layers")``): the decoder
layers of one model are identical graphs, so each layer's nodes become a call of one shared
region module (one per distinct layer structure), with the layer's own weights as arguments.
The region runs under ``torch.compiler.nested_compile_region``, so ``torch.compile`` of the
whole graph traces and compiles it once and stamps it out at every layer: cold compile time
stops growing with depth. In eager the mark is a no-op.

A region's inputs are every value it reads from outside (hidden state, rotary tables, mask, and
its weights as ``get_attr`` values, as ``fxpeft.transforms.checkpoint`` builds them), so regions
own no parameters: they stay where they were, under their own names.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxpeft.transforms.checkpoint import Region, call_region, layer_spans, region_of

REGIONS_MODULE = "_fxpeft_regions"


class LayerRegion(torch.nn.Module):
    """Runs one layer structure's graph; ``torch.compile`` compiles it once for every layer that
    calls it (``nested_compile_region``)."""

    def __init__(self, region: torch.fx.GraphModule) -> None:
        super().__init__()
        self.region = region

    @torch.compiler.nested_compile_region
    def forward(self, *args: Any) -> Any:
        return self.region(*args)


def _structure(graph: torch.fx.Graph) -> tuple:
    """What makes two region graphs the same code: each node's op, target, and arguments, with
    nodes named by position (names differ between layers, structure does not)."""
    position = {node: index for index, node in enumerate(graph.nodes)}
    rename = lambda a: ("node", position[a])  # noqa: E731 - a map_arg callback
    return tuple((n.op, str(n.target), repr(torch.fx.map_arg(n.args, rename)),
                  repr(torch.fx.map_arg(n.kwargs, rename))) for n in graph.nodes)


def _shared_module(gm: torch.fx.GraphModule, region: Region, shared: dict[tuple, str]) -> str:
    """The target of the region module for ``region``'s structure, added the first time."""
    key = _structure(region.graph)
    if key not in shared:
        name = f"layer_{len(shared)}"
        module = torch.fx.GraphModule(gm, region.graph, class_name=f"Region{len(shared)}")
        gm.get_submodule(REGIONS_MODULE).add_module(name, LayerRegion(module))
        shared[key] = f"{REGIONS_MODULE}.{name}"
    return shared[key]


def region_layers(gm: torch.fx.GraphModule) -> int:
    """Make each layer of ``gm`` a call of the shared region of its structure; returns how many
    layers (``gm.get_submodule(REGIONS_MODULE)`` holds one region per distinct structure)."""
    spans = layer_spans(gm.graph)
    if not spans:
        return 0
    if not hasattr(gm, REGIONS_MODULE):
        gm.add_module(REGIONS_MODULE, torch.nn.Module())
    shared: dict[tuple, str] = {}
    for nodes in spans.values():
        region = region_of(nodes)
        call_region(gm, region, _shared_module(gm, region, shared))
    return len(spans)
