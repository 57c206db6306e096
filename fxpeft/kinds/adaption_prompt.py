"""Adaption prompts (LLaMA-Adapter, PEFT's ``AdaptionPromptConfig``).

Per matched attention block, with ``P`` the learned prompt ``(1, adapter_len, hidden)``::

    out = attention + gate * softmax_fp32(scale * q @ k_proj(P)^T) @ v_proj(P)

added to the attention result *before* the heads are merged and ``o`` projects them. PEFT
recomputes q (and RoPE) and applies ``o_proj`` a second time; here the graph's own post-RoPE
query is reused and ``o`` runs once, on the sum (equal to PEFT when ``o`` has no bias).
The adapter keys get no RoPE, as in PEFT. With grouped-query attention the query heads are
grouped onto the prompt's k/v heads instead of repeating k/v.

Adapter ``"default"`` adds PEFT's ``adaption_prompt`` / ``adaption_gate``, any other
``adaption_prompt_<name>`` / ``adaption_gate_<name>``. The learned gate is multiplied by the
adapter's on/off gate (``fxpeft.graph.gates``), so an off adapter adds exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from fxpeft.graph.params import attach_component
from fxpeft.graph.targets import nodes_between
from fxpeft.match.attention import AttentionSite
from fxpeft.errors import PassError
from fxpeft.graph.gates import GATE_META, gate_node, reroute
from fxpeft.registry import AdapterKind, SpliceInput, Spliced
from fxpeft.match.query import Match
from fxpeft.names import ADAPTER_META, AdapterNode
from fxpeft.formats.peft_format import PeftFormat, PeftFormatError, names_regex
from fxpeft.capture.linear_sites import LinearSite
from fxpeft.capture.program import Program
from fxpeft.rules import checks
from fxpeft.rules.schema import Params, Rule, RuleSet, Where, spec

aten = torch.ops.aten
PROMPT, GATE = "adaption_prompt", "adaption_gate"


@dataclass(frozen=True)
class AdaptionPromptParams(Params):
    """LLaMA-Adapter (PEFT's ``AdaptionPromptConfig``): ``adapter_len`` learned prompt tokens per
    layer, attended through the layer's frozen k/v projections with their own softmax, times a
    zero-initialised gate (``gate = "tanh"``: times ``tanh(gate)``, as the paper's later code).

    >>> AdaptionPromptParams().adapter_len
    10
    """

    kind = "adaption_prompt"
    match_kinds = ("attention",)
    adapter_len: int = spec(10, checks.positive_int, "prompt tokens per layer")
    gate: str = spec("scale", checks.one_of("scale", "tanh"), "how the gate scales the scores")


def make_adaption_parameters(site: AttentionSite, params: AdaptionPromptParams,
                             like: torch.Tensor) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """A standard-normal prompt (as PEFT and the paper's embedding) and a zero gate."""
    factory = {"dtype": like.dtype, "device": like.device}
    prompt = torch.empty(1, params.adapter_len, site.k.in_features, **factory).normal_()
    return torch.nn.Parameter(prompt), torch.nn.Parameter(torch.zeros(1, **factory))


def _register(gm: torch.fx.GraphModule, site: AttentionSite, params: AdaptionPromptParams,
              adapter: str) -> tuple[str, str]:
    """The prompt and gate parameters of ``adapter``; returns their targets."""
    prompt, gate = make_adaption_parameters(site, params, site.k.weight_like(gm))
    return (attach_component(gm, site.module_path, PROMPT, adapter, prompt),
            attach_component(gm, site.module_path, GATE, adapter, gate))


def _project(graph: torch.fx.Graph, site: LinearSite, x: torch.fx.Node) -> torch.fx.Node:
    """``site``'s frozen projection (weight and bias) applied to ``x``."""
    if site.kind == "module":
        return graph.call_module(site.node.target, (x,))
    if site.kind != "linear":
        raise PassError(f"{site.module_path}: adaption prompts need k/v as separate linear layers, "
                        f"found {site.kind}")
    return graph.call_function(site.node.target, (x, *site.node.args[1:]), dict(site.node.kwargs))


def _prompt_heads(graph: torch.fx.Graph, site: AttentionSite, projected: torch.fx.Node) -> torch.fx.Node:
    """``(1, len, kv_heads * head_dim)`` -> ``(1, kv_heads, len, head_dim)``."""
    split = graph.call_function(aten.unflatten.int, (projected, -1, [site.kv_heads, site.head_dim]))
    return graph.call_function(aten.transpose.int, (split, 1, 2))


def _group_query(graph: torch.fx.Graph, site: AttentionSite, groups: int) -> torch.fx.Node:
    """``(b, heads, s, d)`` -> ``(b, kv_heads, groups * s, d)``: query heads sharing a k/v head."""
    if groups == 1:
        return site.query
    split = graph.call_function(aten.unflatten.int, (site.query, 1, [site.kv_heads, groups]))
    return graph.call_function(aten.flatten.using_ints, (split, 2, 3))


def _ungroup(graph: torch.fx.Graph, mixed: torch.fx.Node, groups: int) -> torch.fx.Node:
    if groups == 1:
        return mixed
    split = graph.call_function(aten.unflatten.int, (mixed, 2, [groups, -1]))
    return graph.call_function(aten.flatten.using_ints, (split, 1, 2))


def _switched(gm: torch.fx.GraphModule, gate: torch.fx.Node, adapter: str,
              query: torch.fx.Node) -> torch.fx.Node:
    """The learned gate times the adapter's on/off gate (per sample of ``query`` in mixed
    batches): exactly 0 when the adapter is off."""
    on = gate_node(gm, adapter, gm.get_parameter(gate.target), query)
    switched = gm.graph.call_function(aten.mul.Tensor, (gate, on))
    switched.meta[GATE_META] = adapter
    return switched


def _gated_probabilities(graph: torch.fx.Graph, site: AttentionSite, scores: torch.fx.Node,
                         gate: torch.fx.Node, params: AdaptionPromptParams) -> torch.fx.Node:
    """``gate * softmax(scale * scores)``, the softmax in fp32 and cast back to the scores'
    dtype at run time (so ``gm.to(torch.bfloat16)`` works), as PEFT does."""
    scaled = graph.call_function(aten.mul.Tensor, (scores, site.scale))
    probs = graph.call_function(aten.softmax.int, (scaled, -1, torch.float32))
    probs = graph.call_function(aten.type_as.default, (probs, scores))
    if params.gate == "tanh":
        gate = graph.call_function(aten.tanh.default, (gate,))
    return graph.call_function(aten.mul.Tensor, (gate, probs))


def _adapter_branch(gm: torch.fx.GraphModule, site: AttentionSite, params: AdaptionPromptParams,
                    targets: tuple[str, str], adapter: str) -> torch.fx.Node:
    """The prompt's contribution, ``(b, heads, s, head_dim)`` like the attention output."""
    graph = gm.graph
    prompt = graph.get_attr(targets[0])
    gate = _switched(gm, graph.get_attr(targets[1]), adapter, site.query)
    keys = _prompt_heads(graph, site, _project(graph, site.k, prompt))
    values = _prompt_heads(graph, site, _project(graph, site.v, prompt))
    groups = site.heads // site.kv_heads
    query = _group_query(graph, site, groups)
    scores = graph.call_function(aten.matmul.default,
                                 (query, graph.call_function(aten.transpose.int, (keys, 2, 3))))
    weights = _gated_probabilities(graph, site, scores, gate, params)
    return _ungroup(graph, graph.call_function(aten.matmul.default, (weights, values)), groups)


def splice(job: SpliceInput) -> Spliced:
    """Register the adapter's prompt and gate at the attention module and add their branch to
    the attention output."""
    gm, site, params, adapter = job.gm, job.site, job.params, job.adapter
    if site.heads % site.kv_heads:
        raise PassError(f"{site.module_path}: {site.heads} query heads do not group onto "
                        f"{site.kv_heads} k/v heads")
    targets = _register(gm, site, params, adapter)
    graph, output = gm.graph, site.output
    with graph.inserting_before(output.next):
        branch = _adapter_branch(gm, site, params, targets, adapter)
        total = graph.call_function(aten.add.Tensor, (output, branch))
    reroute(output, total)
    added = [n for n in nodes_between(output, total) if GATE_META not in n.meta]
    for node in added:
        node.meta[ADAPTER_META] = AdapterNode("adaption_prompt", adapter, site.module_path,
                                              0 if node is total else None)
    return Spliced(added, list(targets))


# --- PEFT's AdaptionPromptConfig ---------------------------------------------------------------------------

PROMPT_FIELDS = frozenset({"target_modules", "adapter_len", "adapter_layers"})


def _top_layers(matches: list[Match], program: Program) -> int:
    """How many top layers ``matches`` cover; PEFT can only say "the top N"."""
    layers = sorted(m.candidate.layer for m in matches)
    top = list(range(program.layer_count - len(layers), program.layer_count))
    if layers != top:
        raise PeftFormatError(f"adaption prompts in layers {layers}: PEFT's format can only hold "
                              f"the top N layers ({top} for N={len(layers)})")
    return len(layers)


def rules_to_config(matches: list[Match], program: Program) -> dict[str, Any]:
    """``AdaptionPromptConfig`` fields: the attention module name, prompt length, layer count."""
    params = {m.rule.params for m in matches}
    if len(params) != 1 or next(iter(params)).gate != "scale":
        raise PeftFormatError(f"PEFT's adaption prompts have one adapter_len and a plain gate; "
                              f"got {sorted(map(repr, params))}")
    names = {m.module_path.rsplit(".", 1)[-1] for m in matches}
    if len(names) != 1:
        raise PeftFormatError(f"adaption prompts on differently named modules {sorted(names)}")
    return {"target_modules": names.pop(), "adapter_len": next(iter(params)).adapter_len,
            "adapter_layers": _top_layers(matches, program)}


def config_to_rules(config: dict[str, Any], model: torch.nn.Module, source: str) -> RuleSet:
    """The top ``adapter_layers`` attention blocks named ``target_modules`` get prompts."""
    layers, length = config.get("adapter_layers"), config.get("adapter_len")
    if not isinstance(layers, int) or layers < 1 or not isinstance(length, int) or length < 1:
        raise PeftFormatError(f"{source}: adapter_layers and adapter_len must be positive "
                              f"integers, got {layers!r} and {length!r}")
    target = config.get("target_modules") or "self_attn"
    where = Where(path=["^" + names_regex([target])], layer_range=[-layers, -1])
    rule = Rule(name="peft adaption prompt", match="attention", where=where,
                params=AdaptionPromptParams(adapter_len=length))
    return RuleSet((rule,), source=source)


KIND = AdapterKind(
    name="adaption_prompt", params=AdaptionPromptParams, splice=splice,
    merge="adaption prompts are no linear change of a weight (a softmax over the prompt's keys)",
    components=(PROMPT, GATE),
    peft=PeftFormat("ADAPTION_PROMPT", rules_to_config, config_to_rules, PROMPT_FIELDS))
