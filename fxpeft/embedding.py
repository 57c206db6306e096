"""The input-embedding pattern: the lookup of a transformers model's ``input_ids`` in its token
embedding (the encoder's, for an encoder-decoder: the decoder embeds ``decoder_input_ids``).

It is what prompt tuning splices after. Matching stays a query: ``find_input_embeddings`` only
reads the graph. ``model_input`` finds the node that carries a named model input, before the
emit step (its placeholder) and after it (the input adapter's output for it).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx

from fxpeft.names import INPUTS_MODULE
from fxpeft.patterns import fetch_attr, owning_module
from fxpeft.program import Program

aten = torch.ops.aten
INPUT_IDS = "input_ids"


@dataclass(frozen=True)
class EmbeddingSite:
    """One ``aten.embedding(weight, ids)`` node that embeds the model's ``input_ids``."""

    node: torch.fx.Node
    module_path: str
    module_type: str
    weight_target: str
    num_embeddings: int
    embedding_dim: int

    @property
    def ids(self) -> torch.fx.Node:
        """The token ids the lookup reads."""
        return self.node.args[1]


def input_adapter(graph: torch.fx.Graph) -> torch.fx.Node | None:
    """The emitted graph's input-adapter call, or None before emit (and for plain graphs)."""
    return next(iter(graph.find_nodes(op="call_module", target=INPUTS_MODULE)), None)


def model_input(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node | None:
    """The node carrying the model input ``name``: the input adapter's output for it in an
    emitted graph, else its placeholder; None if the graph has no such input.

    >>> graph = torch.fx.Graph(); ids = graph.placeholder("input_ids"); _ = graph.output(ids)
    >>> model_input(torch.fx.GraphModule(torch.nn.Module(), graph), "input_ids") is ids
    True
    """
    adapter = input_adapter(gm.graph)
    if adapter is None:
        return next((n for n in gm.graph.find_nodes(op="placeholder") if n.target == name), None)
    names = list(gm.get_submodule(INPUTS_MODULE).names)
    if name not in names:
        return None
    index = names.index(name)
    return next((u for u in adapter.users if u.target is operator.getitem and u.args[1] == index), None)


def _site(gm: torch.fx.GraphModule, node: torch.fx.Node) -> EmbeddingSite | None:
    weight = node.args[0]
    if node.target != aten.embedding.default or not isinstance(weight, torch.fx.Node) or \
            weight.op != "get_attr":
        return None
    table = fetch_attr(gm, weight.target)
    path, kind = owning_module(node) or (weight.target.rpartition(".")[0], "torch.nn.Embedding")
    return EmbeddingSite(node, path, kind, weight.target, table.shape[0], table.shape[1])


def find_input_embeddings(program: Program) -> list[EmbeddingSite]:
    """The token-embedding lookups of ``input_ids`` (one for every family fxpeft captures).

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from fxpeft.capture import capture
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2))
    >>> [(s.module_path, s.embedding_dim) for s in find_input_embeddings(capture(model))]
    [('model.embed_tokens', 16)]
    """
    ids = model_input(program.graph_module, INPUT_IDS)
    if ids is None:
        return []
    found = (_site(program.graph_module, user) for user in ids.users if user.op == "call_function")
    return [site for site in found if site is not None]
