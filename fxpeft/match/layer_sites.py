"""Recognisers for embedding and convolution layers in a captured graph: the ``embedding`` and
``conv`` match kinds. Like ``fxpeft.capture.linear_sites`` for linears, each site ties one graph node to its
module path, its module type and the features a rewrite needs (sizes, stride, padding, ...).

Recognised: ``aten.embedding`` (export) and ``call_module`` to an ``nn.Embedding``
(symbolic_trace); ``aten.conv1d`` / ``conv2d`` / ``conv3d`` / ``aten.convolution`` (not
transposed) and ``call_module`` to an ``nn.Conv1d`` / ``Conv2d`` / ``Conv3d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from fxpeft.names import ADAPTER_META, is_fxpeft_node
from fxpeft.capture.linear_sites import WeightedSite, weight_of, weight_owner
from fxpeft.capture.program import layer_index

aten = torch.ops.aten
_EMBEDDINGS = (aten.embedding.default,)
# op -> the index of its groups argument (the others: input, weight, bias, stride, padding, dilation)
_CONVS = {aten.conv1d.default: 6, aten.conv2d.default: 6, aten.conv3d.default: 6,
          aten.conv1d.padding: 6, aten.conv2d.padding: 6, aten.conv3d.padding: 6,
          aten.convolution.default: 8}
_CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _type_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@dataclass(frozen=True)
class EmbeddingSite(WeightedSite):
    """A node that looks rows up in an embedding table ``[num_embeddings, embedding_dim]``.

    ``padding_idx`` (-1 for none), ``scale_grad_by_freq`` and ``sparse`` are the lookup's own
    arguments, which an adapter's lookup repeats. ``kind`` is ``embedding`` (aten) or ``module``.
    """

    node: torch.fx.Node
    kind: str
    module_path: str
    module_type: str
    num_embeddings: int
    embedding_dim: int
    weight_target: str
    padding_idx: int = -1
    scale_grad_by_freq: bool = False
    sparse: bool = False
    fan_in_fan_out = False  # PEFT's flag concerns linears; an embedding site never sets it

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    @property
    def input(self) -> torch.fx.Node:
        """The indices, as the graph has them now."""
        return self.node.args[0] if self.kind == "module" else self.node.args[1]

    def bias_target(self, gm: torch.nn.Module) -> None:
        return None

    def describe(self) -> str:
        return f"embedding {self.num_embeddings}x{self.embedding_dim}"


@dataclass(frozen=True)
class ConvSite(WeightedSite):
    """A node that computes a (not transposed) 1-d, 2-d or 3-d convolution; its weight is
    ``[out_channels, in_channels / groups, *kernel_size]``. ``padding`` is a tuple or a string
    (``"same"``, ``"valid"``). ``kind`` is ``conv`` (aten) or ``module``."""

    node: torch.fx.Node
    kind: str
    module_path: str
    module_type: str
    in_channels: int
    out_channels: int
    weight_target: str
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: "tuple[int, ...] | str"
    dilation: tuple[int, ...]
    groups: int = 1
    fan_in_fan_out = False

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    @property
    def dims(self) -> int:
        return len(self.kernel_size)

    @property
    def consumer(self) -> torch.fx.Node:
        """The node that reads the layer's input (the convolution itself), as a linear site's
        ``consumer``: a kind that scales the input splices before it."""
        return self.node

    @property
    def input(self) -> torch.fx.Node:
        """The input as the graph has it now (an earlier splice may have routed it)."""
        return self.node.args[0]

    def bias_target(self, gm: torch.nn.Module) -> str | None:
        if self.kind == "module":
            return f"{self.node.target}.bias" if gm.get_submodule(self.node.target).bias is not None else None
        bias = self.node.args[2] if len(self.node.args) > 2 else self.node.kwargs.get("bias")
        return bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None

    def describe(self) -> str:
        kernel = "x".join(map(str, self.kernel_size))
        return (f"conv{self.dims}d {self.in_channels}->{self.out_channels} kernel {kernel} stride "
                f"{list(self.stride)} padding {self.padding!r} groups {self.groups}")


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _base_table(node: Any) -> Any:
    """The table an adapter's new table stands in for (its removable node's bypass: trainable
    tokens' ``index_copy``), so another adapter finds the lookup still.

    >>> _base_table(None) is None
    True
    """
    record = getattr(node, "meta", {}).get(ADAPTER_META)
    while record is not None and record.bypass is not None:
        node = node.args[record.bypass]
        record = node.meta.get(ADAPTER_META)
    return node


def _embedding_from_aten(gm: torch.fx.GraphModule, node: torch.fx.Node) -> EmbeddingSite | None:
    if node.op != "call_function" or node.target not in _EMBEDDINGS:
        return None
    found = weight_of(gm, _base_table(node.args[0]))
    if found is None or found[1].dim() != 2:
        return None
    target, weight = found
    path, kind = weight_owner(gm, node, target)
    return EmbeddingSite(node, "embedding", path, kind, weight.shape[0], weight.shape[1], target,
                         _arg(node, 2, "padding_idx", -1), _arg(node, 3, "scale_grad_by_freq", False),
                         _arg(node, 4, "sparse", False))


def _embedding_from_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> EmbeddingSite | None:
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, torch.nn.Embedding) or module.max_norm is not None:
        return None  # max_norm renormalises the table in place: not a plain lookup
    padding = -1 if module.padding_idx is None else module.padding_idx
    return EmbeddingSite(node, "module", node.target, _type_name(module), module.num_embeddings,
                         module.embedding_dim, f"{node.target}.weight", padding,
                         module.scale_grad_by_freq, module.sparse)


def _ntuple(value: Any, dims: int) -> tuple[int, ...]:
    return tuple(value) * (dims if len(value) == 1 else 1) if isinstance(value, (list, tuple)) \
        else (value,) * dims


def _conv_from_aten(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ConvSite | None:
    if node.op != "call_function" or node.target not in _CONVS:
        return None
    found = weight_of(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    if found is None or found[1].dim() not in (3, 4, 5):
        return None
    if node.target == aten.convolution.default and (node.args[6] or any(node.args[7])):
        return None  # a transposed convolution
    target, weight = found
    dims, groups = weight.dim() - 2, _arg(node, _CONVS[node.target], "groups", 1)
    padding = _arg(node, 4, "padding", 0)
    path, kind = weight_owner(gm, node, target)
    return ConvSite(node, "conv", path, kind, weight.shape[1] * groups, weight.shape[0], target,
                    tuple(weight.shape[2:]), _ntuple(_arg(node, 3, "stride", 1), dims),
                    padding if isinstance(padding, str) else _ntuple(padding, dims),
                    _ntuple(_arg(node, 5, "dilation", 1), dims), groups)


def _conv_from_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> ConvSite | None:
    module = gm.get_submodule(node.target) if node.op == "call_module" else None
    if not isinstance(module, _CONV_MODULES) or module.padding_mode != "zeros":
        return None  # other padding modes pad the input first; an adapter would see other borders
    return ConvSite(node, "module", node.target, _type_name(module), module.in_channels,
                    module.out_channels, f"{node.target}.weight", tuple(module.kernel_size),
                    tuple(module.stride), module.padding, tuple(module.dilation), module.groups)


Recogniser = Callable[[torch.fx.GraphModule, torch.fx.Node], Any]
EMBEDDING_RECOGNISERS: tuple[Recogniser, ...] = (_embedding_from_aten, _embedding_from_module)
CONV_RECOGNISERS: tuple[Recogniser, ...] = (_conv_from_aten, _conv_from_module)


def _find(gm: torch.fx.GraphModule, recognisers: tuple[Recogniser, ...]) -> list[Any]:
    sites = []
    for node in gm.graph.nodes:
        if is_fxpeft_node(node):
            continue
        site = next((s for r in recognisers if (s := r(gm, node)) is not None), None)
        if site is not None:
            sites.append(site)
    return sites


def find_embedding_sites(gm: torch.fx.GraphModule) -> list[EmbeddingSite]:
    """Every embedding lookup of the model (not of an adapter), in graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Embedding(10, 4)))
    >>> [(s.module_path, s.num_embeddings, s.embedding_dim) for s in find_embedding_sites(gm)]
    [('0', 10, 4)]
    """
    return _find(gm, EMBEDDING_RECOGNISERS)


def find_conv_sites(gm: torch.fx.GraphModule) -> list[ConvSite]:
    """Every 1-d, 2-d or 3-d convolution of the model (not of an adapter), in graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1)))
    >>> [(s.module_path, s.in_channels, s.out_channels, s.kernel_size) for s in find_conv_sites(gm)]
    [('0', 3, 8, (3, 3))]
    """
    return _find(gm, CONV_RECOGNISERS)
