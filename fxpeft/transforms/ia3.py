"""The IA3 pass: a learned vector ``ia3_l`` (ones at init) scales a linear's output, or, for
feed-forward sites, its input. Shapes are PEFT's: ``(out, 1)`` for outputs, ``(1, in)`` for inputs,
so the saved tensors need no reshaping. ``fold_ia3`` merges the vectors into the weights.

Adapter ``"default"`` adds ``ia3_l``, any other ``ia3_l_<name>`` (the name comes from
``program.info["adapter"]``). The scale is ``lerp(1, l, gate)`` with the adapter's gate
(``fxpeft.gates``): exactly ``l`` when on and exactly ``1`` when off, so switching is data.
"""

from __future__ import annotations

import torch
import torch.fx

from fxpeft.adapters import attach_component, register_adapter_names
from fxpeft.errors import PassError
from fxpeft.gates import GATE_META, GATES, adapter_names, drop_unused_per_sample, gate_node, reroute
from fxpeft.patterns import fetch_attr
from fxpeft.program import LinearSite
from fxpeft.rules.schema import IA3Params
from fxpeft.transforms.lora import ADAPTER_META

aten = torch.ops.aten
IA3 = "ia3_l"
register_adapter_names(IA3)


def _register(gm: torch.fx.GraphModule, site: LinearSite, params: IA3Params, adapter: str) -> str:
    weight = gm.get_parameter(site.weight_target)
    shape = (1, site.in_features) if params.feedforward else (site.out_features, 1)
    vector = torch.nn.Parameter(torch.ones(shape, dtype=weight.dtype, device=weight.device))
    return attach_component(gm, site.module_path, IA3, adapter, vector)


def _bias_target(gm: torch.fx.GraphModule, site: LinearSite) -> str | None:
    """Where the site's bias lives, if it has one (it is scaled too when outputs are)."""
    if site.kind == "module":
        return f"{site.node.target}.bias" if gm.get_submodule(site.node.target).bias is not None else None
    args = site.node.args
    bias = args[0] if site.kind == "addmm" else (args[2] if len(args) > 2 else None)
    return bias.target if isinstance(bias, torch.fx.Node) and bias.op == "get_attr" else None


def _gated_vector(gm: torch.fx.GraphModule, target: str, adapter: str,
                  site_input: torch.fx.Node) -> list[torch.fx.Node]:
    """Nodes computing ``lerp(1, l, gate)`` flat (per sample of ``site_input``, whose leading
    dimensions the output shares, in mixed batches); the last is the scale. lerp, not ``1 + gate * (l - 1)``: its two-sided formula is bit-exact at
    both gate 0 and gate 1."""
    graph = gm.graph
    vector = graph.call_function(aten.view.default, (graph.get_attr(target), [-1]))
    ones = graph.call_function(aten.ones_like.default, (vector,))
    gate = gate_node(gm, adapter, gm.get_parameter(target), site_input)
    return [vector.args[0], vector, ones,
            graph.call_function(aten.lerp.Tensor, (ones, vector, gate))]


def splice_ia3(gm: torch.fx.GraphModule, site: LinearSite, params: IA3Params,
               adapter: str = "default") -> list[torch.fx.Node]:
    """``y * l`` after ``site.node``, or ``f(x * l)`` for a feed-forward site (``l`` gated)."""
    target = _register(gm, site, params, adapter)
    graph = gm.graph
    anchor = site.node if params.feedforward else site.node.next
    source = site.input if params.feedforward else site.node
    with graph.inserting_before(anchor):
        added = _gated_vector(gm, target, adapter, site.input)
        scaled = graph.call_function(aten.mul.Tensor, (source, added[-1]))
    if params.feedforward:
        site.node.replace_input_with(source, scaled)
    else:
        reroute(site.node, scaled)
    meta = {"kind": "ia3", "module_path": site.module_path, "adapter": adapter, "parameter": target,
            "feedforward": params.feedforward, "weight": site.weight_target,
            "bias": _bias_target(gm, site), "fan_in_fan_out": site.fan_in_fan_out}
    for node in added:
        node.meta[ADAPTER_META] = meta
    scaled.meta[ADAPTER_META] = {**meta, "bypass": 0}  # removing the adapter reads args[0]
    return [*added, scaled]




