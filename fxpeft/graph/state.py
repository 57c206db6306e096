"""Everything fxpeft keeps about one graph, in one typed object: ``graph_state(gm)``.

It lives in ``gm.meta["fxpeft"]`` and is made on first use. Nothing else is kept on a graph in
dynamic attributes or meta dicts. A fused copy gets a state of its own that shares the
original's adapter records and kind state (``derived``), so ``save`` and AdaLoRA's allocation
read the same objects from either graph. The per-graph caches (fused copies, decode graphs)
start empty in a deep copy or a pickle of the graph: their entries run on the original's tensors.

>>> import torch
>>> gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
>>> state = graph_state(gm)
>>> state.role, state.adapters, graph_state(gm) is state
('adapted', {}, True)
>>> copy = state.derived(role="fused")
>>> copy.adapters is state.adapters, copy.role
(True, 'fused')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from fxpeft.graph.bounded_cache import BoundedCache

META_KEY = "fxpeft"
ROLES = ("adapted", "fused", "backbone", "reference", "decoder")
MAX_COPIES = 8  # fused copies per graph: they share its tensors, so each costs only its graph and code
MAX_DECODERS = 2  # decode graphs per graph: each holds a KV cache


class GraphCache(BoundedCache):
    """A per-graph cache of graphs built from it: a deep copy or pickle starts empty."""

    def __deepcopy__(self, memo: dict) -> "GraphCache":
        return type(self)(self.size)


@dataclass(eq=False)
class GraphState:
    """What fxpeft knows about one graph.

    - ``adapters``: adapter name -> ``fxpeft.graph.records.AdapterRecord``, in the order added.
    - ``passes``: the report (``PassResult``) of every rewrite pass run on it, in order.
    - ``kinds``: a kind's state across steps, under the kind's name (AdaLoRA's allocators).
    - ``role``: ``adapted`` (the graph ``rewrite`` returns), ``fused`` (a ``fuse`` copy, which
      ``add_adapter`` and ``save`` refuse), ``backbone``, ``reference`` or ``decoder``.
    - ``specialised_to``: on a copy that holds only some adapters' nodes, their names.
    - ``gates_checked_at``: the gates' write counts when that copy last checked them.
    - ``fused_copies``, ``backbones``, ``decoders``: graphs built from this one (``fuse``, the
      headless ``base_model``, the decode graphs of ``generate``), by what they depend on.
    - ``virtual_tokens``, ``cache_length``: a decode graph's virtual token ids per adapter (the
      kinds that lengthen the input) and the length of its KV cache.
    - ``checkpointing``: ``gradient_checkpointing_enable()`` was called: forward runs the
      checkpointed copy.
    """

    adapters: dict[str, Any] = field(default_factory=dict)
    passes: list[Any] = field(default_factory=list)
    kinds: dict[str, Any] = field(default_factory=dict)
    role: str = "adapted"
    specialised_to: tuple[str, ...] | None = None
    gates_checked_at: tuple[int, ...] | None = None
    fused_copies: GraphCache = field(default_factory=lambda: GraphCache(MAX_COPIES))
    backbones: GraphCache = field(default_factory=lambda: GraphCache(1))  # one at a time
    decoders: GraphCache = field(default_factory=lambda: GraphCache(MAX_DECODERS))
    virtual_tokens: dict[str, Any] = field(default_factory=dict)
    cache_length: int | None = None
    checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"GraphState.role: {self.role!r} is not one of {ROLES}")

    def derived(self, **changes: Any) -> "GraphState":
        """The state of a graph built from this one: the same adapter records and kind state,
        its own role, caches and checks."""
        fresh = GraphState()
        kept = {"adapters": self.adapters, "kinds": self.kinds, "passes": list(self.passes)}
        return replace(fresh, **{**kept, **changes})

    def __deepcopy__(self, memo: dict) -> "GraphState":
        # the per-graph caches copy empty (GraphCache); every other field is copied deeply
        return GraphState(**{f.name: copy.deepcopy(getattr(self, f.name), memo) for f in fields(self)})


def graph_state(gm: torch.nn.Module) -> GraphState:
    """``gm``'s state, made on first use.

    >>> graph_state(torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())).passes
    []
    """
    meta = getattr(gm, "meta", None)
    if not isinstance(meta, dict):  # not a graph: nothing is kept about it
        return GraphState()
    state = meta.get(META_KEY)
    if not isinstance(state, GraphState):
        state = meta[META_KEY] = GraphState()
    return state


def set_graph_state(gm: torch.nn.Module, state: GraphState) -> GraphState:
    """Give ``gm`` the state ``state`` (a new graph's, or one ``derived`` from another's)."""
    gm.meta[META_KEY] = state
    return state
