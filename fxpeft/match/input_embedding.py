"""The input-embedding pattern: the lookup of a transformers model's ``input_ids`` in its token
embedding (the encoder's, for an encoder-decoder: the decoder embeds ``decoder_input_ids``).

It is what prompt tuning splices after. Matching stays a query: ``find_input_embeddings`` only
reads the graph, picking among the embedding lookups ``fxpeft.match.layer_sites`` recognises those
that read ``input_ids``. ``model_input`` finds the node that carries a named model input,
before the emit step (its placeholder) and after it (the input adapter's output for it).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx

from fxpeft.match.layer_sites import EmbeddingSite, find_embedding_sites
from fxpeft.names import INPUTS_MODULE, is_fxpeft_node
from fxpeft.graph.targets import owning_module

aten = torch.ops.aten
INPUT_IDS = "input_ids"
# Ops that pass token ids on unchanged but for their shape (GPT-2 and OPT view input_ids).
VIEW_OPS = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                      aten.alias.default})


@dataclass(frozen=True)
class InputEmbeddingSite(EmbeddingSite):
    """An embedding lookup that embeds the model's ``input_ids``.

    ``output``: what the embedding module returns, the lookup or the last op of the module it
    flows through (Gemma scales the rows inside its embedding module).
    """

    output: "torch.fx.Node | None" = None


def input_adapter(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The emitted graph's input-adapter call, or None before emit (and for plain graphs)."""
    return next(iter(graph.find_nodes(op="call_module", target=INPUTS_MODULE)), None)


def input_placeholder(graph: torch.fx.Graph, name: str) -> torch.fx.Node | None:
    """The placeholder of the graph input ``name`` (in an emitted graph: what the caller passed,
    before the input adapter fills defaults), or None.

    >>> graph = torch.fx.Graph(); ids = graph.placeholder("input_ids"); _ = graph.output(ids)
    >>> input_placeholder(graph, "input_ids") is ids, input_placeholder(graph, "labels")
    (True, None)
    """
    return next((n for n in graph.find_nodes(op="placeholder") if n.target == name), None)


def model_input(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node | None:
    """The node carrying the model input ``name``: the input adapter's output for it in an
    emitted graph, else its placeholder; None if the graph has no such input.

    >>> graph = torch.fx.Graph(); ids = graph.placeholder("input_ids"); _ = graph.output(ids)
    >>> model_input(torch.fx.GraphModule(torch.nn.Module(), graph), "input_ids") is ids
    True
    """
    adapter = input_adapter(gm.graph)
    if adapter is None:
        return input_placeholder(gm.graph, name)
    names = list(gm.get_submodule(INPUTS_MODULE).names)
    if name not in names:
        return None
    index = names.index(name)
    return next((u for u in adapter.users if u.target is operator.getitem and u.args[1] == index), None)


def _passes_ids_on(user: torch.fx.Node, ids: torch.fx.Node) -> bool:
    """A view, or an adapter node that hands ``ids`` on (an earlier prompt's longer ids)."""
    return user.target in VIEW_OPS or (is_fxpeft_node(user) and user.args[:1] == (ids,))


def id_readers(ids: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read ``ids``' values, directly or through views and adapter nodes that
    hand them on (not those).

    >>> graph = torch.fx.Graph(); ids = graph.placeholder("input_ids")
    >>> view = graph.call_function(aten.view.default, (ids, [-1, 3]))
    >>> size = graph.call_function(aten.sym_size.int, (ids, 1))
    >>> [n.name for n in id_readers(ids)] == [size.name] and not view.users
    True
    """
    found = []
    for user in ids.users:
        found += id_readers(user) if _passes_ids_on(user, ids) else [user]
    return found


def _module_output(node: torch.fx.Node, path: str) -> torch.fx.Node:
    """The last node of the chain from ``node`` that still belongs to the module at ``path``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if (owning_module(user) or ("",))[0] != path:
            break
        node = user
    return node


def find_input_embeddings(gm: torch.fx.GraphModule) -> list[InputEmbeddingSite]:
    """The token-embedding lookups of ``input_ids`` (one for every family fxpeft captures).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from fxpeft.capture.export import capture
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> [(s.module_path, s.embedding_dim) for s in find_input_embeddings(capture(model).graph_module)]
    [('model.embed_tokens', 16)]
    """
    ids = model_input(gm, INPUT_IDS)
    readers = set(id_readers(ids)) if ids is not None else set()
    return [InputEmbeddingSite(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)},
                               output=_module_output(s.node, s.module_path))
            for s in find_embedding_sites(gm) if s.kind == "embedding" and s.node in readers]
