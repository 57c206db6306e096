"""The captured model: a GraphModule plus an index from graph nodes to module paths."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(module_path: str) -> int | None:
    """The first numeric component of a module path: its layer (block) index.

    >>> layer_index("model.layers.12.self_attn.q_proj"), layer_index("lm_head")
    (12, None)
    """
    found = _LAYER_INDEX.search(f".{module_path}")
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class LinearSite:
    """A node that computes a linear layer, whatever op spells it.

    ``kind`` is ``linear`` (aten.linear / F.linear), ``addmm`` / ``mm`` (GPT-2 ``Conv1D``, weight
    stored ``[in, out]``), or ``module`` (``call_module`` to an ``nn.Linear``).
    """

    node: torch.fx.Node
    kind: str
    module_path: str
    module_type: str
    in_features: int
    out_features: int
    weight_target: str

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    @property
    def input(self) -> torch.fx.Node:
        """The input as the graph has it now: an earlier splice (IA3 on a feed-forward input)
        may have routed it through new nodes since capture."""
        return self.node.args[-2 if self.kind in ("addmm", "mm") else 0]

    @property
    def fan_in_fan_out(self) -> bool:
        return self.kind in ("addmm", "mm")


@dataclass
class Program:
    """What capture produces and passes transform.

    ``graph_module`` holds the graph and (shared) parameters; ``sites`` indexes the linear layers;
    ``model_class`` names the captured model; ``layer_count`` is the number of distinct layer
    indices seen (for negative ``layer_range`` values); ``info`` carries frontend details.
    """

    graph_module: torch.fx.GraphModule
    model_class: str
    frontend: str
    sites: list[LinearSite] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def layer_count(self) -> int:
        layers = {s.layer for s in self.sites if s.layer is not None}
        return max(layers) + 1 if layers else 0

    def module_paths(self) -> list[str]:
        return [s.module_path for s in self.sites]
