"""Pictures: one layer's graph, and a training loss curve.

Drawn with matplotlib alone (the optional ``plot`` extra: ``pip install 'fxpeft[plot]'``), so no
Graphviz binary is needed. ``draw_layer`` draws a layer's modules as boxes (projections, norms,
activations, the attention, and the adds and muls that join two flows), laid out top to bottom in
topological rows (networkx), each adapter as a box coloured by kind beside the module it adapts,
labelled ``kind · projection · r=rank`` (and the adapter's name where a graph holds several).
``detail=True`` draws every aten node instead, before and after rewriting. Boxes are placed by the
width of their labels, so none overlaps another. SVG output keeps its labels as text, and each
adapter's group has the id ``adapter-<kind>-<...>``, so a picture can be searched and tested.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import networkx as nx
import torch
import torch.fx

from fxpeft.graph.records import adapter_records, strip_adapters
from fxpeft.errors import FxpeftError
from fxpeft.graph.gates import adapter_names
from fxpeft import registry
from fxpeft.names import DEFAULT_ADAPTER, GATE_META, adapter_node
from fxpeft.graph.targets import owning_module
from fxpeft.capture.program import copy_graph, layer_index
from fxpeft.io.serialize import save

FORMATS = (".svg", ".png", ".pdf")
_PALETTE = ("#e4572e", "#17bebb", "#ffc914", "#76b041", "#9c6ade", "#2e86ab", "#f18f01")
_BASE, _GATE, _OUTSIDE = "#e8e8e8", "#f7d6e0", "#ffffff"


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.figure
        import matplotlib.patches
    except ImportError:
        raise FxpeftError("pictures need matplotlib: pip install 'fxpeft[plot]'") from None
    return matplotlib


def _check_format(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise FxpeftError(f"{out}: pictures are {', '.join(FORMATS)}; got {out.suffix or 'no suffix'!r}")


# --- which nodes belong to a layer ---------------------------------------------------------------

def _own_layer(node: torch.fx.Node) -> int | None:
    record = adapter_node(node)
    owner = owning_module(node)
    path = record.module_path if record is not None else owner[0] if owner else (
        node.target if node.op == "get_attr" else None)
    return layer_index(path) if isinstance(path, str) else None


def node_layers(graph: torch.fx.Graph) -> dict[torch.fx.Node, int]:
    """Each node's layer: its module path's (adapter nodes: their site's; weights: their
    target's); a node without one (a gate read) joins the layer of all its users, if they share
    one."""
    layers: dict[torch.fx.Node, int] = {}
    for node in reversed(list(graph.nodes)):
        own = _own_layer(node)
        if own is None and node.op not in ("placeholder", "output"):
            users = {layers.get(user) for user in node.users}
            own = users.pop() if len(users) == 1 else None
        if own is not None:
            layers[node] = own
    return layers


def resolve_layer(graph: torch.fx.Graph, layer: int) -> int:
    """The real index of layer ``layer`` (negative counts from the end) of ``graph``.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> _ = g.output(g.call_function(torch.mul, (g.get_attr("layers.0.weight"), g.get_attr("layers.1.weight"))))
    >>> resolve_layer(g, -1)
    1
    """
    known = sorted(set(node_layers(graph).values()))
    if not known:
        raise FxpeftError("the graph has no numbered layers (no module path with an index)")
    if not -len(known) <= layer < len(known) or (layer >= 0 and layer not in known):
        raise FxpeftError(f"layer {layer} does not exist; the graph has layers "
                          f"{known[0]}..{known[-1]}")
    return known[layer] if layer < 0 else layer


def layer_nodes(graph: torch.fx.Graph, layer: int) -> list[torch.fx.Node]:
    """The nodes of layer ``layer`` (negative counts from the end), in graph order.

    >>> g = torch.fx.Graph(); x = g.placeholder("x"); w = g.get_attr("layers.0.weight")
    >>> _ = g.output(g.call_function(torch.mul, (x, w)))
    >>> [n.name for n in layer_nodes(g, 0)]
    ['layers_0_weight']
    """
    wanted, layers = resolve_layer(graph, layer), node_layers(graph)
    return [node for node in graph.nodes if layers.get(node) == wanted]


# --- the module view: modules as boxes, adapters beside what they adapt ---------------------------

_SDPA = "scaled_dot_product_attention"
_JOINS = {"add": "+", "mul": "×"}  # container ops shown where they join two flows
_ROW, _CHAR, _GAP, _MARGIN = 0.5, 0.075, 0.35, 0.4  # inches: a row, a character, between boxes


@dataclass
class Box:
    """One box of the module view: ``key`` groups the graph nodes it stands for; ``label`` is
    what it says; ``kind`` the adapter kind (None for base boxes); ``beside`` the box an
    adapter box sits next to."""

    key: tuple
    label: str
    kind: str | None = None
    beside: tuple | None = None
    outside: bool = False


def _leaf_name(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:] if path.startswith(prefix + ".") else path


def _layer_prefix(nodes: list[torch.fx.Node], index: int) -> str:
    for node in nodes:
        owner = owning_module(node)
        if owner and layer_index(owner[0]) == index:
            parts = owner[0].split(".")
            return ".".join(parts[:parts.index(str(index)) + 1])
    return ""


def _ranks(gm: torch.fx.GraphModule) -> dict[tuple[str, str], int]:
    """(adapter, module path) -> the rank its rule gives, where the kind has one (``r``)."""
    return {(name, m.module_path): m.rule.params.r
            for name, rec in adapter_records(gm).items() for m in rec.matches
            if isinstance(getattr(m.rule.params, "r", None), int)}


def _adapter_box(record: Any, prefix: str, ranks: dict, several: bool) -> Box:
    leaf = _leaf_name(record.module_path, prefix)
    rank = ranks.get((record.adapter, record.module_path))
    parts = [record.kind, leaf] + ([f"r={rank}"] if rank else []) + ([record.adapter] if several else [])
    return Box(("adapter", record.adapter, record.kind, record.module_path), " · ".join(parts),
               record.kind, beside=("module", record.module_path))


def _module_box(path: str, qualified: str, prefix: str) -> Box:
    """A module's box; one outside the layer (the embedding feeding layer 0) is dashed."""
    return Box(("module", path), f"{_leaf_name(path, prefix)} ({qualified.rsplit('.', 1)[-1]})",
               outside=not path.startswith(prefix + "."))


class _Grouping:
    """Which box each node of a layer stands in (None: hidden, its inputs pass through)."""

    def __init__(self, gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], index: int) -> None:
        self.inside, self.prefix = set(nodes), _layer_prefix(nodes, index)
        owners = {o[0] for n in nodes if (o := owning_module(n)) and adapter_node(n) is None}
        self.leaves = {p for p in owners if p != self.prefix
                       and not any(o.startswith(p + ".") for o in owners)}
        self.ranks, self.several = _ranks(gm), len(adapter_names(gm)) > 1
        self.boxes: dict[tuple, Box] = {}
        self.box_of: dict[torch.fx.Node, tuple | None] = {}
        self.sources: dict[torch.fx.Node, set[tuple]] = {}
        self.edges: set[tuple[tuple, tuple]] = set()
        for node in nodes:
            self._place(node)

    def _add(self, box: Box) -> tuple:
        self.boxes.setdefault(box.key, box)
        return box.key

    def _feeds(self, node: torch.fx.Node) -> set[tuple]:
        found: set[tuple] = set()
        for arg in node.all_input_nodes:
            value = arg.meta.get("val")
            if value is not None and not isinstance(value, torch.Tensor):
                continue  # a size (sym_size): shapes are not data flow
            if arg not in self.inside and not isinstance(value, torch.Tensor):
                continue  # per-sample gates, options: not the layer's data
            if arg not in self.inside:
                found |= {self._add(Box(("input",), "from outside the layer", outside=True))} if arg.op != "get_attr" else set()
            elif self.box_of.get(arg) is not None:
                found.add(self.box_of[arg])
            else:
                found |= self.sources.get(arg, set())
        return found

    def _key(self, node: torch.fx.Node, feeds: set[tuple]) -> tuple | None:
        record = adapter_node(node)
        if record is not None:
            return self._add(_adapter_box(record, self.prefix, self.ranks, self.several))
        if node.op == "get_attr" or GATE_META in node.meta:
            return None  # weights and gate reads: part of what reads them
        owner = owning_module(node)
        if owner and owner[0] in self.leaves:
            return self._add(_module_box(owner[0], owner[1], self.prefix))
        name = _full_op_name(node)
        if name == _SDPA:
            return self._add(Box(("op", node.name), "attention (sdpa)"))
        if name in _JOINS and self._joins(owner, feeds):
            return self._add(Box(("op", node.name), _JOINS[name]))
        return None

    def _joins(self, owner: "tuple[str, str] | None", feeds: set[tuple]) -> bool:
        """An add or mul joins two flows: two modules' outputs (the MLP's gate), or, in the
        layer itself, the residual stream and a block's output. Inside a block it is plumbing
        (rotary embeddings multiply a projection by values from outside): hidden."""
        modules = [f for f in feeds if f[0] in ("module", "adapter", "op")]
        at_layer = owner is not None and owner[0] == self.prefix
        return len(modules) >= 2 or (at_layer and len(feeds) >= 2)

    def _place(self, node: torch.fx.Node) -> None:
        feeds = self._feeds(node)
        key = self.box_of[node] = self._key(node, feeds)
        if key is None:
            self.sources[node] = feeds
        else:
            self.edges |= {(f, key) for f in feeds if f != key}


