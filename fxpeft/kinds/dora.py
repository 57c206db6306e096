"""DoRA (weight-decomposed LoRA; PEFT's ``LoraConfig(use_dora=True)``).

The adapted weight is ``m * (W + s·BA) / ||W + s·BA||``, row by row: a learned magnitude ``m``
(one per output feature, ``lora_magnitude_vector``, initialised to the norms at init, as PEFT
does) times the direction of the LoRA-updated weight. The norm is detached, as in the DoRA paper
(section 4.3) and PEFT. Spliced after ``y = f(x)``, with ``g = m / ||W + s·BA||``::

    y + gate * ((g - 1) * (y - bias) + g * s * B(A(x)))

With dropout, ``y - bias`` is recomputed from the dropped input, as PEFT does. The adapter's
on/off gate multiplies the whole branch, so an off adapter adds exact zeros; the closing ``add``
is the removable node, and merge folds ``g * (W + s·BA)`` into the weight. Rule files say
``rewrite = "dora"`` with LoRA's params; saved keys are PEFT's, ``lora_magnitude_vector``
included.

On an embedding (``W`` stored ``[num, dim]``) the norms are over ``W.T + s·BA``'s rows, one per
embedding dimension, and ``y - bias`` is the lookup itself, as PEFT's ``DoraEmbeddingLayer``. On a
1-d, 2-d or 3-d convolution the magnitude is PEFT's ``(1, out, 1, ..)`` and the norms are over
each output channel's whole kernel; ``s·BA`` there is PEFT's ``B.view(-1, r) @ A.view(r, -1)``
reshaped to the kernel (for a grouped convolution that is PEFT's own reading of the product, which
fxpeft repeats). A grouped convolution's DoRA does not merge (neither does its LoRA).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.fx

from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.kinds.lora import (EMBEDDING, GRAPH_FIELDS, LORA_FIELDS, LoraDetail, LoraParams, adapter_dtype,
                               adapter_input, attach_lora, branch_of, casts, check_mergeable,
                               config_to_rules, join, layer_op, layout_of, lora_delta, low_rank,
                               record_nodes, rules_to_config, unit_scale_params)
from fxpeft.errors import FxpeftError
from fxpeft.match.layer_sites import ConvSite
from fxpeft.registry import AdapterKind, Combines, LowRankBranch, SpliceInput, Spliced
from fxpeft.names import AdapterNode
from fxpeft.formats.peft_format import PeftFormat
from fxpeft.capture.quantized import base_weight, weight_node, weight_so_far

aten = torch.ops.aten
MAGNITUDE = "lora_magnitude_vector"


@dataclass(frozen=True)
class DoraParams(LoraParams):
    """DoRA takes LoRA's params (``r``, ``alpha``, ``dropout``, ``use_rslora``, ``init``).

    >>> DoraParams(r=4, alpha=8).scale
    2.0
    """

    kind = "dora"
    match_kinds = ("linear", "embedding", "conv")


@dataclass(frozen=True)
class DoraDetail(LoraDetail):
    """LoRA's targets plus the magnitude vector and the layer's bias."""

    magnitude: str = ""
    bias: str | None = None
    conv_dims: int = 0  # a convolution's spatial dims (its magnitude is (1, out, 1, ..)); else 0


def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as ``(out, in)``."""
    return weight.T if fan_in_fan_out else weight


def _delta(gm: torch.nn.Module, detail: DoraDetail) -> torch.Tensor:
    """``s·BA`` laid out like the stored weight, in fp32: LoRA's, or on a convolution PEFT's
    ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the kernel (the same unless grouped)."""
    if not detail.conv_dims:
        return lora_delta(gm, detail)
    lora_a, lora_b = fetch(gm, detail.lora_A).detach().float(), fetch(gm, detail.lora_B).detach().float()
    rank = lora_a.shape[0]
    product = lora_b.reshape(-1, rank) @ lora_a.reshape(rank, -1)
    return (product * detail.scale).reshape(fetch(gm, detail.weight).shape)


def _norms(updated: torch.Tensor) -> torch.Tensor:
    """One norm per output feature: over the rest of ``(out, ...)``."""
    return torch.linalg.vector_norm(updated, dim=tuple(range(1, updated.dim())))


