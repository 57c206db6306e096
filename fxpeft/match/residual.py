"""The ``residual`` match kind: a projection whose output joins the residual stream.

A transformer sub-block ends in an output projection (BERT's ``attention.output.dense`` and
``output.dense``, Llama's ``o_proj`` and ``down_proj``, GPT-2's ``c_proj``), maybe a dropout or a
view, then ``add(projection, residual)``; a post-norm model (BERT) normalises that sum right
away, a pre-norm model (Llama, GPT-2) does not. Adapters that sit around that add and norm
(bottleneck adapters) need all of it, which a ``linear`` site does not say.

Matching stays a query: ``find_residual_sites`` only reads the graph. The site is named by the
projection's module path, so rules select it as they select the linear.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from fxpeft.capture.linear_sites import WeightedSite
from fxpeft.capture.program import Program, layer_index
from fxpeft.graph.targets import owning_module
from fxpeft.names import DROPOUT_MODULE, adapter_node, is_fxpeft_node

aten = torch.ops.aten
# Ops between a projection and its residual add that keep the values (dropout in eval) and shape.
_PASS_THROUGH = frozenset({aten.dropout.default, aten.view.default, aten.reshape.default,
                           aten._unsafe_view.default, aten.clone.default, aten.contiguous.default})
_ADDS = frozenset({aten.add.Tensor, operator.add, torch.add})
# Post-norms recognised after the add: the sum's only reader.
_NORMS = frozenset({aten.layer_norm.default})


@dataclass(frozen=True)
class ResidualSite(WeightedSite):
    """``add(h, r)`` where ``h`` comes from the projection at ``module_path`` (through dropout or
    views) and ``r`` is the residual stream; ``norm``, the post-norm reading only the sum, or None.

    ``node`` is the add. ``branch_index`` is which of its arguments is ``h``: read ``h`` and
    ``r`` from the add as the graph has it now (``branch`` / ``residual``), since an earlier splice
    (LoRA on the projection) may have put nodes in between since matching.
    """

    node: torch.fx.Node
    module_path: str
    module_type: str
    projection: torch.fx.Node
    weight_target: str
    branch_index: int
    hidden_size: int
    norm: torch.fx.Node | None
    fan_in_fan_out = False

    @property
    def layer(self) -> int | None:
        return layer_index(self.module_path)

    @property
    def branch(self) -> torch.fx.Node:
        """``h``: the sub-block's output, before the residual add."""
        return self.node.args[self.branch_index]

    @property
    def residual(self) -> torch.fx.Node:
        """``r``: the residual stream the sub-block's output is added to."""
        return self.node.args[1 - self.branch_index]

    @property
    def output(self) -> torch.fx.Node:
        """What the rest of the model reads: the post-norm, else the sum."""
        return self.norm if self.norm is not None else self.node

    def describe(self) -> str:
        return f"residual add of {self.hidden_size} features" + (" + post-norm" if self.norm else "")


def _pass_through(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return node.target == DROPOUT_MODULE or isinstance(gm.get_submodule(node.target),
                                                           torch.nn.Dropout)
    return node.op == "call_function" and node.target in _PASS_THROUGH


def _flow_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The base nodes reading ``node``, and the adapter joins that stand in for it (an adapter
    already spliced there): the flow as the base model has it. Adapter branches reading it are
    not the flow."""
    found = []
    for user in node.users:
        record = adapter_node(user)
        if not is_fxpeft_node(user) or (record is not None and record.removable
                                         and user.args[record.bypass] is node):
            found.append(user)
    return found


def _residual_add(gm: torch.fx.GraphModule,
                  start: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The add that ``start`` (through single-reader pass-through ops and adapter joins) flows
    into, and the node it arrives from; None when it flows elsewhere first."""
    node = start
    while len(users := _flow_users(node)) == 1:
        user = users[0]
        if is_fxpeft_node(user):  # an adapter's join on the projection (LoRA): follow it
            node = user
            continue
        if user.op == "call_function" and user.target in _ADDS:
            return user, node
        if not _pass_through(gm, user) or user.args[0] is not node:
            return None
        node = user
    return None


def _same_shape(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Not known to differ (a symbolic_trace graph has no shapes: the add says they fit)."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    known = isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)
    return not known or va.shape == vb.shape


def _is_norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), torch.nn.LayerNorm)
    return node.op == "call_function" and node.target in _NORMS


def _norm_path(node: torch.fx.Node) -> str | None:
    if node.op == "call_module":
        return node.target
    owner = owning_module(node)
    return owner[0] if owner else None


def _post_norm(gm: torch.fx.GraphModule, add: torch.fx.Node, projection: str) -> torch.fx.Node | None:
    """The norm that reads only the sum and belongs to the projection's own block (BERT's
    ``attention.output.LayerNorm``); a model's final norm (GPT-2's ``ln_f`` after its last
    layer) is not the block's."""
    users = _flow_users(add)
    user = users[0] if len(users) == 1 else None
    if user is None or not _is_norm(gm, user) or user.args[0] is not add:
        return None
    block, path = projection.rpartition(".")[0], _norm_path(user)
    return user if path is not None and (not block or path.startswith(block + ".")) else None


def _site(gm: torch.fx.GraphModule, linear: object) -> ResidualSite | None:
    found = _residual_add(gm, linear.node)
    if found is None:
        return None
    add, arrives = found
    if len(add.args) != 2 or add.kwargs:
        return None
    index = 0 if add.args[0] is arrives else 1
    other = add.args[1 - index]
    if not isinstance(other, torch.fx.Node) or not _same_shape(other, add):
        return None
    return ResidualSite(add, linear.module_path, linear.module_type, linear.node,
                        linear.weight_target, index, linear.out_features, _post_norm(gm, add, linear.module_path))


def find_residual_sites(program: Program) -> list[ResidualSite]:
    """Every projection of ``program`` whose output joins a residual add, in graph order.

    >>> import fxpeft
    >>> from fxpeft.capture.export import capture
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.dense = torch.nn.Linear(4, 4); self.norm = torch.nn.LayerNorm(4)
    ...     def forward(self, x):
    ...         return self.norm(self.dense(x) + x)
    >>> [(s.module_path, s.branch_index, s.norm is not None) for s in find_residual_sites(capture(Block()))]
    [('dense', 0, True)]
    """
    gm = program.graph_module
    return [site for linear in program.sites if not is_fxpeft_node(linear.node)
            and (site := _site(gm, linear)) is not None]
