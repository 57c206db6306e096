"""``fuse_rms_norm``: RMSNorm as one ``aten.rms_norm`` call instead of seven.

transformers' Llama-family RMSNorm, traced in fp32, is ``w * (x * rsqrt(mean(x ** 2, -1) + eps))``:
pow, mean, add, rsqrt and two muls, each a Python-dispatched op per layer and norm. In a
single-token decode step these tiny ops cost more in dispatch than in arithmetic, and
``aten.rms_norm`` computes the same expression in the same order in one call (bit-identical in
fp32; tested). Only the exact fp32 pattern is replaced: a bf16 norm casts between the steps,
and Gemma's ``(1 + w)`` has no plain weight, so neither matches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxpeft.capture.program import erase_unused

aten = torch.ops.aten


def _call(node: object, target: object) -> "torch.fx.Node | None":
    return node if isinstance(node, torch.fx.Node) and node.target is target else None


def _fp32(node: object) -> bool:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.float32


def _uncast(node: object) -> object:
    """``node`` without fp32-to-fp32 casts (the ``.to(input_dtype)`` of an fp32 norm)."""
    while _call(node, aten.to.dtype) and _fp32(node.args[0]) and node.args[1:] == (torch.float32,):
        node = node.args[0]
    return node


def _normed(node: object) -> "tuple[torch.fx.Node, float] | None":
    """``(x, eps)`` when ``node`` is ``x * rsqrt(mean(x ** 2, [-1], keepdim) + eps)``."""
    scaled = _call(_uncast(node), aten.mul.Tensor)
    rsqrt = _call(scaled.args[1], aten.rsqrt.default) if scaled else None
    shifted = _call(rsqrt.args[0], aten.add.Tensor) if rsqrt else None
    mean = _call(shifted.args[0], aten.mean.dim) if shifted else None
    square = _call(mean.args[0], aten.pow.Tensor_Scalar) if mean else None
    if square is None or not isinstance(shifted.args[1], float) or square.args[1] != 2 \
            or list(mean.args[1]) != [-1] or mean.args[2:] != (True,) or mean.kwargs:
        return None
    x = scaled.args[0]
    return (x, shifted.args[1]) if square.args[0] is x and _fp32(x) else None


def rms_norm_parts(node: torch.fx.Node) -> "tuple[torch.fx.Node, torch.fx.Node, float] | None":
    """``(x, weight, eps)`` when ``node`` is ``weight * normed(x)`` with a 1-D fp32 weight."""
    if node.target is not aten.mul.Tensor or len(node.args) != 2:
        return None
    weight, normed = node.args
    found = _normed(normed)
    value = weight.meta.get("val") if isinstance(weight, torch.fx.Node) else None
    if found is None or weight.op != "get_attr" or not _fp32(weight) or value.dim() != 1:
        return None
    return found[0], weight, found[1]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight * (x * rstd), rstd)``, the traced ops in their order (bit-identical)."""
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x * rstd), rstd


class _RMSNormThenDown(torch.autograd.Function):
    """``y = w * (x * rsqrt(mean(x ** 2) + eps))`` and ``y @ down.T`` (a LoRA ``A``), keeping only
    ``x`` and the per-row ``rsqrt`` for backward: ``y``, which the ``A`` gradient needs, is
    recomputed from them (two multiplies) instead of being kept. Forward is the traced ops in
    their order (bit-identical); backward is RMSNorm's gradient formula."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float,
                down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, rstd = _rms_norm(x, weight, eps)
        through_y = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        ctx.save_for_backward(x, rstd, weight, down if through_y else None)
        if not through_y:
            ctx.mark_non_differentiable(y)  # as the norm alone: the first layer's base needs no backward
        return y, torch.nn.functional.linear(y, down)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, grad_down_out: torch.Tensor) -> tuple:
        x, rstd, weight, down = ctx.saved_tensors
        normed = x * rstd
        grad_down = grad_weight = grad_x = None
        if ctx.needs_input_grad[3]:
            y = weight * normed
            grad_down = grad_down_out.reshape(-1, grad_down_out.shape[-1]).T @ y.reshape(-1, y.shape[-1])
        if down is not None:
            grad_y = grad_y + grad_down_out @ down
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y * normed).reshape(-1, normed.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            grad_normed = grad_y * weight
            grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        return grad_x, grad_weight, None, grad_down


def rms_norm_then_down(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 RMSNorm and the LoRA ``A`` projection that reads it, keeping only ``x`` and the
    per-row ``rsqrt`` for backward (``recompute_norms``).

    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> norm, down, x = LlamaRMSNorm(8), torch.randn(2, 8), torch.randn(3, 8)
    >>> y, a = rms_norm_then_down(x, norm.weight, norm.variance_epsilon, down)
    >>> torch.equal(y, norm(x)), torch.equal(a, norm(x) @ down.T)
    (True, True)
    """
    if torch.compiler.is_compiling():  # as in gated_activation: inductor decides what to keep
        y = _rms_norm(x, weight, eps)[0]
        return y, torch.nn.functional.linear(y, down)
    return _RMSNormThenDown.apply(x, weight, eps, down)


def fuse_rms_norm(gm: torch.fx.GraphModule) -> int:
    """Each fp32 RMSNorm pattern becomes one ``aten.rms_norm``; returns how many.

    >>> import torch
    >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
    >>> norm = LlamaRMSNorm(8); x = torch.randn(2, 3, 8)
    >>> gm = torch.export.export(norm, (x,)).module()
    >>> fuse_rms_norm(gm), torch.equal(gm(x), norm(x))
    (1, True)
    """
    fused = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.mul.Tensor)):
        found = rms_norm_parts(node) if node in gm.graph.nodes else None
        if found is None:
            continue
        x, weight, eps = found
        with gm.graph.inserting_before(node):
            norm = gm.graph.call_function(aten.rms_norm.default, (x, [weight.meta["val"].shape[0]], weight, eps))
        norm.meta.update(node.meta)
        node.replace_all_uses_with(norm)
        erase_unused(gm.graph, node)
        fused += 1
    if fused:
        gm.recompile()
    return fused