def _module_graph(grouping: _Grouping) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(grouping.boxes)
    graph.add_edges_from(grouping.edges)
    while not nx.is_directed_acyclic_graph(graph):  # a module called twice: cut the loop back
        graph.remove_edge(*nx.find_cycle(graph)[-1])
    return graph


def _box_width(label: str) -> float:
    return len(label) * _CHAR + 0.3


def _rows(graph: nx.DiGraph, boxes: dict[tuple, Box]) -> dict[tuple, int]:
    """Longest-path depth; an adapter box sits on the row of the module it adapts, and what
    reads it below."""
    depth: dict[tuple, int] = {}
    for key in nx.topological_sort(graph):
        below = max((depth[p] + 1 for p in graph.predecessors(key)), default=0)
        beside = boxes[key].beside
        depth[key] = depth[beside] if beside in depth else below
    return depth


def _place_rows(order: dict[Any, int], depth: dict[Any, int], widths: dict[Any, float],
                preds: Callable[[Any], list],
                follows: Callable[[Any], Any] = lambda k: None) -> dict[Any, tuple[float, float]]:
    """Centres (inches) of boxes in rows top to bottom; in a row, ordered by their inputs'
    places, side by side with ``_GAP`` between them, so no two boxes overlap."""
    where: dict[Any, tuple[float, float]] = {}
    rows = sorted(set(depth.values()))
    for row in rows:
        members = [k for k in order if depth[k] == row]

        def key(k: Any) -> tuple[float, int]:
            xs = [where[p][0] for p in preds(k) if p in where]
            return (sum(xs) / len(xs) if xs else 0.0, order[k])
        members.sort(key=key)
        for k in [k for k in members if follows(k) in members]:  # an adapter beside its module
            members.remove(k)
            members.insert(members.index(follows(k)) + 1, k)
        total = sum(widths[k] for k in members) + _GAP * (len(members) - 1)
        x = -total / 2
        for k in members:
            where[k] = (x + widths[k] / 2, -(row - rows[0]) * _ROW)
            x += widths[k] + _GAP
    return where


