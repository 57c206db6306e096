"""The captured model: a GraphModule plus an index from graph nodes to module paths."""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(module_path: str) -> int | None:
    """The first numeric component of a module path: its layer (block) index.

    >>> layer_index("model.layers.12.self_attn.q_proj"), layer_index("lm_head")
    (12, None)
    """
    found = _LAYER_INDEX.search(f".{module_path}")
    return int(found.group(1)) if found else None


def erase_unused(graph: torch.fx.Graph, node: object) -> None:
    """Erase ``node`` if nothing reads it, then each of its producers that this leaves unread
    (a pass's replaced chain), stopping at placeholders, ``get_attr`` and impure ops.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> y = g.call_function(torch.neg, (g.call_function(torch.neg, (x,)),)); _ = g.output(x)
    >>> erase_unused(g, y); [n.op for n in g.nodes]
    ['placeholder', 'output']
    """
    pending = [node]
    while pending:
        node = pending.pop()
        if isinstance(node, torch.fx.Node) and node.graph is graph and node.op == "call_function" \
                and not node.users and not node.is_impure():
            pending.extend(node.all_input_nodes)
            graph.erase_node(node)


# what torch 2.13's pytree says when a copied tree spec is rebuilt (copyreg): not the user's doing
_TREESPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` (its code generator too); node metadata is shared, not copied.

    >>> g = torch.fx.Graph(); _ = g.output(g.placeholder("x"))
    >>> len(copy_graph(g).nodes)
    2
    """
    new = torch.fx.Graph()
    with warnings.catch_warnings():  # torch's own deprecation, raised by copying its tree specs
        warnings.filterwarnings("ignore", message=_TREESPEC_WARNING, category=FutureWarning)
        new._codegen = copy.deepcopy(graph._codegen)
    new.output(new.graph_copy(graph, {}))
    return new


def shell_module(module: torch.nn.Module) -> torch.nn.Module:
    """A copy sharing ``module``'s parameters and buffers but with its own attribute tables, so
    adapters attached to it (and its train flag) leave the user's module as it was.

    >>> linear = torch.nn.Linear(2, 2)
    >>> shell_module(linear).weight is linear.weight, shell_module(linear) is linear
    (True, False)
    """
    shell = copy.copy(module)
    shell._modules, shell._parameters = dict(module._modules), dict(module._parameters)
    shell._buffers = dict(module._buffers)
    return shell


@dataclass(frozen=True)
class HfFace:
    """What an HF model answers that its graph answers too (``AdaptedModule``'s HF face):
    its own ``generation_config`` object (not a copy), ``main_input_name``, the module paths of
    its input and output embeddings (None where it has none), and whether its class generates."""

    generation_config: Any = None
    main_input_name: str = "input_ids"
    input_embeddings: str | None = None
    output_embeddings: str | None = None
    can_generate: bool = False


@dataclass(frozen=True)
class CaptureInfo:
    """What capture learned about the model, kept on the emitted graph (``gm.capture_info``).

    ``inputs``: the captured input names (HF graphs); ``config``: the model's config;
    ``out_spec``, ``max_seq``: the output tree and the longest sequence the export allows;
    ``training``: the model's mode when captured (the emitted graph starts in it); ``hf``: the
    model's HF face (``HfFace``), None for a model that is not a transformers model;
    ``positions``: what the model computes for ``position_ids=None`` (a name in
    ``fxpeft.capture.positions.DEFAULTS``), whether the graph takes ``position_ids`` (it fills
    them so) or computes them inside (``fxpeft.generate`` then numbers as it does); ``packs``: whether the model keeps
    packed sequences apart when no attention mask is given (``fxpeft.capture.positions.probe``);
    ``layer_replication``: the ranges the captured model's layers were rebuilt from
    (``fxpeft.capture.layer_copies``), () for a model captured as it is.
    """

    model_class: str
    frontend: str
    inputs: tuple[str, ...] = ()
    config: Any = None
    out_spec: Any = None
    max_seq: int | None = None
    training: bool = False
    hf: HfFace | None = None
    positions: str | None = None
    packs: bool = False
    layer_replication: tuple[tuple[int, int], ...] = ()  # ranges the layer stack was rebuilt from


@dataclass
class Program:
    """What capture produces and passes transform: a graph module, what capture learned about
    the model (``info``), and an index of its linear layers (``sites``).

    ``layer_count`` is the number of distinct layer indices seen (for negative ``layer_range``).
    """

    graph_module: torch.fx.GraphModule
    info: CaptureInfo
    sites: list[Any] = field(default_factory=list)  # LinearSite records (capture.linear_sites)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    @property
    def model_class(self) -> str:
        return self.info.model_class

    @property
    def frontend(self) -> str:
        return self.info.frontend

    @property
    def layer_count(self) -> int:
        layers = {s.layer for s in self.sites if s.layer is not None}
        return max(layers) + 1 if layers else 0

    def module_paths(self) -> list[str]:
        return [s.module_path for s in self.sites]