def _updated_weight(gm: torch.nn.Module, detail: DoraDetail, base: torch.Tensor | None = None) -> torch.Tensor:
    """``W + s·BA`` as ``(out, ...)``, in fp32."""
    weight = (base_weight(gm, detail.weight) if base is None else base).float()
    return _oriented(weight + _delta(gm, detail), detail.fan_in_fan_out)


def _magnitude_shape(detail: DoraDetail) -> list[int]:
    return [1, -1] + [1] * detail.conv_dims if detail.conv_dims else [-1]


def _attach(job: SpliceInput) -> tuple[DoraDetail, list[str]]:
    for refused, wanted in (("lora_bias", job.params.lora_bias), ("init = \"mica\"", job.params.init == "mica")):
        if wanted:  # PEFT's LoraConfig refuses both with use_dora
            raise FxpeftError(f"{job.site.module_path}: DoRA does not take {refused} (as in PEFT)")
    lora, attached = attach_lora(job)
    weight = job.site.weight_like(job.gm)
    detail = DoraDetail(**dataclasses.asdict(lora), bias=job.site.bias_target(job.gm),
                        conv_dims=job.site.dims if isinstance(job.site, ConvSite) else 0)
    norm = _norms(_updated_weight(job.gm, detail)).reshape(_magnitude_shape(detail))
    target = attach_component(job.gm, job.site.module_path, MAGNITUDE, job.adapter,
                              torch.nn.Parameter(norm.to(adapter_dtype(job.params, weight.dtype))))
    return dataclasses.replace(detail, magnitude=target), [*attached, target]


def _delta_node(gm: torch.fx.GraphModule, detail: DoraDetail, weight: torch.fx.Node) -> torch.fx.Node:
    """The graph's ``B @ A`` (unscaled), as ``_delta`` lays it out."""
    graph = gm.graph
    lora_b, lora_a = graph.get_attr(detail.lora_B), graph.get_attr(detail.lora_A)
    if not detail.conv_dims:
        return graph.call_function(aten.mm.default, (lora_b, lora_a))
    rank = fetch(gm, detail.lora_A).shape[0]
    product = graph.call_function(aten.mm.default, (
        graph.call_function(aten.view.default, (lora_b, [-1, rank])),
        graph.call_function(aten.view.default, (lora_a, [rank, -1]))))
    return graph.call_function(aten.view.default, (product, list(fetch(gm, detail.weight).shape)))


def _magnitude_scale(gm: torch.fx.GraphModule, detail: DoraDetail) -> torch.fx.Node:
    """``m / ||W + s·BA||`` per output feature (shaped like ``m``), the norm detached."""
    graph, weight = gm.graph, weight_node(gm, detail.weight)
    if detail.fan_in_fan_out:
        weight = graph.call_function(aten.t.default, (weight,))
    updated = graph.call_function(aten.add.Tensor, (weight, graph.call_function(
        aten.mul.Tensor, (_delta_node(gm, detail, weight), detail.scale))))
    dims = list(range(1, 2 + detail.conv_dims))  # all but the output axis
    norm = graph.call_function(aten.linalg_vector_norm.default,
                               (graph.call_function(aten.detach.default, (updated,)), 2, dims))
    if detail.conv_dims:
        norm = graph.call_function(aten.view.default, (norm, _magnitude_shape(detail)))
    return graph.call_function(aten.div.Tensor, (graph.get_attr(detail.magnitude), norm))


def _base_without_bias(job: SpliceInput, detail: DoraDetail, x: torch.fx.Node) -> torch.fx.Node:
    """``W x``: ``y - bias``, or, under adapter dropout, recomputed from the dropped input (an
    embedding's indices take no dropout)."""
    graph, y = job.gm.graph, job.site.node
    if job.params.dropout > 0 and layout_of(job.site).features_in:
        weight = weight_node(job.gm, detail.weight)
        if detail.fan_in_fan_out:
            weight = graph.call_function(aten.t.default, (weight,))
        if casts(job):  # PEFT casts the base weight to the (fp32) input
            weight = graph.call_function(aten.to.dtype, (weight, torch.float32))
        return layer_op(graph, job.site, x, weight)
    if detail.bias is None:
        return y
    bias = graph.get_attr(detail.bias)
    if detail.conv_dims:  # (out,) against (batch, out, *spatial)
        bias = graph.call_function(aten.view.default, (bias, [-1] + [1] * detail.conv_dims))
    return graph.call_function(aten.sub.Tensor, (y, bias))