def _draw_boxes(figure: Any, where: dict, labels: dict, styles: dict, arrows: list) -> None:
    """One axes filling the figure, in inches: the boxes at ``where`` and arrows between them."""
    width, height = figure.get_size_inches()
    ax = figure.add_axes((0, 0, 1, 1))
    xs = [x for x, _ in where.values()]
    left = min(x - labels[k][1] / 2 for k, (x, _) in where.items()) - _MARGIN
    top = max(y for _, y in where.values()) + _MARGIN + 0.6  # room for the title
    ax.set_xlim(left, left + width)
    ax.set_ylim(top - height, top)
    ax.axis("off")
    for a, b in arrows:
        ax.annotate("", xy=where[b], xytext=where[a], arrowprops={
            "arrowstyle": "->", "color": "#888888", "lw": 0.6, "shrinkA": 9, "shrinkB": 9})
    for key, (x, y) in where.items():
        text = ax.text(x, y, labels[key][0], ha="center", va="center", fontsize=8,
                       bbox={"boxstyle": "round,pad=0.3", **styles[key][0]})
        text.set_gid(styles[key][1])
    del xs


def _module_figure(gm: torch.fx.GraphModule, index: int, figure_of: Callable) -> Any:
    nodes = layer_nodes(gm.graph, index)
    grouping = _Grouping(gm, nodes, index)
    graph, boxes, colours = _module_graph(grouping), grouping.boxes, _kind_colours()
    depth, order = _rows(graph, boxes), {k: i for i, k in enumerate(boxes)}
    widths = {k: _box_width(b.label) for k, b in boxes.items()}
    where = _place_rows(order, depth, widths, lambda k: [p for p in graph.predecessors(k)
                                                         if boxes[p].kind is None],
                        lambda k: boxes[k].beside)
    kinds = sorted({b.kind for b in boxes.values() if b.kind})
    span = max(x + widths[k] / 2 for k, (x, _) in where.items()) - min(
        x - widths[k] / 2 for k, (x, _) in where.items())
    name = type(gm).__name__.removeprefix("Adapted")
    size = (max(span + 2 * _MARGIN, 6.0), (max(depth.values()) - min(depth.values()) + 1) * _ROW + 1.6)
    figure = figure_of(*size)
    styles = {k: ({"facecolor": colours[b.kind] if b.kind else _OUTSIDE if b.outside else _BASE,
                   "edgecolor": "#333333" if b.kind else "#999999",
                   "linestyle": "--" if b.outside else "-"},
                  f"adapter-{b.kind}-{b.key[3]}" if b.kind else f"module-{b.label}") for k, b in boxes.items()}
    _draw_boxes(figure, where, {k: (b.label, widths[k]) for k, b in boxes.items()}, styles,
                list(graph.edges))
    adapters = [b for b in boxes.values() if b.kind]
    figure.suptitle(f"{name} layer {index}: {len(adapters)} adapter(s)"
                    f"{': ' + ', '.join(kinds) if kinds else ''}", fontsize=10, y=1 - 0.2 / size[1])
    figure.legend(handles=_legend(kinds, colours, gate=False), loc="lower center", ncol=len(kinds) + 2,
                  fontsize=7, frameon=False)
    return figure


