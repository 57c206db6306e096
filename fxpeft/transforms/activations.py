"""Fuse passes that shrink what backward keeps, without recomputing anything costly. Each keeps
outputs exact and gradients equal up to summation order.

- ``sdpa_gqa``: grouped-query attention without ``repeat_kv``. Export records HF's
  ``repeat_kv`` (unsqueeze, expand, reshape) in front of SDPA, so SDPA saves keys and values
  with every query head's copy; ``enable_gqa=True`` on the un-repeated tensors keeps one copy per
  key/value head. (Eager HF uses ``enable_gqa`` too, when no mask is given.)
- ``gated_activation``: ``act(gate) * up`` (SwiGLU, GeGLU) becomes one autograd function that
  saves ``gate`` and ``up`` and recomputes ``act(gate)`` in backward; autograd would also keep
  ``act(gate)``, a third ``[tokens, intermediate]`` tensor per layer.
"""

from __future__ import annotations

import sys

import torch
import torch.fx

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_NO_OP_VIEWS = (aten.slice.Tensor, aten.alias.default)


def _is_full_slice(node: torch.fx.Node) -> bool:
    """``x[:, ...]``: a slice from 0 to the end (export records them around ``None`` indexing)."""
    if node.target == aten.alias.default:
        return True
    start = node.args[2] if len(node.args) > 2 else 0
    end = node.args[3] if len(node.args) > 3 else sys.maxsize
    step = node.args[4] if len(node.args) > 4 else 1
    return start == 0 and end == sys.maxsize and step == 1


def _through_full_slices(value: object) -> object:
    while isinstance(value, torch.fx.Node) and value.target in _NO_OP_VIEWS and _is_full_slice(value):
        value = value.args[0]
    return value


def unrepeated_kv(value: object) -> tuple[torch.fx.Node, int] | None:
    """``(kv, n_rep)`` if ``value`` is HF's ``repeat_kv(kv, n_rep)`` as export records it:
    ``kv[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)``."""
    if not isinstance(value, torch.fx.Node) or value.target not in (aten.reshape.default, aten.view.default):
        return None
    expand = value.args[0]
    if not isinstance(expand, torch.fx.Node) or expand.target != aten.expand.default:
        return None
    unsqueezed = _through_full_slices(expand.args[0])
    if not isinstance(unsqueezed, torch.fx.Node) or unsqueezed.target != aten.unsqueeze.default or \
            unsqueezed.args[1] != 2:
        return None
    kv = _through_full_slices(unsqueezed.args[0])
    sizes = expand.args[1]
    if not isinstance(kv, torch.fx.Node) or len(sizes) != 5 or not isinstance(sizes[2], int):
        return None
    return kv, sizes[2]


def sdpa_gqa(gm: torch.fx.GraphModule) -> int:
    """SDPA reads un-repeated keys and values with ``enable_gqa=True``; returns how many."""
    changed = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=SDPA)):
        if node.kwargs.get("enable_gqa") or len(node.args) < 3:
            continue
        key, value = unrepeated_kv(node.args[1]), unrepeated_kv(node.args[2])
        if key is None or value is None or key[1] != value[1]:
            continue
        node.args = (node.args[0], key[0], value[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changed += 1
    gm.graph.eliminate_dead_code()
    return changed


class _GatedActivation(torch.autograd.Function):
    """``act(gate) * up`` that saves its two inputs only. Backward applies the same aten
    formulas autograd would (``mul`` then ``silu_backward``/``gelu_backward``), so gradients are
    bit-identical to the unfused ops."""

    @staticmethod
    def forward(ctx: object, gate: torch.Tensor, up: torch.Tensor, approximate: str | None) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        ctx.approximate = approximate
        return _activation(gate, approximate) * up

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_act = grad * up
            grad_gate = aten.silu_backward(grad_act, gate) if ctx.approximate is None else \
                aten.gelu_backward(grad_act, gate, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * _activation(gate, ctx.approximate)
        return grad_gate, grad_up, None


def _activation(gate: torch.Tensor, approximate: str | None) -> torch.Tensor:
    return aten.silu(gate) if approximate is None else aten.gelu(gate, approximate=approximate)


def _gated_product(gate: torch.Tensor, up: torch.Tensor, approximate: str | None) -> torch.Tensor:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        return _activation(gate, approximate) * up  # broadcasting or promotion: plain autograd
    return _GatedActivation.apply(gate, up, approximate)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward.

    >>> g, u = torch.randn(2, 3), torch.randn(2, 3)
    >>> torch.equal(silu_and_mul(g, u), torch.nn.functional.silu(g) * u)
    True
    """
    return _gated_product(gate, up, None)


def gelu_and_mul(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``gelu(gate, approximate) * up``, keeping only ``gate`` and ``up`` for backward.

    >>> g, u = torch.randn(2, 3), torch.randn(2, 3)
    >>> torch.equal(gelu_and_mul(g, u, "tanh"), torch.nn.functional.gelu(g, approximate="tanh") * u)
    True
    """
    return _gated_product(gate, up, approximate)


def _gated(mul: torch.fx.Node) -> tuple[torch.fx.Node, object, tuple, dict] | None:
    """``(act node, up, fused args, fused kwargs)`` if ``mul`` is ``act(gate) * up``."""
    for act, up in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not isinstance(act, torch.fx.Node) or len(act.users) != 1 or not isinstance(up, torch.fx.Node):
            continue
        if act.target == aten.silu.default:
            return act, up, (silu_and_mul, (act.args[0], up)), {}
        if act.target == aten.gelu.default:
            return act, up, (gelu_and_mul, (act.args[0], up)), {"approximate": act.kwargs.get("approximate", "none")}
    return None


def gated_activation(gm: torch.fx.GraphModule) -> int:
    """``act(gate) * up`` becomes ``silu_and_mul``/``gelu_and_mul``; returns how many."""
    changed = 0
    for mul in list(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        found = _gated(mul) if len(mul.args) == 2 and not mul.kwargs else None
        if found is None:
            continue
        act, _, (function, args), kwargs = found
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(function, args, kwargs)
        fused.meta = dict(mul.meta)
        mul.replace_all_uses_with(fused)
        gm.graph.erase_node(mul)
        gm.graph.erase_node(act)
        changed += 1
    return changed
