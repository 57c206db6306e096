"""Pictures: one layer's graph before and after rewriting, and a training loss curve.

Drawn with matplotlib alone (the optional ``plot`` extra: ``pip install 'fxpeft[plot]'``), so no
Graphviz binary is needed: the layer's nodes are laid out in topological generations (networkx),
top to bottom. Adapter nodes are coloured and labelled by kind (``lora: linear``), the nodes
reading an adapter's gate are marked ``gate <adapter>``, and the nodes feeding the layer from
outside are dashed. SVG output keeps its labels as text, and each adapter node's group has the id
``adapter-<kind>-<node>``, so a picture can be searched and tested.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import networkx as nx
import torch
import torch.fx

from fxpeft.graph.records import strip_adapters
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


def layer_nodes(graph: torch.fx.Graph, layer: int) -> list[torch.fx.Node]:
    """The nodes of layer ``layer`` (negative counts from the end), in graph order.

    >>> g = torch.fx.Graph(); x = g.placeholder("x"); w = g.get_attr("layers.0.weight")
    >>> _ = g.output(g.call_function(torch.mul, (x, w)))
    >>> [n.name for n in layer_nodes(g, 0)]
    ['layers_0_weight']
    """
    layers = node_layers(graph)
    known = sorted(set(layers.values()))
    if not known:
        raise FxpeftError("the graph has no numbered layers (no module path with an index)")
    if not -len(known) <= layer < len(known) or (layer >= 0 and layer not in known):
        raise FxpeftError(f"layer {layer} does not exist; the graph has layers "
                          f"{known[0]}..{known[-1]}")
    wanted = known[layer] if layer < 0 else layer
    return [node for node in graph.nodes if layers.get(node) == wanted]


# --- drawing -------------------------------------------------------------------------------------

def _op_name(node: torch.fx.Node) -> str:
    name = _full_op_name(node)
    return name if len(name) <= 24 else name[:23] + "…"  # export's sym_size names run long


def _full_op_name(node: torch.fx.Node) -> str:
    if node.op == "get_attr":
        return ".".join(str(node.target).split(".")[-2:])
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0]
    return str(node.target) if node.op == "call_module" else node.name


def node_label(node: torch.fx.Node) -> str:
    """What a node's box says: ``lora: linear``, ``gate default``, ``linear q_proj``."""
    record = adapter_node(node)
    if record is not None:
        return f"{record.kind}: {_op_name(node)}"
    if GATE_META in node.meta:
        return f"gate {node.meta[GATE_META]}"
    owner = owning_module(node)
    leaf = owner[0].rsplit(".", 1)[-1] if owner and node.op == "call_function" else ""
    name = _op_name(node)
    return f"{name} {leaf}" if leaf and leaf != name and not leaf.isdigit() else name


def _kind_colours() -> dict[str, str]:
    return {kind.name: _PALETTE[i % len(_PALETTE)] for i, kind in enumerate(registry.all_kinds())}


def _colour(node: torch.fx.Node, inside: set[torch.fx.Node], colours: dict[str, str]) -> str:
    record = adapter_node(node)
    if record is not None:
        return colours[record.kind]
    if node not in inside:
        return _OUTSIDE
    return _GATE if GATE_META in node.meta else _BASE


def _depths(graph: nx.DiGraph) -> dict[Any, int]:
    """Longest-path depth; an input (a weight, a value from outside) sits just above its first
    user rather than at the top."""
    depth: dict[Any, int] = {}
    for node in nx.topological_sort(graph):
        depth[node] = max((depth[p] + 1 for p in graph.predecessors(node)), default=0)
    for node in graph:
        if graph.in_degree(node) == 0 and graph.out_degree(node):
            depth[node] = min(depth[s] for s in graph.successors(node)) - 1
    return depth


def _layout(nodes: Sequence[torch.fx.Node], inside: set[torch.fx.Node]) -> dict[torch.fx.Node, tuple[float, float]]:
    """Rows by depth, top to bottom; in each row, nodes ordered by their inputs' places."""
    graph = nx.DiGraph()
    graph.add_nodes_from(nodes)
    graph.add_edges_from((arg, node) for node in inside for arg in node.all_input_nodes if arg in graph)
    depth, order = _depths(graph), {node: i for i, node in enumerate(nodes)}
    where: dict[torch.fx.Node, tuple[float, float]] = {}
    for row in sorted(set(depth.values())):
        members = [node for node in nodes if depth[node] == row]

        def key(node: torch.fx.Node) -> tuple[float, int]:
            xs = [where[p][0] for p in graph.predecessors(node) if p in where]
            return (sum(xs) / len(xs) if xs else 0.0, order[node])
        for i, node in enumerate(sorted(members, key=key)):
            where[node] = (i - (len(members) - 1) / 2, -row)
    return where