# --- the detail view: every aten node of the layer, before and after -------------------------------

def _op_name(node: torch.fx.Node) -> str:
    name = _full_op_name(node)
    return name if len(name) <= 24 else name[:23] + "…"


def _full_op_name(node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return ".".join(str(node.target).split(".")[-2:])
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0]
    if node.op == "placeholder":
        return "input"
    return str(node.target) if node.op == "call_module" else node.name


def node_label(node: torch.fx.Node) -> str:
    """What a node's box says in the detail view: ``lora q_proj: linear``, ``gate default``,
    ``linear q_proj``."""
    record = adapter_node(node)
    if record is not None:
        return f"{record.kind} {record.module_path.rsplit('.', 1)[-1]}: {_op_name(node)}"
    if GATE_META in node.meta:
        return f"gate {node.meta[GATE_META]}"
    owner = owning_module(node)
    leaf = owner[0].rsplit(".", 1)[-1] if owner and node.op == "call_function" else ""
    name = _op_name(node)
    shown = leaf and leaf != name and not leaf.isdigit() and not leaf.startswith("_")  # export's own
    return f"{name} {leaf}" if shown else name


def _kind_colours() -> dict[str, str]:
    return {kind.name: _PALETTE[i % len(_PALETTE)] for i, kind in enumerate(registry.all_kinds())}


