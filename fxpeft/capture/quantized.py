"""Quantized linear bases (bitsandbytes ``Linear4bit`` and ``Linear8bitLt``) as graph ops.

``torch.export`` cannot fake bitsandbytes' parameter subclasses, and its strict mode puts the
4-bit matmul under ``no_grad``. So, for the time of capture, each quantized layer is swapped for
a stand-in that holds the *same* packed storage as plain tensors and calls one custom op:
``fxpeft::linear_4bit`` or ``fxpeft::linear_8bit``. Each is one graph node per layer, under the
layer's module path, a linear site like any other. Their backward is registered with
``torch.library``: the gradient flows to the input only, and the weight is dequantized again in
backward (as bitsandbytes does), so no dequantized copy outlives one op.

The forward calls bitsandbytes' own kernels, so outputs equal the layer's: 4-bit uses
``bitsandbytes::gemm_4bit``. 8-bit follows bitsandbytes' route per device and mode
(``bnb.matmul``): training on a CPU (or XPU) computes ``x @ (CB * SCB / 127).T`` (its
``MatMul8bitFp``); everywhere else (eval on a CPU, both modes on CUDA) LLM.int8()
(``MatMul8bitLt``): the input is quantized to int8 per row too, columns past the layer's
``threshold`` are computed apart in 16 bits, and ``int8_scaled_mm`` / ``int8_mixed_scaled_mm``
multiply. The mode is data: the emit step feeds the op's ``training`` from a module that reads
the graph's flag (``fxpeft.graph.dropout.TrainingFlag``), so ``gm.train()`` / ``gm.eval()``
switch the route without regenerating code.

>>> [k for k in QUANTIZED_OPS]
['linear_4bit', 'linear_8bit']
"""

from __future__ import annotations

import contextlib
import functools
import sys
from types import ModuleType
from typing import Iterator, Optional

import torch
import torch.fx

from fxpeft.graph.targets import fetch

Tensor = torch.Tensor


def _bitsandbytes() -> ModuleType | None:
    """bitsandbytes if the process imported it: a model cannot hold its layers otherwise, and
    importing it costs time (and prints kernel notices) that plain models should not pay."""
    return sys.modules.get("bitsandbytes")


def _absmax(absmax: Tensor, nested_absmax: Optional[Tensor], nested_code: Optional[Tensor],
            offset: Optional[Tensor], nested_blocksize: int) -> Tensor:
    """The fp32 block scales: double quantization stores them 8-bit, blockwise, plus an offset."""
    if nested_absmax is None:
        return absmax
    scales = torch.ops.bitsandbytes.dequantize_blockwise.default(
        absmax, nested_absmax, nested_code, nested_blocksize, torch.float32)
    return scales + offset


@torch.library.custom_op("fxpeft::dequantize_4bit", mutates_args=())
def dequantize_4bit(weight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                    nested_code: Optional[Tensor], offset: Optional[Tensor], shape: list[int],
                    blocksize: int, nested_blocksize: int, quant_type: str,
                    dtype: torch.dtype) -> Tensor:
    """The ``(out, in)`` weight of a 4-bit layer, in ``dtype``."""
    scales = _absmax(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight, scales, blocksize, quant_type,
                                                          shape, dtype)


@dequantize_4bit.register_fake
def _(weight, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
      quant_type, dtype):
    return weight.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fxpeft::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, weight: Tensor, absmax: Tensor, nested_absmax: Optional[Tensor],
                nested_code: Optional[Tensor], offset: Optional[Tensor], shape: list[int],
                blocksize: int, nested_blocksize: int, quant_type: str, dtype: torch.dtype,
                bias: Optional[Tensor]) -> Tensor:
    """``x @ W.T + bias`` with bitsandbytes' 4-bit kernel (``x`` already in the compute dtype)."""
    packed = weight.view(-1, 1)
    if nested_absmax is None:
        return torch.ops.bitsandbytes.gemm_4bit.default(x, packed, shape, absmax, blocksize,
                                                        quant_type, bias=bias)
    return torch.ops.bitsandbytes.gemm_4bit.default(
        x, packed, shape, nested_absmax, blocksize, quant_type, bias=bias, absmax_8bit=absmax,
        absmax_code=nested_code, absmax_offset=offset)


