"""Gradient checkpointing as a graph pass: each layer's nodes (``model.layers.3``,
``encoder.block.0``, ...) move into a region that runs under ``torch.utils.checkpoint``, so
backward recomputes the layer's activations instead of keeping them.

HF's ``gradient_checkpointing_enable()`` wraps module calls, which capture flattens away; this
pass does the same on the graph. A region's inputs are every value it reads from outside (the
hidden state, rotary tables, mask, and its weights as ``get_attr`` values), so the region owns
no parameters: they stay where they were, under their own names.

``recompute_norms`` uses the same regions on a small scale: a normalisation whose output feeds
a LoRA ``A`` projection is recomputed with that projection in backward, so the normalised
tensor (which the projection would keep for its gradient) is not kept beside the norm's input.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch.utils.checkpoint import checkpoint

from fxpeft.names import adapter_node
from fxpeft.registry import low_rank_branch
from fxpeft.graph.targets import owning_module
from fxpeft.transforms.norms import rms_norm_parts, rms_norm_then_down

CHECKPOINT_MODULE = "_fxpeft_checkpointed"
_LAYER = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def layer_of(module_path: str) -> str | None:
    """The layer a module belongs to: its path up to the first numeric component.

    >>> layer_of("model.layers.3.self_attn.q_proj"), layer_of("decoder.block.0"), layer_of("lm_head")
    ('model.layers.3', 'decoder.block.0', None)
    """
    found = _LAYER.match(module_path)
    return found.group(1) if found else None


class CheckpointedRegion(torch.nn.Module):
    """Runs one layer's subgraph, under ``checkpoint`` when gradients are being recorded (the
    RNG state is kept, so dropout masks recompute the same; a region without random ops skips
    that, and the checks that recomputation matched)."""

    def __init__(self, region: torch.fx.GraphModule, random: bool = True) -> None:
        super().__init__()
        self.region = region
        self.random = random

    def forward(self, *args: object) -> object:
        if not torch.is_grad_enabled():
            return self.region(*args)
        if self.random:
            return checkpoint(self.region, *args, use_reentrant=False)
        return checkpoint(self.region, *args, use_reentrant=False, preserve_rng_state=False,
                          determinism_check="none")


def _node_layer(node: torch.fx.Node) -> str | None:
    record = adapter_node(node)
    if record is not None:
        return layer_of(record.module_path)
    owner = owning_module(node)
    return layer_of(owner[0]) if owner else None


def layer_spans(graph: torch.fx.Graph) -> dict[str, list[torch.fx.Node]]:
    """Per layer, the nodes from its first to its last in graph order (``get_attr`` nodes are
    left out: regions take them as inputs). A layer whose span holds another layer's nodes is
    left out too."""
    order = list(graph.nodes)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(order):
        layer = _node_layer(node) if node.op == "call_function" or node.op == "call_module" else None
        if layer is not None:
            first.setdefault(layer, index)
            last[layer] = index
    spans = {}
    for layer in first:
        nodes = [n for n in order[first[layer]:last[layer] + 1] if n.op not in ("get_attr", "placeholder")]
        if all(_node_layer(n) in (layer, None) for n in nodes if n.op in ("call_function", "call_module")):
            spans[layer] = nodes
    return spans


@dataclass(frozen=True)
class Region:
    """One layer's nodes as a standalone graph: ``graph`` takes ``inputs`` (every value the
    nodes read from outside, weights included) as placeholders ``in_0, in_1, ...`` and returns
    ``outputs`` (the nodes read outside) as a tuple."""
    nodes: list[torch.fx.Node]
    inputs: list[torch.fx.Node]
    outputs: list[torch.fx.Node]
    graph: torch.fx.Graph


def region_of(nodes: list[torch.fx.Node]) -> Region:
    """The standalone graph of ``nodes`` (a layer's span, ``layer_spans``)."""
    inside = set(nodes)
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    sub = torch.fx.Graph()
    env = {a: sub.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    for node in nodes:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[o] for o in outputs))
    return Region(nodes, inputs, outputs, sub)


def call_region(gm: torch.fx.GraphModule, region: Region, target: str) -> None:
    """Replace ``region``'s nodes in ``gm`` by a call of the submodule at ``target``."""
    inside = set(region.nodes)
    with gm.graph.inserting_after(region.nodes[-1]):
        call = gm.graph.call_module(target, tuple(region.inputs))
    with gm.graph.inserting_after(call):
        for index, output in enumerate(region.outputs):
            value = gm.graph.call_function(operator.getitem, (call, index))
            value.meta = dict(output.meta)
            output.replace_all_uses_with(value, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region.nodes):
        gm.graph.erase_node(node)


def checkpoint_layers(gm: torch.fx.GraphModule) -> int:
    """Put each layer of ``gm`` under gradient checkpointing; returns how many."""
    spans = layer_spans(gm.graph)
    for index, (layer, nodes) in enumerate(spans.items()):
        _checkpoint(gm, layer, nodes, f"layer_{index}")
    return len(spans)


