"""The LoRA pass: for each matched linear ``y = f(x)``, splice
``y + scale * B(gate * A(dropout(x)))``.

``gate`` is the adapter's 0-d gate buffer (``fxpeft.gates``), on the rank-r tensor where it is
cheapest; its nodes carry ``fxpeft_gate`` meta, the branch's other nodes ``fxpeft_adapter`` meta
(with the targets merge needs). Adapter ``"default"`` adds ``lora_A`` / ``lora_B``, any other
``lora_A_<name>`` / ``lora_B_<name>``; the adapter name comes from ``program.info["adapter"]``.
"""

from __future__ import annotations

import torch
import torch.fx

from fxpeft.adapters import attach_component
from fxpeft.gates import GATE_META, gate_node, reroute
from fxpeft.program import LinearSite
from fxpeft.rules.schema import LoraParams

aten = torch.ops.aten
ADAPTER_META = "fxpeft_adapter"


def make_lora_modules(site: LinearSite, params: LoraParams, like: torch.Tensor) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    """A (kaiming-uniform, as PEFT and ``nn.Linear`` do) and B (zeros unless ``init="random"``)."""
    factory = {"dtype": like.dtype, "device": like.device}
    lora_a = torch.nn.Linear(site.in_features, params.r, bias=False, **factory)
    lora_b = torch.nn.Linear(params.r, site.out_features, bias=False, **factory)
    if params.init == "default":
        torch.nn.init.zeros_(lora_b.weight)
    return lora_a, lora_b


def _lora_meta(site: LinearSite, params: LoraParams, adapter: str, a_path: str,
               b_path: str) -> dict:
    return {"kind": "lora", "module_path": site.module_path, "adapter": adapter,
            "scale": params.scale, "weight": site.weight_target, "lora_A": f"{a_path}.weight",
            "lora_B": f"{b_path}.weight", "fan_in_fan_out": site.fan_in_fan_out}


def splice_lora(gm: torch.fx.GraphModule, site: LinearSite, params: LoraParams,
                adapter: str = "default") -> list[torch.fx.Node]:
    """Insert ``adapter``'s LoRA branch after ``site.node`` and route its users through the sum."""
    weight = gm.get_parameter(site.weight_target)
    lora_a, lora_b = make_lora_modules(site, params, weight)
    a_path = attach_component(gm, site.module_path, "lora_A", adapter, lora_a)
    b_path = attach_component(gm, site.module_path, "lora_B", adapter, lora_b)
    graph, y = gm.graph, site.node
    with graph.inserting_before(y.next):  # keeps creation order
        x = site.input
        if params.dropout > 0:
            x = graph.call_function(aten.dropout.default, (x, params.dropout, gm.training))
        down = graph.call_function(aten.linear.default, (x, graph.get_attr(f"{a_path}.weight")))
        gated = graph.call_function(aten.mul.Tensor, (down, gate_node(gm, adapter, weight, down)))
        gated.meta[GATE_META] = adapter
        up = graph.call_function(aten.linear.default, (gated, graph.get_attr(f"{b_path}.weight")))
        scaled = graph.call_function(aten.mul.Tensor, (up, params.scale))
        total = graph.call_function(aten.add.Tensor, (y, scaled))
    reroute(y, total)
    added = [n for n in _nodes_between(y, total) if GATE_META not in n.meta]
    for node in added:
        node.meta[ADAPTER_META] = _lora_meta(site, params, adapter, a_path, b_path)
    return added


def _nodes_between(first: torch.fx.Node, last: torch.fx.Node) -> list[torch.fx.Node]:
    nodes, node = [], first.next
    while node is not last:
        nodes.append(node)
        node = node.next
    return nodes + [last]