def _colour(node: torch.fx.Node, inside: set[torch.fx.Node], colours: dict[str, str]) -> str:
    record = adapter_node(node)
    if record is not None:
        return colours[record.kind]
    if node not in inside:
        return _OUTSIDE
    return _GATE if GATE_META in node.meta else _BASE


def _node_depths(graph: nx.DiGraph) -> dict[Any, int]:
    """Longest-path depth; an input (a weight, a value from outside) sits just above its first
    user rather than at the top."""
    depth: dict[Any, int] = {}
    for node in nx.topological_sort(graph):
        depth[node] = max((depth[p] + 1 for p in graph.predecessors(node)), default=0)
    for node in graph:
        if graph.in_degree(node) == 0 and graph.out_degree(node):
            depth[node] = min(depth[s] for s in graph.successors(node)) - 1
    return depth


def _panel(nodes: list[torch.fx.Node]) -> tuple[nx.DiGraph, list[torch.fx.Node], set[torch.fx.Node]]:
    members = set(nodes)
    outside = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in members))
    graph = nx.DiGraph()
    graph.add_nodes_from([*outside, *nodes])
    graph.add_edges_from((arg, node) for node in nodes for arg in node.all_input_nodes)
    return graph, [*outside, *nodes], members


def _panel_places(nodes: list[torch.fx.Node], dx: float) -> tuple[dict, dict, float]:
    graph, ordered, _ = _panel(nodes)
    widths = {n: _box_width(node_label(n)) for n in ordered}
    where = _place_rows({n: i for i, n in enumerate(ordered)}, _node_depths(graph), widths,
                        lambda n: list(graph.predecessors(n)))
    left = min(x - widths[n] / 2 for n, (x, _) in where.items())
    right = max(x + widths[n] / 2 for n, (x, _) in where.items())
    where = {n: (x - left + dx, y) for n, (x, y) in where.items()}
    return where, widths, right - left


def _detail_figure(gm: torch.fx.GraphModule, index: int, figure_of: Callable) -> Any:
    before_graph = copy_graph(gm.graph)
    strip_adapters(before_graph, set(adapter_names(gm)) | {DEFAULT_ADAPTER})
    before, after = layer_nodes(before_graph, index), layer_nodes(gm.graph, index)
    colours = _kind_colours()
    kinds = sorted({r.kind for n in after if (r := adapter_node(n)) is not None})
    left, left_widths, left_span = _panel_places(before, 0.0)
    right, right_widths, right_span = _panel_places(after, left_span + 1.0)
    where, widths = {**{("b", n): p for n, p in left.items()}, **{("a", n): p for n, p in right.items()}}, \
        {**{("b", n): w for n, w in left_widths.items()}, **{("a", n): w for n, w in right_widths.items()}}
    rows = {y for _, y in where.values()}
    size = (left_span + right_span + 1.0 + 2 * _MARGIN, (max(rows) - min(rows)) + _ROW + 1.6)
    figure = figure_of(*size)
    styles, labels, arrows = {}, {}, []
    for side, nodes in (("b", before), ("a", after)):
        _, ordered, members = _panel(nodes)
        for node in ordered:
            record = adapter_node(node)
            styles[(side, node)] = ({"facecolor": _colour(node, members, colours),
                                     "edgecolor": "#333333" if record else "#999999",
                                     "linestyle": "--" if node not in members else "-"},
                                    f"adapter-{record.kind}-{node.name}" if record else f"node-{node.name}")
            labels[(side, node)] = (node_label(node), widths[(side, node)])
        arrows += [((side, arg), (side, node)) for node in nodes for arg in node.all_input_nodes]
    _draw_boxes(figure, where, labels, styles, arrows)
    name = type(gm).__name__.removeprefix("Adapted")
    adapters = sum(adapter_node(n) is not None for n in after)
    figure.suptitle(f"{name} layer {index}, every aten node: before ({len(before)} nodes) | after "
                    f"({len(after)} nodes, {adapters} adapter nodes: {', '.join(kinds) or 'none'})",
                    fontsize=10, y=1 - 0.2 / size[1])
    figure.legend(handles=_legend(kinds, colours), loc="lower center", ncol=len(kinds) + 3,
                  fontsize=7, frameon=False)
    return figure


