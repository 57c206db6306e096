"""The attention pattern: find each layer's attention computation in a captured graph.

The patterns are data: small directed graphs over *anchor* ops (linear, SDPA, matmul, softmax),
whose edges carry the operand position they feed. The captured graph is condensed to the same
alphabet (an edge ``a -> b`` when ``a`` reaches operand ``i`` of ``b`` through non-anchor ops:
views, transposes, RoPE, GQA repeats, scaling, masks) and networkx's VF2 matcher does the
subgraph matching. Nothing here knows a model family's module or node names.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.fx
import torch.utils._pytree as pytree

from fxpeft.graph.gates import sample_gate
from fxpeft.names import ADAPTER_META
from fxpeft.graph.targets import owning_module
from fxpeft.capture.linear_sites import LinearSite
from fxpeft.capture.program import Program

if TYPE_CHECKING:  # networkx takes a fifth of fxpeft's import: imported when a rule needs attention
    import networkx as nx

aten = torch.ops.aten
ANCHOR_OPS: dict[Any, str] = {
    aten.scaled_dot_product_attention.default: "sdpa",
    aten.matmul.default: "matmul",
    aten.bmm.default: "matmul",
    aten.softmax.int: "softmax",
    aten._softmax.default: "softmax",
}


def _pattern(nodes: dict[str, str], edges: list[tuple[str, str, int]]) -> "nx.DiGraph":
    import networkx as nx
    pattern = nx.DiGraph()
    pattern.add_nodes_from((name, {"kind": kind}) for name, kind in nodes.items())
    pattern.add_edges_from((a, b, {"operand": i}) for a, b, i in edges)
    return pattern


_PATTERNS = {
    # q, k and v projections feed the attention op's operands 0, 1, 2; its output feeds o.
    "sdpa": ({"q": "linear", "k": "linear", "v": "linear", "attention": "sdpa", "o": "linear"},
             [("q", "attention", 0), ("k", "attention", 1), ("v", "attention", 2), ("attention", "o", 0)]),
    # Eager attention: scores = q @ k^T (scaled, masked) -> softmax -> @ v -> o.
    "eager": ({"q": "linear", "k": "linear", "v": "linear", "scores": "matmul", "softmax": "softmax",
               "attention": "matmul", "o": "linear"},
              [("q", "scores", 0), ("k", "scores", 1), ("scores", "softmax", 0),
               ("softmax", "attention", 0), ("v", "attention", 1), ("attention", "o", 0)]),
}
_PATTERN_NAMES = {"SDPA_PATTERN": "sdpa", "EAGER_PATTERN": "eager"}


@functools.cache
def attention_patterns() -> "dict[str, nx.DiGraph]":
    """The patterns by form (``"sdpa"``, ``"eager"``), built on first use.

    >>> sorted(attention_patterns()["sdpa"].nodes)
    ['attention', 'k', 'o', 'q', 'v']
    """
    return {form: _pattern(*spec) for form, spec in _PATTERNS.items()}


def __getattr__(name: str) -> Any:
    """``SDPA_PATTERN``, ``EAGER_PATTERN`` and ``ATTENTION_PATTERNS``, built on first use."""
    if name in _PATTERN_NAMES:
        return attention_patterns()[_PATTERN_NAMES[name]]
    if name == "ATTENTION_PATTERNS":
        return attention_patterns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class AttentionSite:
    """One layer's attention, as bound by a pattern.

    ``query`` is the post-RoPE query the attention op reads, ``(batch, heads, seq, head_dim)``;
    ``output`` is the attention result in the same layout, before the heads are merged and
    ``o`` projects them. ``scale`` multiplies ``q @ k^T`` before the softmax.
    """

    module_path: str
    module_type: str
    form: str
    query: torch.fx.Node
    output: torch.fx.Node
    q: LinearSite
    k: LinearSite
    v: LinearSite
    o: LinearSite
    scale: float
    heads: int
    kv_heads: int
    head_dim: int

    def describe(self) -> str:
        """One line saying what the pattern bound, for ``fxpeft.explain``."""
        return (f"{self.form} attention: query={self.query.name} k={self.k.module_path} "
                f"v={self.v.module_path} o={self.o.module_path} output={self.output.name} "
                f"heads={self.heads} kv_heads={self.kv_heads} head_dim={self.head_dim} "
                f"scale={self.scale:.4g}")


def _anchor_kind(node: torch.fx.Node, linears: dict[torch.fx.Node, LinearSite]) -> str | None:
    if node in linears:
        return "linear" if linears[node].node is node else None  # a hand-written linear's matmul
    return ANCHOR_OPS.get(node.target) if node.op == "call_function" else None


def _blocks_reach(node: torch.fx.Node) -> bool:
    """A linear an adapter added (a LoRA ``A``/``B``), or a per-sample gate (it reads its branch
    only for the shape): reach stops there, or an adapter would link the anchors before a k/v
    projection to its consumers, past the projection."""
    return node.target is sample_gate or (ADAPTER_META in node.meta and node.target in
                                           (aten.linear.default, aten.addmm.default))


def _positional_operands(node: torch.fx.Node) -> Iterator[tuple[int, torch.fx.Node]]:
    for index, arg in enumerate(node.args):
        for leaf in pytree.tree_leaves(arg):
            if isinstance(leaf, torch.fx.Node):
                yield index, leaf


def condense(graph: torch.fx.Graph, linears: dict[torch.fx.Node, LinearSite]) -> "nx.DiGraph":
    """The anchor graph: one vertex per anchor op, an edge ``a -> b`` with ``operands`` = the
    positions of ``b`` that ``a`` reaches through non-anchor ops. One topological sweep."""
    import networkx as nx
    reach: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}  # anchors feeding each node
    condensed = nx.DiGraph()
    for node in graph.nodes:
        kind = _anchor_kind(node, linears)
        if _blocks_reach(node):
            reach[node] = frozenset()
            continue
        if kind is None:
            reach[node] = frozenset().union(*(reach.get(n, frozenset()) for n in node.all_input_nodes))
            continue
        condensed.add_node(node, kind=kind)
        for index, arg in _positional_operands(node):
            for anchor in reach.get(arg, ()):
                if not condensed.has_edge(anchor, node):
                    condensed.add_edge(anchor, node, operands=set())
                condensed.edges[anchor, node]["operands"].add(index)
        reach[node] = frozenset((node,))
    return condensed


def _same_kind(host: dict, pattern: dict) -> bool:
    return host["kind"] == pattern["kind"]


def _feeds_operand(host: dict, pattern: dict) -> bool:
    return pattern["operand"] in host["operands"]


def bind(host: "nx.DiGraph", pattern: "nx.DiGraph") -> Iterator[dict[str, torch.fx.Node]]:
    """Every embedding of ``pattern`` in ``host``, as pattern name -> graph node."""
    from networkx.algorithms.isomorphism import DiGraphMatcher
    matcher = DiGraphMatcher(host, pattern, node_match=_same_kind, edge_match=_feeds_operand)
    for mapping in matcher.subgraph_monomorphisms_iter():
        yield {name: node for node, name in mapping.items()}


def _eager_scale(scores: torch.fx.Node, softmax: torch.fx.Node) -> float | None:
    """The constant factor applied between ``q @ k^T`` and the softmax (masks add, so skip);
    None when a factor is not a constant (then the scale is unknown, and nothing is bound). 1.0
    when there is no factor: the model scaled the query before (OPT)."""
    scale, node = 1.0, softmax.args[0]
    while isinstance(node, torch.fx.Node) and node is not scores and node.args:
        factor = node.args[1] if len(node.args) > 1 else None
        if node.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            if not isinstance(factor, (int, float)):
                return None
            scale = scale * factor if node.target in (aten.mul.Tensor, aten.mul.Scalar) else scale / factor
        node = node.args[0]
    return scale


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["val"].shape)


def _site(bound: dict[str, torch.fx.Node], form: str,
          linears: dict[torch.fx.Node, LinearSite]) -> AttentionSite | None:
    attention = bound["attention"]
    query = (bound["scores"] if form == "eager" else attention).args[0]
    owner = owning_module(attention)
    if owner is None or "val" not in query.meta or len(_shape(query)) != 4:
        return None
    heads, head_dim = _shape(query)[1], _shape(query)[3]
    k, v, o = (linears[bound[name]] for name in "kvo")
    if form == "eager":
        scale = _eager_scale(bound["scores"], bound["softmax"])
        if scale is None:
            return None
    else:
        scale = attention.kwargs.get("scale") or 1 / math.sqrt(head_dim)
    return AttentionSite(owner[0], owner[1], form, query, attention, linears[bound["q"]], k, v, o,
                         float(scale), int(heads), int(k.out_features // head_dim), int(head_dim))


@dataclass(frozen=True)
class SdpaSite:
    """One attention op (``scaled_dot_product_attention``) and the module that owns it: the
    ``attention_op`` match, for kinds that change only what the op reads (its keys, values and
    mask), whatever projections feed it (GPT-2's fused ``c_attn`` too, which ``attention``,
    needing separate q/k/v linears, does not bind)."""

    module_path: str
    module_type: str
    node: torch.fx.Node

    def describe(self) -> str:
        return f"attention op {self.node.name}"


def find_sdpa_sites(gm: torch.fx.GraphModule) -> list[SdpaSite]:
    """Every SDPA node of ``gm`` inside a module, in graph order.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> from fxpeft.capture.export import capture
    >>> gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32))
    >>> [s.module_path for s in find_sdpa_sites(capture(gpt2).graph_module)]
    ['transformer.h.0.attn', 'transformer.h.1.attn']
    """
    nodes = gm.graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)
    return [SdpaSite(*owner, node) for node in nodes if (owner := owning_module(node)) is not None]


def find_attention_sites(program: Program) -> list[AttentionSite]:
    """Every attention block in ``program``, in graph order, one per attention op.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from fxpeft.capture.export import capture
    >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                   num_attention_heads=2, vocab_size=32)
    >>> [(s.module_path, s.form) for s in find_attention_sites(capture(LlamaForCausalLM(cfg)))]
    [('model.layers.0.self_attn', 'sdpa'), ('model.layers.1.self_attn', 'sdpa')]
    """
    linears = {n: site for site in program.sites for n in (site.node, site.core) if n is not None}
    host = condense(program.graph, linears)
    sites: dict[torch.fx.Node, AttentionSite] = {}
    for form, pattern in attention_patterns().items():
        for bound in bind(host, pattern):
            if bound["attention"] not in sites and (site := _site(bound, form, linears)):
                sites[bound["attention"]] = site
    order = {node: i for i, node in enumerate(program.graph.nodes)}
    return sorted(sites.values(), key=lambda s: order[s.output])