def splice(job: SpliceInput) -> Spliced:
    """Insert the DoRA branch after ``job.site.node`` and route its users through the sum."""
    detail, attached = _attach(job)
    graph, y = job.gm.graph, job.site.node
    with graph.inserting_before(y.next):  # keeps creation order
        x = adapter_input(job)
        lora = low_rank(job, detail, x, gated=False)
        scale = _magnitude_scale(job.gm, detail)
        rescaled = graph.call_function(aten.mul.Tensor, (graph.call_function(
            aten.sub.Tensor, (scale, 1)), _base_without_bias(job, detail, x)))
        update = graph.call_function(aten.mul.Tensor, (scale, graph.call_function(
            aten.mul.Tensor, (lora, detail.scale))))
        branch = graph.call_function(aten.add.Tensor, (rescaled, update))
        gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(detail.magnitude), branch)
        total = join(graph, y, graph.call_function(aten.mul.Tensor, (branch, gate)), casts(job))
    added = record_nodes(job, y, total, "dora", detail)
    reroute(y, total, keep=set(added))  # the branch itself reads y
    return Spliced(added, attached)


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """``m / ||W + s·BA|| * (W + s·BA)`` row by row (fp32, cast once); the bias is unchanged."""
    detail: DoraDetail = record.detail
    check_mergeable(record)
    base = weight_so_far(gm, weights, detail.weight)
    updated = _updated_weight(gm, detail, base_weight(gm, detail.weight))
    factor = fetch(gm, detail.magnitude).detach().float().flatten() / _norms(updated)
    merged = _oriented(base.float(), detail.fan_in_fan_out) + _oriented(_delta(gm, detail), detail.fan_in_fan_out)
    factor = factor.reshape(-1, *[1] * (merged.dim() - 1))
    weights[detail.weight] = _oriented(factor * merged, detail.fan_in_fan_out).to(base.dtype)


def linear_branch(record: AdapterNode) -> LowRankBranch | None:
    """LoRA's branch of a DoRA node on a linear layer, for ``fxpeft.combine``; None on an
    embedding or a convolution, whose magnitudes combine's row gains do not describe."""
    detail: DoraDetail = record.detail
    if detail.conv_dims or EMBEDDING.names[0] in detail.lora_A:
        return None
    return branch_of(record)


def row_gain(gm: torch.nn.Module, record: AdapterNode) -> torch.Tensor:
    """``g = m / ||W + s·BA||`` per output row (fp32): the adapted weight is ``diag(g)(W + s·BA)``."""
    detail: DoraDetail = record.detail
    norm = torch.linalg.vector_norm(_updated_weight(gm, detail), dim=1)
    return fetch(gm, detail.magnitude).detach().float() / norm


def base_rows(gm: torch.nn.Module, record: AdapterNode) -> torch.Tensor:
    """``W`` as ``(out, in)``, fp32."""
    detail: DoraDetail = record.detail
    return _oriented(base_weight(gm, detail.weight).float(), detail.fan_in_fan_out)


def set_row_gain(gm: torch.nn.Module, record: AdapterNode, gain: torch.Tensor) -> None:
    """Write the magnitude ``m = g·||W + s·BA||`` that gives the gain ``g`` for the current A, B."""
    detail: DoraDetail = record.detail
    magnitude = fetch(gm, detail.magnitude)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(_updated_weight(gm, detail), dim=1)
        magnitude.copy_((gain * norm).to(magnitude.dtype))


KIND = AdapterKind(
    name="dora", params=DoraParams, splice=splice, merge=merge,
    components=("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", MAGNITUDE),
    peft=PeftFormat("LORA", functools.partial(rules_to_config, use_dora=True),
                    functools.partial(config_to_rules, params_class=DoraParams),
                    LORA_FIELDS, selector={"use_dora": True, "alora_invocation_tokens": False},
                    graph_fields=GRAPH_FIELDS),
    combines=Combines(linear_branch, unit_scale_params, row_gain, base_rows, set_row_gain),
    carries=("trainable_tokens",), layer_replication=True)
