"""``gm.base_model``: the adapted graph without its LM head, returning the final hidden state.

TRL's trainers (``trl.trainer.utils.add_fused_lm_head``) replace a causal LM's ``forward`` by one
that runs ``model.base_model(...)`` for ``last_hidden_state`` and projects it through
``get_output_embeddings().weight`` in chunks, never holding the full logits. A flat graph has no
backbone module to call, so this builds one: an emitted copy of the graph (sharing every tensor,
gate and dropout, as ``fuse`` copies do) whose output is the LM head's input, wrapped as
transformers' ``BaseModelOutputWithPast``. The head and what only it needs are dead code and go.
It is refused where the head carries an adapter (the chunked head reads only its base weight).
With gradient checkpointing on, its layers are checkpointed too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

from fxpeft.capture.linear_sites import find_linear_sites
from fxpeft.errors import FxpeftError
from fxpeft.graph.records import adapter_records
from fxpeft.names import OUTPUT_MODULE
from fxpeft.registry import provide
from fxpeft.transforms.checkpoint import checkpoint_layers
from fxpeft.graph.state import graph_state
from fxpeft.transforms.fuse import _copy, _depends_on



def hidden_state_output(hidden: torch.Tensor) -> Any:
    """transformers' ``BaseModelOutputWithPast`` holding ``hidden`` as ``last_hidden_state``."""
    from transformers.modeling_outputs import BaseModelOutputWithPast
    return BaseModelOutputWithPast(last_hidden_state=hidden)


def _head_input(gm: torch.fx.GraphModule, head: str) -> torch.fx.Node:
    sites = [s for s in find_linear_sites(gm) if s.module_path == head]
    if len(sites) != 1:
        raise FxpeftError(f"{type(gm).__name__}.base_model: found {len(sites)} linear layers at "
                          f"the LM head {head!r}, expected one")
    return sites[0].consumer.args[0]


def _refuse_adapted_head(gm: torch.fx.GraphModule, head: str) -> None:
    for adapter, record in adapter_records(gm).items():
        if head in record.modules_to_save or any(m.module_path == head for m in record.matches):
            raise FxpeftError(f"{type(gm).__name__}.base_model: adapter {adapter!r} adapts the LM "
                              f"head {head!r}, which a caller of base_model (TRL's fused LM head) "
                              f"would bypass")


def _cut_head(copy: torch.fx.GraphModule, hidden: torch.fx.Node) -> None:
    graph = copy.graph
    output = next(iter(graph.find_nodes(op="output")))
    with graph.inserting_before(output):
        wrapped = graph.call_function(hidden_state_output, (hidden,))
    output.args = (wrapped,)
    for node in list(graph.find_nodes(op="call_module", target=OUTPUT_MODULE)):
        graph.erase_node(node)
    graph.eliminate_dead_code()
    graph.lint()
    copy.recompile()


@provide("backbone")
def backbone(gm: torch.fx.GraphModule, head: str, checkpointed: bool) -> torch.fx.GraphModule:
    """The copy of ``gm`` that returns the input of the LM head at ``head`` (cached while
    ``gm`` is unchanged).

    >>> import torch, fxpeft
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, vocab_size=32,
    ...                          num_hidden_layers=1, num_attention_heads=2)).eval()
    >>> gm = fxpeft.rewrite(model, "lora_qv")
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> hidden = gm.base_model(input_ids=ids).last_hidden_state
    >>> torch.allclose(model.lm_head(hidden), gm(ids).logits, atol=1e-6)
    True
    """
    _refuse_adapted_head(gm, head)
    key, keep_alive = _depends_on(gm, False, ("backbone", head, checkpointed))
    copy, _ = graph_state(gm).backbones.get_or_build(key, lambda: (_cut_copy(gm, head, checkpointed), keep_alive))
    return copy.train(gm.training)


def _cut_copy(gm: torch.fx.GraphModule, head: str, checkpointed: bool) -> torch.fx.GraphModule:
    copy = _copy(gm, role="backbone")
    mapping = dict(zip(gm.graph.nodes, copy.graph.nodes))
    _cut_head(copy, mapping[_head_input(gm, head)])
    if checkpointed:
        checkpoint_layers(copy)
        copy.recompile()
    return copy