def _checkpoint(gm: torch.fx.GraphModule, label: str, nodes: list[torch.fx.Node], name: str,
                random: bool = True) -> None:
    """Move ``nodes`` into a ``CheckpointedRegion`` at ``name`` and call it in their place."""
    if not hasattr(gm, CHECKPOINT_MODULE):
        gm.add_module(CHECKPOINT_MODULE, torch.nn.Module())
    region = region_of(nodes)
    module = torch.fx.GraphModule(gm, region.graph, class_name=f"Region_{label.replace('.', '_')}")
    gm.get_submodule(CHECKPOINT_MODULE).add_module(name, CheckpointedRegion(module, random))
    call_region(gm, region, f"{CHECKPOINT_MODULE}.{name}")


def _lora_a_targets(graph: torch.fx.Graph) -> set[str]:
    return {branch.down for n in graph.nodes
            if (branch := low_rank_branch(adapter_node(n))) is not None}


def _reads_lora_a(weight: object, targets: set[str]) -> bool:
    """A LoRA ``A`` weight, or ``fuse_lora_a``'s ``cat`` of several."""
    if isinstance(weight, torch.fx.Node) and weight.target == torch.ops.aten.cat.default:
        return all(_reads_lora_a(w, targets) for w in weight.args[0])
    return isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and weight.target in targets


def _lora_downs_of(node: torch.fx.Node, targets: set[str]) -> list[torch.fx.Node]:
    """The LoRA ``A`` projections (``linear(node, A)``) that read ``node``."""
    return [u for u in node.users if u.target == torch.ops.aten.linear.default and len(u.args) == 2
            and u.args[0] is node and _reads_lora_a(u.args[1], targets)]


def _norm_modules(graph: torch.fx.Graph) -> dict[tuple[str, str], list[torch.fx.Node]]:
    """Each normalisation module's nodes (a module whose type name holds "Norm"), in order."""
    norms: dict[tuple[str, str], list[torch.fx.Node]] = {}
    for node in graph.nodes:
        owner = owning_module(node) if node.op == "call_function" else None
        if owner is not None and "Norm" in owner[1].rsplit(".", 1)[-1]:
            norms.setdefault(owner, []).append(node)
    return norms


def _hoist(graph: torch.fx.Graph, anchor: torch.fx.Node, nodes: list[torch.fx.Node]) -> None:
    """Move ``nodes``, and those of their inputs that come after ``anchor``, to right after
    ``anchor`` in their order (a LoRA ``A`` projection and its weight's ``cat`` follow the base
    projections that also read the norm; the region must be contiguous)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    needed: set[torch.fx.Node] = set()
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if node not in needed and order[node] > order[anchor]:
            needed.add(node)
            pending.extend(node.all_input_nodes)
    point = anchor
    for node in sorted(needed, key=order.__getitem__):
        point.append(node)
        point = node


def recompute_norms(gm: torch.fx.GraphModule) -> int:
    """Recompute each normalisation that feeds LoRA ``A`` projections, with them, in backward;
    returns how many regions."""
    regions, targets = [], _lora_a_targets(gm.graph)
    for (path, _), norm in _norm_modules(gm.graph).items():
        downs = _lora_downs_of(norm[-1], targets)  # the module's output feeds A projections
        if downs:
            regions.append((path, norm, downs))
    for index, (label, norm, downs) in enumerate(regions):
        _hoist(gm.graph, norm[-1], downs)
        if not _fuse_rms_norm_and_down(gm.graph, norm[-1], downs):
            _checkpoint(gm, label, norm + downs, f"norm_{index}", random=False)  # norm + matmul
    gm.graph.eliminate_dead_code()
    return len(regions)


def _fuse_rms_norm_and_down(graph: torch.fx.Graph, output: torch.fx.Node, downs: list[torch.fx.Node]) -> bool:
    """An fp32 RMSNorm feeding one ``A`` projection becomes ``rms_norm_then_down`` (no checkpoint
    machinery: a per-layer cost that a region's Python calls made about 2% of a step)."""
    parts = rms_norm_parts(output)
    if parts is None or len(downs) != 1:
        return False
    (x, weight, eps), down = parts, downs[0]
    with graph.inserting_after(down):
        both = graph.call_function(rms_norm_then_down, (x, weight, eps, down.args[1]))
    with graph.inserting_after(both):
        y = graph.call_function(operator.getitem, (both, 0))
    with graph.inserting_after(y):
        projected = graph.call_function(operator.getitem, (both, 1))
    y.meta, projected.meta = dict(output.meta), dict(down.meta)
    down.replace_all_uses_with(projected)
    graph.erase_node(down)
    output.replace_all_uses_with(y)
    return True
