"""The adapted GraphModule: a ``torch.fx.GraphModule`` that owns train/eval semantics.

Exported graphs bake dropout in as constants (``aten.dropout(x, p, train)``, SDPA's
``dropout_p``), and ``ep.module().train()`` raises. ``AdaptedModule.train(mode)`` rewrites those
constants instead, recompiling only when the mode actually changes (the HF Trainer calls
``train()`` every step).
"""

from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten
SDPA_P_META = "fxpeft_dropout_p"
_SDPA = aten.scaled_dot_product_attention.default
_SDPA_P_INDEX = 4  # (query, key, value, attn_mask, dropout_p, is_causal)


def sdpa_dropout_p(node: torch.fx.Node) -> float:
    if "dropout_p" in node.kwargs:
        return node.kwargs["dropout_p"]
    return node.args[_SDPA_P_INDEX] if len(node.args) > _SDPA_P_INDEX else 0.0


def _set_sdpa_p(node: torch.fx.Node, p: float) -> None:
    if "dropout_p" in node.kwargs or len(node.args) <= _SDPA_P_INDEX:
        if len(node.args) <= 3:
            node.args = node.args + (None,)
        node.kwargs = {**node.kwargs, "dropout_p": p}
    else:
        node.args = node.args[:_SDPA_P_INDEX] + (p,) + node.args[_SDPA_P_INDEX + 1:]


def record_attention_dropout(graph: torch.fx.Graph) -> None:
    """Remember each SDPA node's dropout probability, so ``eval()`` can zero it and ``train()``
    restore it. Call once, on a graph captured in train mode."""
    for node in graph.find_nodes(op="call_function", target=_SDPA):
        node.meta.setdefault(SDPA_P_META, float(sdpa_dropout_p(node)))


def set_dropout_mode(graph: torch.fx.Graph, training: bool) -> bool:
    """Point every dropout in ``graph`` at ``training``. Returns whether anything changed.

    >>> g = torch.fx.Graph(); x = g.placeholder("x")
    >>> _ = g.output(g.call_function(aten.dropout.default, (x, 0.1, False)))
    >>> set_dropout_mode(g, True), set_dropout_mode(g, True)
    (True, False)
    """
    changed = False
    for node in graph.find_nodes(op="call_function", target=aten.dropout.default):
        if node.args[2] != training:
            node.args = (node.args[0], node.args[1], training)
            changed = True
    for node in graph.find_nodes(op="call_function", target=_SDPA):
        wanted = node.meta.get(SDPA_P_META, 0.0) if training else 0.0
        if sdpa_dropout_p(node) != wanted:
            _set_sdpa_p(node, wanted)
            changed = True
    return changed


class AdaptedModule(torch.fx.GraphModule):
    """What ``fxpeft.rewrite`` returns. ``train()`` / ``eval()`` switch every dropout in the graph.

    >>> gm = AdaptedModule(torch.nn.Module(), torch.fx.Graph())
    >>> gm.eval().training
    False
    """

    def train(self, mode: bool = True) -> "AdaptedModule":
        super().train(mode)
        if set_dropout_mode(self.graph, mode):
            self.recompile()
        return self

    # Several named adapters (fxpeft.gates): switching fills gate buffers, so it never re-traces
    # and never recompiles under torch.compile.

    @property
    def adapter_names(self) -> list[str]:
        from fxpeft.gates import adapter_names
        return adapter_names(self)

    @property
    def active_adapters(self) -> list[str]:
        from fxpeft.gates import active_adapters
        return active_adapters(self)

    def set_adapter(self, names: "str | list[str]") -> None:
        """Activate ``names`` (one adapter, or several that add up); the others go off."""
        from fxpeft.gates import set_adapter
        set_adapter(self, names)

    def disable_adapters(self):
        """``with gm.disable_adapters(): ...`` runs the base model."""
        from fxpeft.gates import disable_adapters
        return disable_adapters(self)

    def add_adapter(self, adapter: str, rules, **kwargs) -> "AdaptedModule":
        """Splice another named adapter (inactive) into this graph; see ``fxpeft.add_adapter``."""
        from fxpeft.api import add_adapter
        return add_adapter(self, adapter, rules, **kwargs)

    def delete_adapter(self, adapter: str) -> None:
        from fxpeft.adapter_set import delete_adapter
        delete_adapter(self, adapter)
