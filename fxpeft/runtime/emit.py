"""The emit step: turn a captured ``Program`` into the ``AdaptedModule`` users call.

It gives HF graphs their call signature (``forward(input_ids, attention_mask=None, ...,
labels=None, **kwargs)``) between an input adapter and an output adapter (``fxpeft.capture.hf``), and
makes train/eval data: every dropout goes through the shared modules of ``fxpeft.runtime.adapted_module``.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from fxpeft.runtime import hf_io, masks
from fxpeft.graph.dropout import (ATTENTION_DROPOUT_MODULE, TRAINING_FLAG_MODULE, AttentionDropout,
                                  Dropout, TrainingFlag)
from fxpeft.capture.quantized import QUANTIZED_OPS, route_8bit_by_mode
from fxpeft.runtime.adapted_module import AdaptedModule
from fxpeft.names import DROPOUT_MODULE, INPUTS_MODULE, OUTPUT_MODULE
from fxpeft.capture.program import CaptureInfo, Program

log = logging.getLogger("fxpeft")
aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_P_INDEX = 4  # (query, key, value, attn_mask, dropout_p, is_causal)


def emit(program: Program, generate_code: bool = True) -> AdaptedModule:
    """The ``AdaptedModule`` around ``program``'s graph (the same graph and node objects, so
    ``program.sites`` stay valid). ``program`` itself is left as it was: a caller that goes on
    matching wants ``dataclasses.replace(program, graph_module=gm)``. ``generate_code=False``
    leaves ``forward`` to a later ``gm.recompile()`` or ``gm.ensure_code()``.

    >>> from fxpeft.capture.export import capture
    >>> gm = emit(capture(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))))
    >>> type(gm).__name__, gm.capture_info.frontend
    ('AdaptedSequential', 'symbolic_trace')
    """
    root, graph, info = program.graph_module, program.graph, program.info
    if info.frontend == "export" and info.inputs:
        _wire_hf_signature(root, graph, info)
        if info.packs:
            masks.route_packed(root, info.config, info.model_class)
    _dropout_as_data(root, graph)
    _quantized_routes_as_data(root, graph)
    gm = AdaptedModule(root, graph, class_name=f"Adapted{info.model_class}", generate_code=generate_code)
    gm.capture_info = info
    log.debug("emit: %s", type(gm).__name__)
    return gm.train(info.training)


def _wire_hf_signature(root: torch.nn.Module, graph: torch.fx.Graph, info: CaptureInfo) -> None:
    root.add_module(INPUTS_MODULE, hf_io.InputAdapter(info.inputs, info.model_class, info.config,
                                                   info.max_seq, info.positions))
    root.add_module(OUTPUT_MODULE, hf_io.OutputAdapter(info.out_spec, info.config, info.model_class))
    _wire_signature(graph, list(graph.find_nodes(op="placeholder")))
    graph._codegen = torch.fx.graph.CodeGen()


def _wire_signature(graph: torch.fx.Graph, placeholders: list[torch.fx.Node]) -> None:
    """``forward(input_ids, attention_mask=None, ..., labels=None, **kwargs)`` around the body."""
    for node in placeholders[1:]:
        node.args = (None,)
    with graph.inserting_after(placeholders[-1]):
        kwargs = graph.placeholder("**kwargs")
    with graph.inserting_after(placeholders[-1]):
        labels = graph.placeholder("labels", default_value=None)
    with graph.inserting_after(kwargs):
        named = {p.target: p for p in placeholders}
        adapter = graph.call_module(INPUTS_MODULE, (named, labels, kwargs))
    for index, node in enumerate(placeholders):
        with graph.inserting_after(adapter):
            filled = graph.call_function(operator.getitem, (adapter, index))
        node.replace_all_uses_with(filled, delete_user_cb=lambda user: user is not adapter)
    output = next(iter(graph.find_nodes(op="output")))
    flat = output.args[0]
    with graph.inserting_before(output):
        wrapped = graph.call_module(OUTPUT_MODULE, (labels, kwargs, *flat))
    output.args = (wrapped,)


def sdpa_dropout_p(node: torch.fx.Node) -> float:
    if "dropout_p" in node.kwargs:
        return node.kwargs["dropout_p"]
    return node.args[_SDPA_P_INDEX] if len(node.args) > _SDPA_P_INDEX else 0.0


def _quantized_routes_as_data(root: torch.nn.Module, graph: torch.fx.Graph) -> None:
    """bitsandbytes computes an 8-bit layer one way in training and another in eval on a CPU:
    its ops read the mode from a ``TrainingFlag`` module, as dropout does."""
    if graph.find_nodes(op="call_function", target=QUANTIZED_OPS["linear_8bit"]):
        root.add_module(TRAINING_FLAG_MODULE, TrainingFlag())
        route_8bit_by_mode(graph, TRAINING_FLAG_MODULE)


def _dropout_as_data(root: torch.nn.Module, graph: torch.fx.Graph) -> None:
    """Export's ``aten.dropout(x, p, train)`` becomes ``fxpeft_dropout(x, p)``, and a non-zero
    SDPA ``dropout_p`` reads ``fxpeft_dropout_attention(p)``: both follow ``training``."""
    root.add_module(DROPOUT_MODULE, Dropout())
    for node in list(graph.find_nodes(op="call_function", target=aten.dropout.default)):
        with graph.inserting_before(node):
            routed = graph.call_module(DROPOUT_MODULE, (node.args[0], node.args[1]))
        routed.meta = dict(node.meta)
        node.replace_all_uses_with(routed)
        graph.erase_node(node)
    for node in graph.find_nodes(op="call_function", target=_SDPA):
        p = sdpa_dropout_p(node)
        if isinstance(p, float) and p > 0:
            if not hasattr(root, ATTENTION_DROPOUT_MODULE):
                root.add_module(ATTENTION_DROPOUT_MODULE, AttentionDropout())
            with graph.inserting_before(node):
                dynamic_p = graph.call_module(ATTENTION_DROPOUT_MODULE, (p,))
            _set_sdpa_p(node, dynamic_p)


def _set_sdpa_p(node: torch.fx.Node, p: "float | torch.fx.Node") -> None:
    if "dropout_p" in node.kwargs or len(node.args) <= _SDPA_P_INDEX:
        if len(node.args) <= 3:
            node.args = node.args + (None,)
        node.kwargs = {**node.kwargs, "dropout_p": p}
    else:
        node.args = node.args[:_SDPA_P_INDEX] + (p,) + node.args[_SDPA_P_INDEX + 1:]
