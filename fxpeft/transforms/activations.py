"""``gated_activation``: ``act(gate) * up`` (SwiGLU, GeGLU) becomes one autograd function that
saves ``gate`` and ``up`` and recomputes ``act(gate)`` in backward; autograd would also keep
``act(gate)``, a third ``[tokens, intermediate]`` tensor per layer. Outputs are exact and
gradients bit-identical (the same aten formulas). With ``sdpa_gqa`` (``fxpeft.transforms.gqa``)
and ``recompute_norms`` (``fxpeft.transforms.checkpoint``) it is one of the fuse passes that
shrink what backward keeps without recomputing any matmul of the base model.
"""

from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten


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
    if torch.compiler.is_compiling():
        # inductor's partitioner recomputes pointwise ops by itself, and an autograd.Function
        # would keep AOTAutograd from caching the compiled graph (a full compile per process)
        return _activation(gate, approximate) * up
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
    """``(act node, fused function, its args, its kwargs)`` if ``mul`` is ``act(gate) * up``."""
    for act, up in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not isinstance(act, torch.fx.Node) or len(act.users) != 1 or not isinstance(up, torch.fx.Node):
            continue
        if act.target == aten.silu.default:
            return act, silu_and_mul, (act.args[0], up), {}
        if act.target == aten.gelu.default:
            return act, gelu_and_mul, (act.args[0], up), {"approximate": act.kwargs.get("approximate", "none")}
    return None


def gated_activation(gm: torch.fx.GraphModule) -> int:
    """``act(gate) * up`` becomes ``silu_and_mul``/``gelu_and_mul``; returns how many."""
    changed = 0
    for mul in list(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        found = _gated(mul) if len(mul.args) == 2 and not mul.kwargs else None
        if found is None:
            continue
        act, function, args, kwargs = found
        with gm.graph.inserting_before(mul):
            fused = gm.graph.call_function(function, args, kwargs)
        fused.meta = dict(mul.meta)
        mul.replace_all_uses_with(fused)
        gm.graph.erase_node(mul)
        gm.graph.erase_node(act)
        changed += 1
    return changed
