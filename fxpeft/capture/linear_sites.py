"""Recognisers for "a linear layer" in a captured graph. A linear is a pattern, not one op."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx

from fxpeft.capture.program import layer_index
from fxpeft.graph.targets import fetch, owning_module
from fxpeft.names import is_fxpeft_node
from fxpeft.capture.quantized import QUANTIZED_OPS

_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout)


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
    ``fxpeft::linear_*`` op, ``fxpeft.capture.quantized``). ``node`` is the layer's output; ``core`` is
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



aten = torch.ops.aten
_FUNCTIONAL_LINEAR = (torch.nn.functional.linear, torch._C._nn.linear, aten.linear.default)
_ADDMM = (aten.addmm.default, torch.addmm)
_MM = (aten.mm.default, torch.mm)
_MATMULS = (aten.matmul.default, aten.mm.default, operator.matmul, torch.matmul, torch.mm)
_TRANSPOSES = (aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default,
               torch.t, torch.transpose, torch.permute)
_ADDS = (aten.add.Tensor, operator.add, torch.add)


def weight_of(gm: torch.fx.GraphModule, node: object, dims: int | None = None
              ) -> tuple[str, torch.Tensor] | None:
    """``(target, tensor)`` when ``node`` reads a tensor attribute (of ``dims`` dimensions, if
    given): the weight a linear, embedding or convolution site computes with."""
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        value = fetch(gm, node.target)
        if isinstance(value, torch.Tensor) and dims in (None, value.dim()):
            return node.target, value
    return None


def _weight(gm: torch.fx.GraphModule, node: object) -> tuple[str, torch.Tensor] | None:
    return weight_of(gm, node, dims=2)


def weight_owner(gm: torch.fx.GraphModule, node: torch.fx.Node, weight_target: str,
                 bare: str | None = None) -> tuple[str, str]:
    """(path, type) of the module computing ``node``: its module stack; else the module whose
    weight it is (its real type); else, where ``bare`` names the functional op, for a bare
    parameter (not a module's ``weight``) the parameter's name and ``bare`` (never a made-up
    module type)."""
    found = owning_module(node)
    if found is not None and found[0]:
        return found
    path, _, name = weight_target.rpartition(".")
    if bare is not None and name != "weight":
        return weight_target, bare
    module = gm.get_submodule(path)
    return path, f"{type(module).__module__}.{type(module).__qualname__}"


def _owner(gm: torch.fx.GraphModule, node: torch.fx.Node, weight_target: str) -> tuple[str, str]:
    return weight_owner(gm, node, weight_target, bare="torch.nn.functional.linear")


def _from_functional(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    if node.op != "call_function" or node.target not in _FUNCTIONAL_LINEAR:
        return None
    found = _weight(gm, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
    if found is None:
        return None
    target, weight = found
    path, kind = _owner(gm, node, target)
    return LinearSite(node, "linear", path, kind, weight.shape[1], weight.shape[0], target)


def _from_addmm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    """GPT-2 ``Conv1D``: ``addmm(bias, x2d, W[in, out])`` or ``mm(x2d, W[in, out])``."""
    if node.op != "call_function" or node.target not in _ADDMM + _MM:
        return None
    found = _weight(gm, node.args[-1])
    owner = owning_module(node)
    if found is None or owner is None:
        return None
    target, weight = found
    kind = "addmm" if node.target in _ADDMM else "mm"
    return LinearSite(node, kind, owner[0], owner[1], weight.shape[0], weight.shape[1], target,
                      fan_in_fan_out=True)


def _transposed_weight(gm: torch.fx.GraphModule, node: object) -> tuple[str, torch.Tensor] | None:
    """``W.T`` / ``W.t()`` / ``transpose(W, 0, 1)`` / ``permute(W, [1, 0])`` of a 2-D weight."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    transposes = (node.op == "call_function" and (node.target in _TRANSPOSES or (
        node.target is getattr and node.args[1:] == ("T",)))) or (
        node.op == "call_method" and node.target in ("t", "transpose", "permute"))
    if not transposes or not all(a in (0, 1, -1, -2, [1, 0], (1, 0)) for a in node.args[1:]
                                 if not isinstance(a, str)):
        return None
    return _weight(gm, node.args[0])


def _bias_add(node: torch.fx.Node, path: str) -> torch.fx.Node | None:
    """The ``add`` of ``<path>.bias`` that is the matmul's only user, if there is one."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    bias = user.args[1] if user.op == "call_function" and user.target in _ADDS and \
        len(user.args) == 2 and user.args[0] is node else None
    return user if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" and \
        bias.target == f"{path}.bias" else None


def _from_matmul(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    """A hand-written linear: ``x @ W.T (+ b)`` (weight ``[out, in]``) or ``x @ W`` (``[in,
    out]``), with ``W`` the ``weight`` of the module computing it."""
    if node.op != "call_function" or node.target not in _MATMULS or len(node.args) != 2:
        return None
    transposed = _transposed_weight(gm, node.args[1])
    found = transposed or _weight(gm, node.args[1])
    owner = owning_module(node)
    if found is None or owner is None or found[0] != f"{owner[0]}.weight":
        return None
    target, weight = found
    out_features, in_features = weight.shape if transposed else weight.shape[::-1]
    add = _bias_add(node, owner[0])
    return LinearSite(add or node, "matmul", owner[0], owner[1], in_features, out_features,
                      target, fan_in_fan_out=transposed is None, core=node if add else None)


def _from_call_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, torch.nn.Linear):
        return None
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    return LinearSite(node, "module", node.target, kind, module.in_features,
                      module.out_features, f"{node.target}.weight")


def _from_quantized(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearSite | None:
    """A bitsandbytes 4-bit or 8-bit layer, captured as one ``fxpeft::linear_*`` op."""
    if node.op != "call_function" or node.target not in QUANTIZED_OPS.values():
        return None
    owner, weight = owning_module(node), node.args[1]
    if owner is None or not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
        return None
    if node.target is QUANTIZED_OPS["linear_4bit"]:
        (out_features, in_features), dtype = node.args[6], node.args[10]
    else:
        out_features, in_features = fetch(gm, weight.target).shape
        dtype = node.args[0].meta["val"].dtype if "val" in node.args[0].meta else torch.float32
    users = list(node.users)
    output = users[0] if len(users) == 1 and is_cast(users[0]) else node  # back from compute
    return LinearSite(output, "quantized", owner[0], owner[1], in_features, out_features,
                      weight.target, core=node, dtype=dtype)


LINEAR_RECOGNISERS: tuple[Callable[[torch.fx.GraphModule, torch.fx.Node], LinearSite | None], ...] = (
    _from_functional, _from_addmm, _from_matmul, _from_call_module, _from_quantized)


def find_linear_sites(gm: torch.fx.GraphModule) -> list[LinearSite]:
    """Every node in ``gm`` that computes a linear layer of the model (not of an adapter), in
    graph order.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    >>> [(s.module_path, s.in_features, s.out_features) for s in find_linear_sites(gm)]
    [('0', 2, 3)]
    """
    sites = []
    for node in gm.graph.nodes:
        if is_fxpeft_node(node):
            continue
        for recognise in LINEAR_RECOGNISERS:
            if (site := recognise(gm, node)) is not None:
                sites.append(site)
                break
    return sites
