"""IA3: a learned vector ``ia3_l`` (ones at init) scales a linear's output, or, for
feed-forward sites, its input. Shapes are PEFT's: ``(out, 1)`` for outputs, ``(1, in)`` for
inputs, so the saved tensors need no reshaping. Merge folds the vector into the weight.

On a 2-d or 3-d convolution (PEFT's ``Conv2d`` / ``Conv3d``; PEFT's IA3 has no ``Conv1d``) the
vector is ``(1, channels, 1, 1[, 1])`` and scales the output's (or input's) channels; merge folds
it into the kernel, per group for a grouped convolution's input channels, as PEFT does.

Adapter ``"default"`` adds ``ia3_l``, any other ``ia3_l_<name>``. The scale is
``lerp(1, l, gate)`` with the adapter's gate (``fxpeft.graph.gates``): exactly ``l`` when on and
exactly ``1`` when off. The ``mul`` that applies it is the removable node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import fetch
from fxpeft.graph.gates import gate_node, reroute
from fxpeft.kinds.lora import adapter_dtype
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.errors import FxpeftError
from fxpeft.match.layer_sites import ConvSite, find_conv_sites
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, AdapterNode
from fxpeft.formats.peft_format import (PeftFormat, PeftFormatError, exclude_regexes, full_regex,
                                        names_regex, target_regex, targets_for)
from fxpeft.capture.quantized import weight_so_far
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
IA3 = "ia3_l"


@dataclass(frozen=True)
class IA3Params(Params):
    """IA3: a learned vector, initialised to ones, scales a linear's output (or, with
    ``feedforward = true``, its input, as PEFT's ``feedforward_modules``).

    >>> IA3Params(feedforward=True).feedforward
    True
    """

    kind = "ia3"
    match_kinds = ("linear", "conv")
    feedforward: bool = spec(False, checks.boolean, "scale the input instead of the output")
    autocast: bool = spec(True, checks.boolean, "fp32 vectors on fp16/bf16 bases")


@dataclass(frozen=True)
class IA3Detail:
    """What merge needs: the vector, the weight (and bias) it folds into, and which axis."""

    parameter: str
    feedforward: bool
    weight: str
    bias: str | None
    fan_in_fan_out: bool
    groups: int = 1


def _shape(site: Any, feedforward: bool) -> tuple[int, ...]:
    """PEFT's vector shape: ``(1, in)`` / ``(out, 1)`` on a linear, ``(1, channels, 1, ..)`` on
    a convolution."""
    if not isinstance(site, ConvSite):
        return (1, site.in_features) if feedforward else (site.out_features, 1)
    if site.dims == 1:
        raise FxpeftError(f"{site.module_path}: PEFT's IA3 supports Conv2d and Conv3d, not conv1d")
    return (1, site.in_channels if feedforward else site.out_channels) + (1,) * site.dims


def _attach(job: SpliceInput) -> IA3Detail:
    site, params = job.site, job.params
    weight = site.weight_like(job.gm)
    shape = _shape(site, params.feedforward)
    dtype = adapter_dtype(params, weight.dtype)
    vector = torch.nn.Parameter(torch.ones(shape, dtype=dtype, device=weight.device))
    target = attach_component(job.gm, site.module_path, IA3, job.adapter, vector)
    return IA3Detail(target, params.feedforward, site.weight_target, site.bias_target(job.gm),
                     site.fan_in_fan_out, getattr(site, "groups", 1))


def _gated_vector(job: SpliceInput, target: str) -> list[torch.fx.Node]:
    """Nodes computing ``lerp(1, l, gate)`` flat, or ``(channels, 1, ..)`` on a convolution (per
    sample of the site's input in mixed batches); the last is the scale. lerp, not
    ``1 + gate * (l - 1)``: its two-sided formula is bit-exact at both gate 0 and gate 1."""
    graph = job.gm.graph
    shape = [-1] + [1] * job.site.dims if isinstance(job.site, ConvSite) else [-1]
    vector = graph.call_function(aten.view.default, (graph.get_attr(target), shape))
    ones = graph.call_function(aten.ones_like.default, (vector,))
    gate = gate_node(job.gm, job.adapter, job.gm.get_parameter(target), job.site.input)
    return [vector.args[0], vector, ones, graph.call_function(aten.lerp.Tensor, (ones, vector, gate))]


def scale_in_dtype_of(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale`` in the wider dtype, cast back to ``x``'s, where PEFT casts."""
    return (x * scale).to(x.dtype)


def splice(job: SpliceInput) -> Spliced:
    """``y * l`` after the site, or ``f(x * l)`` for a feed-forward site (``l`` gated)."""
    detail = _attach(job)
    site, graph = job.site, job.gm.graph
    anchor = site.consumer if detail.feedforward else site.node.next
    source = site.input if detail.feedforward else site.node
    with graph.inserting_before(anchor):
        added = _gated_vector(job, detail.parameter)
        cast = job.gm.get_parameter(detail.parameter).dtype != site.weight_like(job.gm).dtype
        scaled = graph.call_function(scale_in_dtype_of if cast else aten.mul.Tensor, (source, added[-1]))
    if detail.feedforward:
        site.consumer.replace_input_with(source, scaled)
    else:
        reroute(site.node, scaled)
    for node in added:
        node.meta[ADAPTER_META] = AdapterNode("ia3", job.adapter, site.module_path, None, detail)
    scaled.meta[ADAPTER_META] = AdapterNode("ia3", job.adapter, site.module_path, 0, detail)
    return Spliced([*added, scaled], [detail.parameter])


def _factor(vector: torch.Tensor, weight: torch.Tensor, detail: IA3Detail) -> torch.Tensor:
    """The vector shaped to multiply the stored weight: along its rows (outputs) or columns
    (inputs; a fan-in-fan-out weight is ``(in, out)``); a convolution's kernel ``(out, in /
    groups, *k)`` takes each group's own slice of the input channels.

    >>> detail = IA3Detail("l", True, "w", None, False, groups=2)
    >>> _factor(torch.arange(4.), torch.ones(4, 2, 3, 3), detail)[:, :, 0, 0].tolist()
    [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]
    """
    flat, trailing = vector.float().flatten(), [1] * (weight.dim() - 2)
    if detail.feedforward == detail.fan_in_fan_out:  # along the rows
        return flat.reshape(-1, 1, *trailing)
    if weight.dim() == 2:
        return flat.reshape(1, -1)
    out, per_group = weight.shape[0], weight.shape[1]
    grouped = flat.reshape(detail.groups, 1, per_group).expand(detail.groups, out // detail.groups, per_group)
    return grouped.reshape(out, per_group, *trailing)


def merge(gm: torch.fx.GraphModule, node: torch.fx.Node, record: AdapterNode,
          weights: dict[str, torch.Tensor]) -> None:
    """Fold the vector into the weight (and, for output scaling, the bias)."""
    detail: IA3Detail = record.detail
    vector = fetch(gm, detail.parameter).detach()
    weight = weight_so_far(gm, weights, detail.weight)
    weights[detail.weight] = (weight.float() * _factor(vector, weight, detail)).to(weight.dtype)  # fp32, cast once
    if detail.bias and not detail.feedforward:
        bias = weights.get(detail.bias, fetch(gm, detail.bias).detach())
        weights[detail.bias] = (bias.float() * vector.float().flatten()).to(bias.dtype)


# --- PEFT's IA3Config -------------------------------------------------------------------------

IA3_FIELDS = frozenset({"target_modules", "feedforward_modules", "exclude_modules",
                        "fan_in_fan_out", "init_ia3_weights"})


def _feedforward_regex(config: dict[str, Any], source: str) -> str | None:
    feedforward = config.get("feedforward_modules")
    if not feedforward:
        return None
    if isinstance(feedforward, str):
        return full_regex(feedforward)
    if isinstance(feedforward, (list, tuple)) and all(isinstance(f, str) for f in feedforward):
        return names_regex(list(feedforward))
    raise PeftFormatError(f"{source}: feedforward_modules must be names or a regex, got {feedforward!r}")


def _check_feedforward_in_targets(config: dict[str, Any], source: str) -> None:
    """PEFT's ``IA3Config`` raises ``ValueError`` when ``feedforward_modules`` (names) are not
    all in ``target_modules`` (names): such a module would silently get no adapter."""
    feedforward, target = config.get("feedforward_modules"), config.get("target_modules")
    if not (isinstance(feedforward, (list, tuple)) and isinstance(target, (list, tuple))):
        return  # a regex (or "all-linear") selects by pattern; PEFT checks only names too
    outside = [name for name in feedforward if name not in target]
    if outside:
        raise PeftFormatError(f"{source}: feedforward_modules = {list(feedforward)}: "
                              f"{outside[0]!r} is not in target_modules = {list(target)}; every "
                              f"feed-forward module must be a target too (PEFT's IA3Config raises "
                              f"ValueError for this)")


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """Feed-forward targets scale their input (first rule, first match wins); the rest outputs."""
    _check_feedforward_in_targets(config, source)
    target = target_regex(config, model, source)
    exclude = exclude_regexes(config)
    feedforward = _feedforward_regex(config, source)
    rules = []
    for site in IA3Params.match_kinds:  # a rule per site kind, feed-forward first (first match wins)
        suffix = "" if site == "linear" else f" {site}"
        if feedforward:
            rules.append(Rule(name=f"peft ia3 feedforward{suffix}", match=site, optional=True,
                              params=IA3Params(feedforward=True),
                              where=Where(path=[f"^(?={feedforward})" + target], exclude=exclude)))
        rules.append(Rule(name=f"peft ia3{suffix}", match=site, optional=True, params=IA3Params(),
                          where=Where(path=["^" + target], exclude=exclude)))
    return RuleSet(tuple(rules), source=source)


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``IA3Config`` fields selecting the matched layers, and which of them are feed-forward."""
    feedforward = sorted(m.module_path for m in matches if m.rule.params.feedforward)
    known = [s.module_path for s in (*program.sites, *find_conv_sites(program.graph_module))]
    return {"target_modules": targets_for(sorted(m.module_path for m in matches), program, known),
            "feedforward_modules": targets_for(feedforward, program, known) if feedforward else [],
            "fan_in_fan_out": any(m.site.fan_in_fan_out for m in matches),
            "init_ia3_weights": True}


KIND = AdapterKind(name="ia3", params=IA3Params, splice=splice, merge=merge, components=(IA3,),
                   peft=PeftFormat("IA3", rules_to_config, config_to_rules, IA3_FIELDS))