def _draw_panel(ax: Any, inside: list[torch.fx.Node], title: str, colours: dict[str, str]) -> None:
    members = set(inside)
    outside = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes if a not in members))
    where = _layout([*outside, *inside], members)
    for node in inside:
        for arg in node.all_input_nodes:
            ax.annotate("", xy=where[node], xytext=where[arg],
                        arrowprops={"arrowstyle": "->", "color": "#888888", "lw": 0.6,
                                    "shrinkA": 8, "shrinkB": 8})
    for node, (x, y) in where.items():
        record = adapter_node(node)
        text = ax.text(x, y, node_label(node), ha="center", va="center", fontsize=7, bbox={
            "boxstyle": "round,pad=0.3", "facecolor": _colour(node, members, colours),
            "edgecolor": "#333333" if record else "#999999",
            "linestyle": "--" if node not in members else "-"})
        text.set_gid(f"adapter-{record.kind}-{node.name}" if record else f"node-{node.name}")
    xs, ys = [p[0] for p in where.values()] or [0], [p[1] for p in where.values()] or [0]
    ax.set_xlim(min(xs) - 1, max(xs) + 1)
    ax.set_ylim(min(ys) - 1, max(ys) + 1)
    ax.set_title(title)
    ax.axis("off")


def _legend(kinds: list[str], colours: dict[str, str]) -> list[Any]:
    patch = _matplotlib().patches.Patch
    return [*(patch(facecolor=colours[k], edgecolor="#333333", label=f"{k} adapter") for k in kinds),
            patch(facecolor=_GATE, edgecolor="#999999", label="adapter gate"),
            patch(facecolor=_BASE, edgecolor="#999999", label="base"),
            patch(facecolor=_OUTSIDE, edgecolor="#999999", linestyle="--", label="from outside the layer")]


def _panel_size(nodes: list[torch.fx.Node]) -> tuple[float, float]:
    layout = _layout(nodes, set(nodes))
    widths: dict[float, int] = {}
    for _, y in layout.values():
        widths[y] = widths.get(y, 0) + 1
    return max(widths.values(), default=1), len(widths)


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


def draw_layer(gm: torch.fx.GraphModule, layer: int, out: "str | Path") -> Path:
    """Draw layer ``layer`` of ``gm`` before (adapters stripped, on a copy) and after rewriting,
    side by side, to ``out`` (``.svg``, ``.png`` or ``.pdf``).

    >>> import tempfile, torch, fxpeft
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    >>> gm = fxpeft.rewrite(net, fxpeft.rules.Rule(where=fxpeft.rules.Where(path=["0"])))
    >>> svg = draw_layer(gm, 0, tempfile.mkdtemp() + "/layer0.svg").read_text()
    >>> "lora: linear" in svg and 'id="adapter-lora-' in svg
    True
    """
    out = Path(out)
    _check_format(out)
    before_graph = copy_graph(gm.graph)
    strip_adapters(before_graph, set(adapter_names(gm)) | {DEFAULT_ADAPTER})
    before, after = layer_nodes(before_graph, layer), layer_nodes(gm.graph, layer)
    colours = _kind_colours()
    kinds = sorted({r.kind for n in after if (r := adapter_node(n)) is not None})
    (w1, h1), (w2, h2) = _panel_size(before), _panel_size(after)
    name = type(gm).__name__.removeprefix("Adapted")
    with _figure(out, 1.6 * (w1 + w2) + 4, 0.55 * max(h1, h2) + 2) as figure:
        left, right = figure.subplots(1, 2, width_ratios=[w1 + 1, w2 + 1])
        _draw_panel(left, before, f"{name} layer {layer}: before ({len(before)} nodes)", colours)
        adapters = sum(adapter_node(n) is not None for n in after)
        _draw_panel(right, after, f"after ({len(after)} nodes, {adapters} adapter nodes: "
                                  f"{', '.join(kinds) or 'none'})", colours)
        right.legend(handles=_legend(kinds, colours), loc="upper right", fontsize=7)
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
