"""The adaption-prompt pass (LLaMA-Adapter, PEFT's ``AdaptionPromptConfig``).

Per matched attention block, with ``P`` the learned prompt ``(1, adapter_len, hidden)``::

    out = attention + gate * softmax_fp32(scale * q @ k_proj(P)^T) @ v_proj(P)

added to the attention result *before* the heads are merged and ``o`` projects them. PEFT
recomputes q (and RoPE) and applies ``o_proj`` a second time; here the graph's own post-RoPE
query is reused and ``o`` runs once, on the sum (equal to PEFT when ``o`` has no bias).
The adapter keys get no RoPE, as in PEFT. With grouped-query attention the query heads are
grouped onto the prompt's k/v heads instead of repeating k/v.

Adapter ``"default"`` adds PEFT's ``adaption_prompt`` / ``adaption_gate``, any other
``adaption_prompt_<name>`` / ``adaption_gate_<name>``. The learned gate is multiplied by the
adapter's on/off gate (``fxpeft.gates``), so an off adapter adds exact zeros.
"""

from __future__ import annotations

import torch
import torch.fx

from fxpeft.adapters import attach_component, register_adapter_names
from fxpeft.attention import AttentionSite
from fxpeft.errors import PassError
from fxpeft.gates import GATE_META, gate_node, reroute
from fxpeft.program import LinearSite
from fxpeft.rules.schema import AdaptionPromptParams
from fxpeft.transforms.lora import ADAPTER_META

aten = torch.ops.aten
PROMPT, GATE = "adaption_prompt", "adaption_gate"
register_adapter_names(PROMPT, GATE)


def make_adaption_parameters(site: AttentionSite, params: AdaptionPromptParams,
                             like: torch.Tensor) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
    """A standard-normal prompt (as PEFT and the paper's embedding) and a zero gate."""
    factory = {"dtype": like.dtype, "device": like.device}
    prompt = torch.empty(1, params.adapter_len, site.k.in_features, **factory).normal_()
    return torch.nn.Parameter(prompt), torch.nn.Parameter(torch.zeros(1, **factory))


def _register(gm: torch.fx.GraphModule, site: AttentionSite, params: AdaptionPromptParams,
              adapter: str) -> tuple[str, str]:
    """The prompt and gate parameters of ``adapter``; returns their targets."""
    prompt, gate = make_adaption_parameters(site, params, gm.get_parameter(site.k.weight_target))
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
    """``gate * softmax(scale * scores)``, the softmax in fp32 and cast back, as PEFT does."""
    scaled = graph.call_function(aten.mul.Tensor, (scores, site.scale))
    probs = graph.call_function(aten.softmax.int, (scaled, -1, torch.float32))
    dtype = site.query.meta["val"].dtype if "val" in site.query.meta else torch.float32
    if dtype != torch.float32:
        probs = graph.call_function(aten.to.dtype, (probs, dtype))
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


def splice_adaption_prompt(gm: torch.fx.GraphModule, site: AttentionSite,
                           params: AdaptionPromptParams, adapter: str = "default") -> list[torch.fx.Node]:
    """Register ``adapter``'s prompt and gate at ``site.module_path`` and add their branch to the
    output."""
    if site.heads % site.kv_heads:
        raise PassError(f"{site.module_path}: {site.heads} query heads do not group onto "
                        f"{site.kv_heads} k/v heads")
    targets = _register(gm, site, params, adapter)
    graph, output = gm.graph, site.output
    first = output.next
    with graph.inserting_before(first):
        branch = _adapter_branch(gm, site, params, targets, adapter)
        total = graph.call_function(aten.add.Tensor, (output, branch))
    reroute(output, total)
    added = []
    node = output.next
    while node is not first:
        if GATE_META not in node.meta:  # gate nodes carry only their adapter, as LoRA's do
            node.meta[ADAPTER_META] = {"kind": "adaption_prompt", "module_path": site.module_path,
                                       "adapter": adapter, "gate": params.gate}
            added.append(node)
        node = node.next
    return added