def _replace_parameter(gm: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    """Swap in a new frozen parameter at ``target`` (the original model's stays untouched)."""
    path, _, name = target.rpartition(".")
    setattr(gm.get_submodule(path), name, torch.nn.Parameter(value, requires_grad=False))


def merge_ia3(gm: torch.fx.GraphModule, node: torch.fx.Node, meta: dict, gate: float,
              weights: dict[str, torch.Tensor]) -> None:
    """Fold the IA3 vector behind ``node`` into ``weights`` (target -> merged tensor): the weight
    (and, for output scaling, the bias). The signature of ``fxpeft.merge``'s mergers."""
    if node.target != aten.mul.Tensor or gate == 0:
        return
    if gate != 1:
        raise PassError(f"ia3 at {meta['module_path']}: cannot fold a partly open gate ({gate})")
    vector = fetch_attr(gm, meta["parameter"]).detach()
    # Weights are (out, in), or (in, out) for fan-in-fan-out: which axis does the vector scale?
    along_columns = meta["feedforward"] != meta["fan_in_fan_out"]
    weight = weights.get(meta["weight"], fetch_attr(gm, meta["weight"]).detach())
    weights[meta["weight"]] = weight * (vector.reshape(1, -1) if along_columns else vector.reshape(-1, 1))
    if meta["bias"] and not meta["feedforward"]:
        bias = weights.get(meta["bias"], fetch_attr(gm, meta["bias"]).detach())
        weights[meta["bias"]] = bias * vector.flatten()


def _strip(gm: torch.fx.GraphModule, scaled: torch.fx.Node) -> None:
    """Route ``scaled``'s users to its input and drop its gated vector: the base graph again."""
    meta = scaled.meta[ADAPTER_META]
    scaled.replace_all_uses_with(scaled.args[0])
    doomed = [scaled]
    while doomed:  # the scale's producers, unless something else (another gate user) reads them
        node = doomed.pop()
        inputs = [n for n in node.all_input_nodes if ADAPTER_META in n.meta or GATE_META in n.meta]
        gm.graph.erase_node(node)
        doomed.extend(n for n in inputs if not n.users and n not in doomed)
    path, _, name = meta["parameter"].rpartition(".")
    delattr(gm.get_submodule(path), name)


def fold_ia3(gm: torch.fx.GraphModule) -> int:
    """Merge every active IA3 vector into its linear's weight (and, for output scaling, bias),
    in place on ``gm`` with new parameter objects, and drop inactive ones; the graph gets back
    the base op count. Returns how many vectors were removed.

    >>> import fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> from fxpeft.rules import Rule, Where
    >>> from fxpeft.rules.schema import IA3Params
    >>> gm = fxpeft.rewrite(net, Rule(where=Where(path=["0"]), params=IA3Params()))
    >>> n = len(gm.graph.nodes); fold_ia3(gm), n - len(gm.graph.nodes)
    (1, 6)
    """
    doomed = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == aten.mul.Tensor
              and n.meta.get(ADAPTER_META, {}).get("kind") == "ia3"]
    gates = {name: float(getattr(getattr(gm, GATES), name)) for name in adapter_names(gm)}
    weights: dict[str, torch.Tensor] = {}
    for scaled in doomed:
        meta = scaled.meta[ADAPTER_META]
        merge_ia3(gm, scaled, meta, gates.get(meta["adapter"], 1.0), weights)
    for target, value in weights.items():
        _replace_parameter(gm, target, value)
    for scaled in doomed:
        _strip(gm, scaled)
    drop_unused_per_sample(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return len(doomed)
