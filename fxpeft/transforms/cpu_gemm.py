"""Frozen base linears on oneDNN's CPU GEMM (``fxpeft.fuse``'s pass ``onednn_linear``).

On the CPU, ``aten.linear`` / ``mm`` call MKL's sgemm; oneDNN's GEMM (what inductor's CPU
fusions call, ``mkldnn._linear_pointwise``) ran the shapes of a LoRA training step about 15%
faster here, forward and backward, on the weights as they are (no packed copy; measured with 2
threads at hidden 576, 4 x 128 tokens). A frozen base linear needs only its input gradient,
``grad @ W``, which is the same GEMM on ``W.T``. Results equal MKL's up to fp32 summation order
(relative 1e-6). Other devices, dtypes, and autocast take ``F.linear`` as before.

bf16 stays on ``aten.linear``: on a CPU with AVX-512 BF16 aten already sends bf16 ``mm`` to
oneDNN, so routing it gains nothing (measured here at hidden 576, 512 tokens: oneDNN's call took
0.97-1.05x ``F.linear``'s, forward and input gradient, for q/v, MLP and head shapes), and the
custom op would only add a dispatch per linear.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx

from fxpeft.graph.targets import fetch
from fxpeft.errors import FxpeftError
from fxpeft.registry import is_adapter_parameter

aten = torch.ops.aten


@functools.cache
def _onednn() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def project(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T (+ bias)``: oneDNN's GEMM for fp32 CPU tensors outside autocast, else
    ``F.linear``. ``weight`` may be a transposed view (``W.t()`` gives ``x @ W``).

    >>> x, w, g = torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 5)
    >>> torch.allclose(project(x, w), x @ w.T, atol=1e-5), torch.allclose(project(g, w.t()), g @ w, atol=1e-5)
    (True, True)
    """
    if _onednn() and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and \
            x.dim() >= 2 and not torch.is_autocast_enabled("cpu"):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


@torch.library.custom_op("fxpeft::frozen_linear", mutates_args=())
def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` for a weight (and bias) that gets no gradient, on ``project``'s GEMM; one
    opaque op, so ``torch.compile`` keeps it.

    >>> x, w = torch.randn(2, 3, 4, requires_grad=True), torch.randn(5, 4)
    >>> y = frozen_linear(x, w, None)
    >>> y.sum().backward()
    >>> torch.allclose(y, x @ w.T, atol=1e-5), torch.allclose(x.grad, w.sum(0).expand(2, 3, 4), atol=1e-5)
    (True, True)
    """
    return project(x, weight, bias)


@frozen_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _keep_weight(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    _, weight, bias = inputs
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise FxpeftError("a base weight that was frozen when fxpeft.fuse ran now requires grad; "
                          "fuse again (its onednn_linear pass only routes frozen weights)")
    ctx.save_for_backward(weight)


def _input_gradient(ctx: Any, grad: torch.Tensor) -> tuple:
    (weight,) = ctx.saved_tensors
    return frozen_linear(grad, weight.t(), None), None, None


frozen_linear.register_autograd(_input_gradient, setup_context=_keep_weight)


def onednn_linear(gm: torch.fx.GraphModule) -> int:
    """Route each frozen base linear (an ``aten.linear`` whose weight is an fp32 CPU model
    parameter that needs no gradient; adapter weights stay as they are) through ``frozen_linear``."""
    if not _onednn():
        return 0
    changed = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.linear.default)):
        weight = node.args[1]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or \
                is_adapter_parameter(weight.target):
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and (not isinstance(bias, torch.fx.Node) or bias.op != "get_attr"):
            continue  # a computed bias: leave the linear as it is
        tensors = [fetch(gm, n.target) for n in (weight, bias) if n is not None]
        if any(not isinstance(t, torch.Tensor) or t.requires_grad or t.device.type != "cpu"
               or t.dtype != torch.float32 for t in tensors):  # bf16: aten runs oneDNN already
            continue
        node.target, node.args, node.kwargs = torch.ops.fxpeft.frozen_linear.default, \
            (node.args[0], weight, bias), {}
        changed += 1
    return changed


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX-BF16, as Linux's
    ``/proc/cpuinfo`` flags name them); elsewhere oneDNN emulates bf16 GEMMs, slowly.

    >>> isinstance(native_bf16(), bool)
    True
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
