"""The captured model: a GraphModule plus an index from graph nodes to module paths."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout)
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(module_path: str) -> int | None:
    """The first numeric component of a module path: its layer (block) index.

    >>> layer_index("model.layers.12.self_attn.q_proj"), layer_index("lm_head")
    (12, None)
    """
    found = _LAYER_INDEX.search(f".{module_path}")
    return int(found.group(1)) if found else None


def is_cast(node: object) -> bool:
    """Whether ``node`` is a dtype cast (``x.to(dtype)``) in a captured graph."""
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CASTS


class WeightedSite:
    """What every site with a base weight (``weight_target``) can say about it."""

    def weight_like(self, gm: torch.nn.Module) -> torch.Tensor:
        """A tensor with the base weight's (dequantized) dtype and device, for adapters to be
        made like."""
        weight = gm.get_parameter(self.weight_target)  # type: ignore[attr-defined]
        dtype = getattr(self, "dtype", None)
        return weight if dtype is None else weight.new_empty(0, dtype=dtype)


@dataclass(frozen=True)
class LinearSite(WeightedSite):
    """A node that computes a linear layer, whatever op spells it.

    ``kind`` is ``linear`` (aten.linear / F.linear), ``addmm`` / ``mm`` (GPT-2 ``Conv1D``, weight
    stored ``[in, out]``), ``matmul`` (a hand-written ``x @ W.T (+ b)`` or ``x @ W``), or ``module``
    (``call_module`` to an ``nn.Linear``), or ``quantized`` (a bitsandbytes layer as one
    ``fxpeft::linear_*`` op, ``fxpeft.quantized``). ``node`` is the layer's output; ``core`` is
    the matmul when a separate ``add`` of the bias produces the output, or a quantized layer's
    op, whose input and output may be cast to and from its compute dtype. ``dtype``, for
    quantized sites, is the dtype the weight dequantizes to (the stored weight is packed
    integers).
    """

    node: torch.fx.Node
    kind: str
    module_path: str
    module_type: str
    in_features: int
    out_features: int
    weight_target: str
    fan_in_fan_out: bool = False
    core: torch.fx.Node | None = None
    dtype: torch.dtype | None = None

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    @property
    def consumer(self) -> torch.fx.Node:
        """The node that reads the layer's input (for a quantized layer, its cast to the
        compute dtype, if it has one)."""
        if self.kind == "quantized" and is_cast(self.core.args[0]):
            return self.core.args[0]
        return self.core if self.core is not None else self.node

    @property
    def input(self) -> torch.fx.Node:
        """The input as the graph has it now: an earlier splice (IA3 on a feed-forward input)
        may have routed it through new nodes since capture."""
        return self.consumer.args[-2 if self.kind in ("addmm", "mm") else 0]

    def bias_target(self, gm: torch.nn.Module) -> str | None:
        """Where the layer's bias lives, if it has one."""
        if self.kind == "quantized":
            bias = self.core.args[-1]
            bias = bias.args[0] if isinstance(bias, torch.fx.Node) and bias.op == "call_function" else bias
            return bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None
        if self.kind == "module":
            return f"{self.node.target}.bias" if gm.get_submodule(self.node.target).bias is not None else None
        args = self.node.args
        if self.kind == "matmul":
            bias = args[1] if self.core is not None else None
        else:
            bias = args[0] if self.kind == "addmm" else (args[2] if len(args) > 2 else None)
        return bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None


def erase_unused(graph: torch.fx.Graph, node: object) -> None:
    """Erase ``node`` if nothing reads it, then each of its producers that this leaves unread
    (a pass's replaced chain), stopping at placeholders, ``get_attr`` and impure ops.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> y = g.call_function(torch.neg, (g.call_function(torch.neg, (x,)),)); _ = g.output(x)
    >>> erase_unused(g, y); [n.op for n in g.nodes]
    ['placeholder', 'output']
    """
    pending = [node]
    while pending:
        node = pending.pop()
        if isinstance(node, torch.fx.Node) and node.graph is graph and node.op == "call_function" \
                and not node.users and not node.is_impure():
            pending.extend(node.all_input_nodes)
            graph.erase_node(node)


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` (its code generator too); node metadata is shared, not copied.

    >>> g = torch.fx.Graph(); _ = g.output(g.placeholder("x"))
    >>> len(copy_graph(g).nodes)
    2
    """
    new = torch.fx.Graph()
    new._codegen = copy.deepcopy(graph._codegen)
    new.output(new.graph_copy(graph, {}))
    return new


def shell_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy sharing ``module``'s parameters and buffers but with its own attribute tables, so
    adapters attached to it (and its train flag) leave the user's module as it was.

    >>> linear = torch.nn.Linear(2, 2)
    >>> shell_module(linear).weight is linear.weight, shell_module(linear) is linear
    (True, False)
    """
    shell = copy.copy(module)
    shell._modules, shell._parameters = dict(module._modules), dict(module._parameters)
    shell._buffers = dict(module._buffers)
    return shell


@dataclass(frozen=True)
class CaptureInfo:
    """What capture learned about the model, kept on the emitted graph (``gm.capture_info``).

    ``inputs``: the captured input names (HF graphs); ``config``: the model's config;
    ``out_spec``, ``max_seq``: the output tree and the longest sequence the export allows;
    ``training``: the model's mode when captured (the emitted graph starts in it).
    """

    model_class: str
    frontend: str
    inputs: tuple[str, ...] = ()
    config: Any = None
    out_spec: Any = None
    max_seq: int | None = None
    training: bool = False


@dataclass
class Program:
    """What capture produces and passes transform: a graph module, what capture learned about
    the model (``info``), and an index of its linear layers (``sites``).

    ``layer_count`` is the number of distinct layer indices seen (for negative ``layer_range``).
    """

    graph_module: torch.fx.GraphModule
    info: CaptureInfo
    sites: list[LinearSite] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def model_class(self) -> str:
        return self.info.model_class

    @property
    def frontend(self) -> str:
        return self.info.frontend

    @property
    def layer_count(self) -> int:
        layers = {s.layer for s in self.sites if s.layer is not None}
        return max(layers) + 1 if layers else 0

    def module_paths(self) -> list[str]:
        return [s.module_path for s in self.sites]