@linear_4bit.register_fake
def _(x, weight, absmax, nested_absmax, nested_code, offset, shape, blocksize, nested_blocksize,
      quant_type, dtype, bias):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_4bit(ctx, inputs, output) -> None:
    x, weight, absmax, nested_absmax, nested_code, offset, *static, bias = inputs
    ctx.save_for_backward(weight, absmax, nested_absmax, nested_code, offset)
    ctx.static, ctx.has_bias = static, bias is not None


def _backward_4bit(ctx, grad: Tensor):
    weight, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    shape, blocksize, nested_blocksize, quant_type, _ = ctx.static
    dense = dequantize_4bit(weight, absmax, nested_absmax, nested_code, offset, shape, blocksize,
                            nested_blocksize, quant_type, grad.dtype)
    grad_bias = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[-1] else None
    return (grad @ dense, *([None] * 10), grad_bias)


@torch.library.custom_op("fxpeft::dequantize_8bit", mutates_args=())
def dequantize_8bit(weight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The ``(out, in)`` weight of an 8-bit layer: int8 rows times their scale / 127."""
    return weight.to(dtype) * (scales.unsqueeze(1) * (1.0 / 127.0)).to(dtype)


@dequantize_8bit.register_fake
def _(weight, scales, dtype):
    return weight.new_empty(weight.shape, dtype=dtype)


def dequantizes_8bit(device: torch.device, training: bool) -> bool:
    """Whether bitsandbytes computes an 8-bit layer by dequantizing its weight (``MatMul8bitFp``:
    training on a CPU or XPU) rather than with LLM.int8() (``MatMul8bitLt``: the rest).

    >>> dequantizes_8bit(torch.device("cpu"), True), dequantizes_8bit(torch.device("cpu"), False)
    (True, False)
    """
    return training and device.type in ("cpu", "xpu")


def _int8_matmul(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor],
                 threshold: float) -> Tensor:
    """LLM.int8(), as bitsandbytes' ``MatMul8bitLt`` computes it: the input quantized per row
    from fp16, outlier columns (past ``threshold``) apart, int8 matmul, rescaled."""
    rows = x.reshape(-1, x.shape[-1])
    quantized, row_scales, outliers = torch.ops.bitsandbytes.int8_vectorwise_quant.default(
        rows.to(torch.float16), threshold)
    if threshold > 0.0:
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default(
            rows, quantized, weight, row_scales, scales, outliers, bias)
    else:
        out = torch.ops.bitsandbytes.int8_scaled_mm.default(quantized, weight, row_scales, scales,
                                                             bias=bias, dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("fxpeft::linear_8bit", mutates_args=())
def linear_8bit(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor],
                training: bool = True, threshold: float = 0.0) -> Tensor:
    """``x @ W.T + bias`` on bitsandbytes' route for ``x``'s device and the mode
    (``dequantizes_8bit``): ``W`` dequantized from int8 for this call only, or LLM.int8()."""
    if dequantizes_8bit(x.device, training):
        return torch.nn.functional.linear(x, dequantize_8bit(weight, scales, x.dtype), bias)
    return _int8_matmul(x, weight, scales, bias, threshold)


@linear_8bit.register_fake
def _(x, weight, scales, bias, training=True, threshold=0.0):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_8bit(ctx, inputs, output) -> None:
    x, weight, scales, bias, *_ = inputs
    ctx.save_for_backward(weight, scales)
    ctx.has_bias = bias is not None


def _backward_8bit(ctx, grad: Tensor):
    weight, scales = ctx.saved_tensors
    grad_bias = _bias_grad(grad) if ctx.has_bias and ctx.needs_input_grad[3] else None
    # both bitsandbytes routes take the input's gradient through the dequantized weight
    return grad @ dequantize_8bit(weight, scales, grad.dtype), None, None, grad_bias, None, None


def _bias_grad(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(0)


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)
linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)

QUANTIZED_OPS = {"linear_4bit": torch.ops.fxpeft.linear_4bit.default,
                 "linear_8bit": torch.ops.fxpeft.linear_8bit.default}


# --- stand-ins for the time of capture ----------------------------------------------------------

class _StandIn(torch.nn.Module):
    """Holds a quantized layer's storage as plain tensors (shared, not copied) and calls its op.
    Subclassed per bitsandbytes class, under that class's name, so rules and ``explain`` see the
    layer's real type."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.bias = layer.bias
        self.compute_dtype: torch.dtype | None = getattr(layer, "compute_dtype", None)


class _StandIn4bit(_StandIn):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__(layer)
        state = _canonical_4bit_state(layer)
        self.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        self.register_buffer("weight_absmax", state.absmax)
        nested = state.state2 if state.nested else None
        self.register_buffer("weight_nested_absmax", nested.absmax if nested else None)
        self.register_buffer("weight_nested_code", nested.code if nested else None)
        self.register_buffer("weight_offset", state.offset if nested else None)
        self.static = (list(state.shape), state.blocksize, nested.blocksize if nested else 0,
                       state.quant_type, state.dtype)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(self.compute_dtype) if self.compute_dtype is not None else x
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.ops.fxpeft.linear_4bit(x, self.weight, self.weight_absmax,
                                            self.weight_nested_absmax, self.weight_nested_code,
                                            self.weight_offset, *self.static, bias).to(dtype)


class _StandIn8bit(_StandIn):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__(layer)
        scales = layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB
        if layer.state.has_fp16_weights or scales is None or layer.weight.dtype != torch.int8:
            raise QuantizedLayerError("a Linear8bitLt that holds fp16 weights "
                                      "(has_fp16_weights=True) is not quantized; load it with "
                                      "BitsAndBytesConfig(load_in_8bit=True)")
        self.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
        self.register_buffer("weight_scales", scales)
        self.threshold = float(layer.state.threshold)

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.ops.fxpeft.linear_8bit(x, self.weight, self.weight_scales, bias,
                                            training=self.training, threshold=self.threshold)


def route_8bit_by_mode(graph: torch.fx.Graph, flag: str) -> int:
    """Each 8-bit op of ``graph`` takes ``training`` from the module ``flag`` (a node per op,
    which reads the graph's train/eval flag at call time) and its ``threshold`` as a keyword, so
    its positional args stay ``(x, weight, scales, bias)``. Returns how many ops changed."""
    nodes = list(graph.find_nodes(op="call_function", target=QUANTIZED_OPS["linear_8bit"]))
    for node in nodes:
        threshold = node.args[5] if len(node.args) > 5 else node.kwargs.get("threshold", 0.0)
        with graph.inserting_before(node):
            mode = graph.call_module(flag, ())
        node.args, node.kwargs = node.args[:4], {"training": mode, "threshold": threshold}
    return len(nodes)


class QuantizedLayerError(ValueError):
    """A quantized layer fxpeft cannot capture."""


def _canonical_4bit_state(layer: torch.nn.Module):
    """The layer's quant state in bitsandbytes' canonical layout. A 4-bit layer run in eval mode
    under no_grad on a CPU with AVX512-BF16 repacks itself for inference; bitsandbytes' own
    inverse undoes that (its absmax stays rounded to bf16, as the layer's outputs already are)."""
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        layer.weight.data, layer.weight.quant_state = \
            _bitsandbytes().functional._convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
        state = layer.weight.quant_state
        if state.absmax.dim() == 2:  # the inverse leaves plain scales transposed, in bf16
            state.absmax = state.absmax.T.reshape(-1).float()
    return state


@functools.cache
def _stand_in_class(layer_class: type) -> type:
    base = _StandIn4bit if issubclass(layer_class, _bitsandbytes().nn.Linear4bit) else _StandIn8bit
    return type(layer_class.__name__, (base,), {"__module__": layer_class.__module__,
                                                "__qualname__": layer_class.__qualname__})


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """``(path, layer)`` of every bitsandbytes 4-bit or 8-bit linear in ``model``.

    >>> quantized_layers(torch.nn.Linear(2, 2))
    []
    """
    bnb = _bitsandbytes()
    if bnb is None:
        return []
    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [(path, m) for path, m in model.named_modules() if isinstance(m, kinds)]


@contextlib.contextmanager
def stand_ins(model: torch.nn.Module) -> Iterator[int]:
    """For the ``with`` block, every quantized linear of ``model`` is replaced by its stand-in
    (sharing its storage); the model is restored afterwards. Yields how many were replaced.

    >>> with stand_ins(torch.nn.Linear(2, 2)) as count:
    ...     count
    0
    """
    swapped = []
    try:
        for path, layer in quantized_layers(model):
            parent, _, name = path.rpartition(".")
            owner = model.get_submodule(parent)
            try:
                stand_in = _stand_in_class(type(layer))(layer)
            except QuantizedLayerError as err:
                raise QuantizedLayerError(f"{path}: {err}") from None
            owner._modules[name] = stand_in.train(layer.training)
            swapped.append((owner, name, layer))
        yield len(swapped)
    finally:
        for owner, name, layer in reversed(swapped):
            owner._modules[name] = layer


# --- the base weight of a site, quantized or not --------------------------------------------------

def quantized_op(graph: torch.fx.Graph, weight_target: str) -> torch.fx.Node | None:
    """The ``fxpeft::linear_*`` node whose packed weight is ``weight_target``, if any."""
    for op in QUANTIZED_OPS.values():
        for node in graph.find_nodes(op="call_function", target=op):
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.target == weight_target:
                return node
    return None


def _input_dtype(node: torch.fx.Node) -> torch.dtype:
    value = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    return value.dtype if isinstance(value, Tensor) else torch.float32


def dequantize_call(node: torch.fx.Node) -> tuple[object, tuple]:
    """``(op, args)`` that dequantize the weight of the quantized linear ``node``; the args are
    graph nodes (``get_attr``) and constants."""
    if node.target is QUANTIZED_OPS["linear_4bit"]:
        return torch.ops.fxpeft.dequantize_4bit.default, tuple(node.args[1:11])
    return torch.ops.fxpeft.dequantize_8bit.default, (*node.args[1:3], _input_dtype(node))


def base_weight(gm: torch.fx.GraphModule, weight_target: str) -> Tensor:
    """The base weight at ``weight_target`` as a dense tensor: itself, or, for a quantized
    layer, a dequantized copy made now.

    >>> net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    >>> base_weight(net, "0.weight").shape
    torch.Size([3, 2])
    """
    weight = gm.get_parameter(weight_target)
    node = quantized_op(gm.graph, weight_target)
    if node is None:
        return weight.detach()
    op, args = dequantize_call(node)
    values = [fetch(gm, a.target) if isinstance(a, torch.fx.Node) else a for a in args]
    with torch.no_grad():
        return op(*values)


def weight_so_far(gm: torch.fx.GraphModule, weights: dict[str, Tensor], target: str) -> Tensor:
    """A merger's view of the base weight at ``target``: what earlier mergers wrote into
    ``weights``, else the dense base weight (dequantized only when needed).

    >>> net = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    >>> weight_so_far(net, {"0.weight": torch.zeros(3, 2)}, "0.weight").sum().item()
    0.0
    """
    return weights[target] if target in weights else base_weight(gm, target)


def weight_node(gm: torch.fx.GraphModule, weight_target: str) -> torch.fx.Node:
    """A node (inserted at the graph's insertion point) holding the dense base weight:
    ``get_attr``, or a dequantize op for a quantized layer (recomputed per call, as
    bitsandbytes does)."""
    node = quantized_op(gm.graph, weight_target)
    if node is None:
        return gm.graph.get_attr(weight_target)
    op, args = dequantize_call(node)
    return gm.graph.call_function(op, args)


# --- merging into a quantized base ----------------------------------------------------------------

def _quantize_like(node: torch.fx.Node, dense: Tensor) -> list[Tensor | None]:
    """New storage for the layer of ``node`` holding ``dense``, in the order of its tensor args."""
    bnb = _bitsandbytes()
    if node.target is QUANTIZED_OPS["linear_8bit"]:
        rows, scales, _ = bnb.functional.int8_vectorwise_quant(dense.to(torch.float16))
        return [rows, scales]
    shape, blocksize, _, quant_type, dtype = node.args[6:11]
    nested = node.args[3] is not None
    packed, state = bnb.functional.quantize_4bit(dense.to(dtype), blocksize=blocksize,
                                                 compress_statistics=nested, quant_type=quant_type)
    if not nested:
        return [packed, state.absmax, None, None, None]
    return [packed, state.absmax, state.state2.absmax, state.state2.code, state.offset]


def requantize(gm: torch.fx.GraphModule, weights: dict[str, Tensor]) -> dict[str, float]:
    """Replace, in ``weights`` (target -> merged dense weight), each quantized layer's weight
    by its new quantized storage (one entry per storage tensor). Returns, per layer, the
    max-abs difference between the merged weight and what the new storage dequantizes to: the
    error that requantizing adds."""
    errors = {}
    for target in [t for t in weights if quantized_op(gm.graph, t) is not None]:
        node, dense = quantized_op(gm.graph, target), weights.pop(target)
        tensor_args = node.args[1:6] if node.target is QUANTIZED_OPS["linear_4bit"] else node.args[1:3]
        storage = _quantize_like(node, dense)
        weights.update({arg.target: value for arg, value in zip(tensor_args, storage)
                        if isinstance(arg, torch.fx.Node)})
        op, args = dequantize_call(node)
        values = [weights[a.target] if isinstance(a, torch.fx.Node) else a for a in args]
        with torch.no_grad():
            errors[target] = float((op(*values).float() - dense.float()).abs().max())
    return errors


def dequantize_layers(gm: torch.fx.GraphModule, graph: torch.fx.Graph,
                      weights: dict[str, Tensor]) -> int:
    """In ``graph`` (a copy of ``gm``'s), every quantized layer becomes a plain ``linear`` over
    a dense weight: the merged one in ``weights``, else the base dequantized now (added to
    ``weights``). Returns how many layers changed."""
    nodes = [n for op in QUANTIZED_OPS.values() for n in graph.find_nodes(op="call_function", target=op)]
    for node in nodes:
        x, weight, bias = node.args[0], node.args[1], node.args[-1]
        if weight.target not in weights:
            weights[weight.target] = base_weight(gm, weight.target)
        weights[weight.target] = weights[weight.target].to(_input_dtype(node))
        with graph.inserting_before(node):
            dense = graph.call_function(torch.ops.aten.linear.default, (x, weight, bias))
        dense.meta = dict(node.meta)
        node.replace_all_uses_with(dense)
        graph.erase_node(node)
        mode = node.kwargs.get("training")
        if isinstance(mode, torch.fx.Node) and not mode.users:  # the 8-bit route's mode flag
            graph.erase_node(mode)
        for storage in node.args[2:]:  # scales and codes no node reads any more
            if isinstance(storage, torch.fx.Node) and storage.op == "get_attr" and not storage.users:
                graph.erase_node(storage)
    return len(nodes)


def packed_4bit_weights(gm: torch.nn.Module) -> set[str]:
    """Targets of the 4-bit weights in ``gm``'s graph: each stored byte holds two weights.

    >>> packed_4bit_weights(torch.nn.Linear(2, 2))
    set()
    """
    if not isinstance(gm, torch.fx.GraphModule):
        return set()
    return {node.args[1].target for node in gm.graph.find_nodes(
        op="call_function", target=QUANTIZED_OPS["linear_4bit"])}
