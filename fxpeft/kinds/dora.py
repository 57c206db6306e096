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
from fxpeft.kinds.lora import (LORA_FIELDS, LoraDetail, LoraParams, adapter_dtype, adapter_input,
                               attach_lora, branch_of, casts, config_to_rules, join, lora_delta,
                               low_rank, record_nodes, rules_to_config, unit_scale_params)
from fxpeft.registry import AdapterKind, Combines, SpliceInput, Spliced
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
    match_kinds = ("linear",)  # DoRA on embeddings and convolutions is not implemented


@dataclass(frozen=True)
class DoraDetail(LoraDetail):
    """LoRA's targets plus the magnitude vector and the layer's bias."""

    magnitude: str = ""
    bias: str | None = None


def _oriented(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The weight as ``(out, in)``."""
    return weight.T if fan_in_fan_out else weight


def _updated_weight(gm: torch.nn.Module, detail: LoraDetail) -> torch.Tensor:
    """``W + s·BA`` as ``(out, in)``, in fp32."""
    weight = base_weight(gm, detail.weight).float()
    return _oriented(weight + lora_delta(gm, detail), detail.fan_in_fan_out)


def _attach(job: SpliceInput) -> tuple[DoraDetail, list[str]]:
    lora, attached = attach_lora(job)
    weight = job.site.weight_like(job.gm)
    norm = torch.linalg.vector_norm(_updated_weight(job.gm, lora), dim=1).to(
        adapter_dtype(job.params, weight.dtype))
    target = attach_component(job.gm, job.site.module_path, MAGNITUDE, job.adapter,
                              torch.nn.Parameter(norm))
    detail = DoraDetail(**dataclasses.asdict(lora), magnitude=target,
                        bias=job.site.bias_target(job.gm))
    return detail, [*attached, target]


def _magnitude_scale(gm: torch.fx.GraphModule, detail: DoraDetail) -> torch.fx.Node:
    """``m / ||W + s·BA||`` per output feature, the norm detached."""
    graph, weight = gm.graph, weight_node(gm, detail.weight)
    if detail.fan_in_fan_out:
        weight = graph.call_function(aten.t.default, (weight,))
    delta = graph.call_function(aten.mm.default, (graph.get_attr(detail.lora_B),
                                                  graph.get_attr(detail.lora_A)))
    updated = graph.call_function(aten.add.Tensor, (weight, graph.call_function(
        aten.mul.Tensor, (delta, detail.scale))))
    norm = graph.call_function(aten.linalg_vector_norm.default,
                               (graph.call_function(aten.detach.default, (updated,)), 2, [1]))
    return graph.call_function(aten.div.Tensor, (graph.get_attr(detail.magnitude), norm))


def _base_without_bias(job: SpliceInput, detail: DoraDetail, x: torch.fx.Node) -> torch.fx.Node:
    """``W x``: ``y - bias``, or, under adapter dropout, recomputed from the dropped input."""
    graph, y = job.gm.graph, job.site.node
    if job.params.dropout > 0:
        weight = weight_node(job.gm, detail.weight)
        if detail.fan_in_fan_out:
            weight = graph.call_function(aten.t.default, (weight,))
        if casts(job):  # PEFT casts the base weight to the (fp32) input
            weight = graph.call_function(aten.to.dtype, (weight, torch.float32))
        return graph.call_function(aten.linear.default, (x, weight))
    if detail.bias is None:
        return y
    return graph.call_function(aten.sub.Tensor, (y, graph.get_attr(detail.bias)))


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
    base = weight_so_far(gm, weights, detail.weight)
    updated = _oriented(base.float(), detail.fan_in_fan_out) + _oriented(
        lora_delta(gm, detail), detail.fan_in_fan_out)
    factor = fetch(gm, detail.magnitude).detach().float() / torch.linalg.vector_norm(updated, dim=1)
    weights[detail.weight] = _oriented(factor[:, None] * updated, detail.fan_in_fan_out).to(base.dtype)


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
    components=("lora_A", "lora_B", MAGNITUDE),
    peft=PeftFormat("LORA", functools.partial(rules_to_config, use_dora=True),
                    functools.partial(config_to_rules, params_class=DoraParams),
                    LORA_FIELDS, selector={"use_dora": True}),
    combines=Combines(branch_of, unit_scale_params, row_gain, base_rows, set_row_gain))