def _legend(kinds: list[str], colours: dict[str, str], gate: bool = True) -> list[Any]:
    patch = _matplotlib().patches.Patch
    return [*(patch(facecolor=colours[k], edgecolor="#333333", label=f"{k} adapter") for k in kinds),
            *([patch(facecolor=_GATE, edgecolor="#999999", label="adapter gate")] if gate else []),
            patch(facecolor=_BASE, edgecolor="#999999", label="base"),
            patch(facecolor=_OUTSIDE, edgecolor="#999999", linestyle="--", label="from outside the layer")]


@contextlib.contextmanager
def _figure(out: Path, width: float, height: float) -> Iterator[Any]:
    """A matplotlib figure (no pyplot, no global backend) saved to ``out``; SVG text stays
    text."""
    matplotlib = _matplotlib()
    _check_format(out)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure = matplotlib.figure.Figure(figsize=(width, height))
        yield figure
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)


def layer_figure(gm: torch.fx.GraphModule, layer: int, detail: bool = False) -> Any:
    """The matplotlib ``Figure`` ``draw_layer`` saves (its title names the real layer index).

    >>> import torch, fxpeft
    >>> gm = fxpeft.rewrite(torch.nn.Sequential(torch.nn.Linear(4, 4)), fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> layer_figure(gm, -1).get_suptitle()
    'Sequential layer 0: 1 adapter(s): lora'
    """
    matplotlib = _matplotlib()
    index = resolve_layer(gm.graph, layer)
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure_of = lambda w, h: matplotlib.figure.Figure(figsize=(w, h))  # noqa: E731
        return (_detail_figure if detail else _module_figure)(gm, index, figure_of)


def draw_layer(gm: torch.fx.GraphModule, layer: int, out: "str | Path", detail: bool = False) -> Path:
    """Draw layer ``layer`` of ``gm`` (negative counts from the end) to ``out`` (``.svg``,
    ``.png`` or ``.pdf``): its modules as boxes (projections, norms, activations; the attention
    and the joins of two flows as small boxes), each adapter beside the module it adapts,
    labelled with its kind, projection and rank. ``detail=True`` draws every aten node instead,
    before (adapters stripped, on a copy) and after rewriting, side by side.

    >>> import tempfile, torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> svg = draw_layer(gm, 0, tempfile.mkdtemp() + "/layer0.svg").read_text()
    >>> "lora · 0 · r=8" in svg and 'id="adapter-lora-0' in svg
    True
    """
    out = Path(out)
    _check_format(out)
    matplotlib = _matplotlib()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure = layer_figure(gm, layer, detail)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=100)
    return out


def loss_curve(losses: Sequence[float], out: "str | Path", title: str = "training loss") -> Path:
    """Plot a loss per step (and, from 10 steps, its running mean over a tenth of them) to
    ``out``; examples save it beside their adapter.

    >>> import tempfile
    >>> loss_curve([3.0, 2.5, 2.2, 2.1], tempfile.mkdtemp() + "/loss.png").stat().st_size > 0
    True
    """
    out = Path(out)
    steps = list(range(1, len(losses) + 1))
    with _figure(out, 6, 4) as figure:
        ax = figure.subplots()
        ax.plot(steps, losses, color="#bbbbbb" if len(losses) >= 10 else "#2e86ab", label="loss")
        if len(losses) >= 10:
            span = max(len(losses) // 10, 2)
            smooth = [sum(losses[max(0, i - span + 1):i + 1]) / len(losses[max(0, i - span + 1):i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, color="#2e86ab", label=f"mean of {span} steps")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.legend()
    return out


def save_with_curve(gm: torch.nn.Module, losses: Sequence[float], output: "str | Path") -> tuple[Path, Path]:
    """The adapter in PEFT's layout (``PeftModel.from_pretrained`` reads it), and its loss
    curve beside it (``<output>-loss.png``). Example: ``examples/finetune_smollm2.py``."""
    folder = save(gm, output)
    curve = loss_curve(losses, folder.with_name(f"{folder.name}-loss.png"),
                       title=f"{folder.name}: training loss")
    return folder, curve
